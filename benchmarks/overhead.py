"""Orchestration overhead: what Snakemake and the agent loop add on top of the jobs' own time.

N iterations of the `random` controller on tiny random Llamas whose only action is a TIES merge
(the cheapest action: no training) with 2 validation examples per task. For each N, in a fresh
scratch directory (``snakemake --directory`` with a generated config, as tests/e2e.py does):

    wall      the Snakemake run of ``results/leaderboard.tsv``: the exploration as ``snakemake`` runs it
              (the plan named one iteration at a time), plus the one leaderboard job; no report
    jobs      the sum of the jobs' times from results/benchmarks/ (each job's process, start-up included)
    overhead  (wall - jobs) / N: scheduling, DAG re-evaluation after each checkpoint, job spawning
    dag       one ``snakemake -n`` on the finished directory: the DAG build at size N, paid again
              after every checkpoint (twice per iteration: propose, and the one in initial_step)

Target: overhead <= 1 s per iteration, linear in N (overhead per iteration at the largest N over
that at the smallest ~ 1). Usage::

    .venv/bin/python benchmarks/overhead.py                      # N = 5 and 15 (minutes)
    .venv/bin/python benchmarks/overhead.py --iterations 100 300 # the issue's sizes (hours on 2 cores)
    .venv/bin/python benchmarks/overhead.py --profile            # + cProfile of a dry run at N
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_tiny_models, job_times, machine, run_workflow, stage_totals  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def overhead_config(models: list[Path], iterations: int, seed: int = 0) -> dict:
    """Only TIES merges of tiny models (base, A, B distinct): every iteration makes a new model."""
    from e2e import tiny_config

    config = tiny_config(models[0], iterations=iterations)
    base, *others = models
    config["seed"] = seed
    config["models"] = {"tiny": {"source": "local", "path": str(base)}}
    config["models"].update({f"tiny{i}": {"source": "local", "path": str(p)} for i, p in enumerate(others, start=1)})
    config["datasets"] = {"arith": {"source": "embedded", "tasks": ["arith"]}}
    config["objects"] = {"base_models": ["tiny"], "models": [f"tiny{i}" for i in range(1, len(models))],
                         "ties_weights": [[0.5, 0.5]], "ties_density": [0.5]}
    config["action_types"] = {"ties_merging": ["base_models", "models", "models", "ties_weights", "ties_density"]}
    config["data"] = {"train_examples": 4, "val_examples": 2, "test_examples": 2}
    return config


def dry_run_s(workdir: Path, config_path: Path, target: str, cores: int, profile_to: Path | None = None) -> float:
    """Seconds of one ``snakemake -n`` for ``target``: start-up plus the DAG build (checkpoints included)."""
    from e2e import snakemake_command, subprocess_env

    command = snakemake_command(workdir, config_path, target, "-n", "--quiet", "all", cores=cores)
    if profile_to is not None:
        command = [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "snakemake", *command[1:]]
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=subprocess_env(), check=True, capture_output=True)
    return time.perf_counter() - started


def job_intervals(workdir: Path) -> pd.DataFrame:
    """Every job's (name, start, end) from its benchmark file: written when the job ends, so it ran
    from mtime - s to mtime."""
    rows = []
    for path in sorted((Path(workdir) / "results" / "benchmarks").rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if table.empty or "s" not in table:
            continue
        end = path.stat().st_mtime
        rows.append({"name": str(path.relative_to(path.parents[1])), "start": end - float(table["s"].sum()), "end": end})
    return pd.DataFrame(rows, columns=["name", "start", "end"])


def per_iteration_overhead(workdir: Path, iterations: int) -> pd.DataFrame:
    """Iteration i's span (its propose job's start to the next one's, or to the last job's end) minus
    the time of the jobs in it: the orchestration's cost of each iteration, to see whether it grows
    with i (a DAG re-evaluation touching all earlier steps would make it). The jobs form one chain, so
    the jobs of a span are those that start in it."""
    jobs = job_intervals(workdir)
    starts = [float(jobs.loc[jobs["name"] == f"agent/propose_{i}.tsv", "start"].iloc[0])
              for i in range(1, iterations + 1)]
    bounds = starts + [float(jobs["end"].max())]
    rows = []
    for i in range(iterations):
        inside = jobs[(jobs["start"] >= bounds[i]) & (jobs["start"] < bounds[i + 1])]
        span = bounds[i + 1] - bounds[i]
        rows.append({"iteration": i + 1, "span_s": span, "job_s": float((inside["end"] - inside["start"]).sum()),
                     "overhead_s": span - float((inside["end"] - inside["start"]).sum())})
    return pd.DataFrame(rows)


def growth_line(per_iteration: pd.DataFrame) -> dict:
    """Least-squares overhead_i = a + b * i, and the quarters' medians: b ~ 0 is a linear total."""
    x, y = per_iteration["iteration"].astype(float), per_iteration["overhead_s"]
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    quarter = max(1, len(per_iteration) // 4)
    return {"slope_s_per_iteration": slope, "intercept_s": float(y.mean() - slope * x.mean()),
            "first_quarter_median_s": float(y.head(quarter).median()),
            "last_quarter_median_s": float(y.tail(quarter).median())}


def run_one(scratch: Path, models: list[Path], iterations: int, cores: int, profile: bool) -> dict:
    """Phase A builds the initial pool (iteration 0: its evaluations run side by side); phase B, a
    second Snakemake run, the N iterations, whose jobs form one chain (propose -> merge -> evaluate ->
    score -> update_memory -> next propose), so that wall - job time is the orchestration's own time."""
    workdir = scratch / f"n{iterations}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(overhead_config(models, iterations), sort_keys=False))
    initial = "results/agent/iter_0/step.json"
    run_workflow(workdir, config_path, initial, cores=cores)
    before = job_times(workdir)
    initial_jobs = set(before["name"] + "@" + before["stage"])
    # Snakemake's fixed start-up (imports, plugins, parsing, a DAG of iteration 0 only).
    startup_s = dry_run_s(workdir, config_path, initial, cores)

    # What `rule all` asks for first; naming iter_<N>/step.json itself would put the whole chain of N
    # future iterations in the DAG at once (see explored_steps in rules/common.smk).
    target = "results/leaderboard.tsv"
    wall = run_workflow(workdir, config_path, target, cores=cores)
    jobs = job_times(workdir)
    jobs = jobs[~(jobs["name"] + "@" + jobs["stage"]).isin(initial_jobs)]
    # The DAG of the finished run, built once more: what each checkpoint re-evaluation costs at size N.
    dag_s = dry_run_s(workdir, config_path, target, cores)
    profile_to = None
    if profile:  # profiled apart from the timed runs: cProfile slows the process it watches
        profile_to = workdir / "dry_run.prof"
        dry_run_s(workdir, config_path, target, cores, profile_to=profile_to)
    job_s = float(jobs["wall_s"].sum())
    overhead = wall - job_s
    growth = growth_line(per_iteration_overhead(workdir, iterations))
    return {"growth": growth, "iterations": iterations, "wall_s": wall, "job_s": job_s, "jobs": len(jobs), "overhead_s": overhead,
            "overhead_per_iter_s": overhead / iterations, "startup_s": startup_s,
            "overhead_per_iter_no_startup_s": (overhead - startup_s) / iterations, "dag_s": dag_s,
            "stages": stage_totals(jobs), "profile": profile_to}


def print_profile(path: Path, top: int = 20) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[5, 15],
                        help="N values to run (the issue's: 100 300)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--scratch", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one more dry run of each finished run (where the DAG build goes)")
    args = parser.parse_args(argv)

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lamdagent-overhead-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"scratch: {scratch}")
    try:
        models = build_tiny_models(scratch / "models", seeds=(0, 1, 2))
        results = []
        for n in args.iterations:
            result = run_one(scratch, models, n, args.cores, args.profile)
            results.append(result)
            print(f"\nN={n} (iterations only): wall {result['wall_s']:.1f} s, {result['jobs']} jobs, job time "
                  f"{result['job_s']:.1f} s, overhead {result['overhead_s']:.1f} s = "
                  f"{result['overhead_per_iter_s']:.2f} s/iteration ({result['overhead_per_iter_no_startup_s']:.2f} "
                  f"without the start-up of {result['startup_s']:.1f} s); dry-run DAG {result['dag_s']:.2f} s",
                  flush=True)
            g = result["growth"]
            print(f"per iteration within the run (span - jobs): {g['intercept_s']:.2f} s + {g['slope_s_per_iteration']:.4f} s x i; "
                  f"median first quarter {g['first_quarter_median_s']:.2f} s, last quarter {g['last_quarter_median_s']:.2f} s",
                  flush=True)
            print(result["stages"].to_string(index=False, float_format=lambda x: f"{x:.1f}"))
            if result["profile"] is not None:
                print_profile(result["profile"])
        print("\n| N | wall s | jobs | job s | overhead s | overhead s/iteration | same without start-up | "
              "job s/iteration | start-up s | dry-run DAG s at N |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['iterations']} | {r['wall_s']:.1f} | {r['jobs']} | {r['job_s']:.1f} | {r['overhead_s']:.1f} | "
                  f"{r['overhead_per_iter_s']:.2f} | {r['overhead_per_iter_no_startup_s']:.2f} | "
                  f"{r['job_s'] / r['iterations']:.2f} | {r['startup_s']:.1f} | {r['dag_s']:.2f} |")
        if len(results) > 1:
            first, last = results[0], results[-1]
            growth = last["overhead_per_iter_no_startup_s"] / first["overhead_per_iter_no_startup_s"]
            # The fixed start-up cancels in the difference: what one more iteration costs beyond its jobs.
            marginal = (last["overhead_s"] - first["overhead_s"]) / (last["iterations"] - first["iterations"])
            print(f"\ngrowth of overhead per iteration, N={first['iterations']} -> N={last['iterations']}: "
                  f"x{growth:.2f} (start-up excluded; 1.0 = linear total); dry-run DAG x{last['dag_s'] / first['dag_s']:.2f}")
            print(f"marginal overhead per iteration (overhead difference / iteration difference): {marginal:.2f} s")
        largest = results[-1]
        verdict = f"target <= 1 s/iteration: N={largest['iterations']}, start-up included: " \
                  f"{largest['overhead_per_iter_s']:.2f} ({'met' if largest['overhead_per_iter_s'] <= 1 else 'MISSED'})"
        if len(results) > 1:
            verdict += f"; marginal: {marginal:.2f} ({'met' if marginal <= 1 else 'MISSED'})"
        print(verdict)
    finally:
        if not args.keep and args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
