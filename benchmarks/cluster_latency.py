"""Idle seconds between the jobs of an exploration on a real SLURM cluster (issue: wall-clock per iteration).

An iteration is a chain: propose (local) -> build the model (SLURM) -> outcome (local) -> evaluate on
validation (SLURM) -> score (local) -> update_memory (local) -> the next propose. Every SLURM job in it
waits twice: from the end of the job before it to its own start (sbatch, the scheduler, the node-side
Snakemake start-up), and from its end until Snakemake notices (status polls, latency-wait) and starts
the next job. This script runs a short exploration of the tiny model through a SLURM profile (default
profiles/slurm-ci on the one-node CI cluster of .ci/slurm-up.sh) and prints, per iteration, those gaps.

Each job's start and end come from its own benchmark file: Snakemake writes it when the job ends, so
the job ran from (mtime - s) to mtime, on the node for a SLURM job.

    .ci/slurm-up.sh                                     # as root, once
    .venv/bin/python benchmarks/cluster_latency.py --iterations 3
    .venv/bin/python benchmarks/cluster_latency.py --iterations 3 --set slurm-init-seconds-before-status-checks=2
    .venv/bin/python benchmarks/cluster_latency.py --iterations 3 --with-build
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd  # noqa: E402
from common import REPO, SNAKEMAKE, build_tiny_models, machine, median

from lamdagent.agent.plan import step_entries  # noqa: E402
from lamdagent.store.fileio import read_json  # noqa: E402


def job_span(bench: Path) -> tuple[float, float] | None:
    """(start, end) in epoch seconds of a local job, from its benchmark file; None if it never ran.

    Snakemake writes the file when the job ends, so the job ran from (mtime - s) to mtime.
    """
    if not bench.is_file():
        return None
    table = pd.read_csv(bench, sep="\t")
    if table.empty:
        return None
    end = bench.stat().st_mtime
    return end - run_seconds(bench), end


def run_seconds(bench: Path) -> float:
    return float(pd.to_numeric(pd.read_csv(bench, sep="\t")["s"], errors="coerce").sum())


def birth_time(path: Path) -> float:
    """When a file was created: statx's birth time where the file system keeps it, else the SLURM log's
    own first line (`Date: ...`, to the second)."""
    born = subprocess.run(["stat", "-c", "%W", str(path)], capture_output=True, text=True).stdout.strip()
    if born.isdigit() and int(born) > 0:
        return float(born)
    for line in path.read_text(errors="replace").splitlines():
        if line.strip().startswith("Date:"):
            return time.mktime(time.strptime(line.split(":", 1)[1].strip(), "%Y-%m-%d %H:%M:%S"))
    raise RuntimeError(f"{path}: no birth time and no Date line")


def slurm_span(workdir: Path, rule: str, wildcards: str) -> tuple[float, float] | None:
    """(start, end) of a SLURM job: its SLURM log is created when the job starts on the node and last
    written when it ends. (The job's benchmark file is no clock for a SLURM job: Snakemake touches its
    outputs again once it notices the job ended.)"""
    logs = sorted((workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}" / wildcards).glob("*.log"),
                  key=lambda p: int(p.stem))
    if not logs:
        return None
    return birth_time(logs[-1]), logs[-1].stat().st_mtime


def group_spans(workdir: Path) -> dict[str, tuple[float, float]]:
    """{model: (start, end)} of the SLURM jobs that built a model and evaluated it in one (evaluation.with_build:
    group jobs, logged under slurm_logs/group_build_and_evaluate_<rules>/); empty without them."""
    spans, root = {}, workdir / ".snakemake" / "slurm_logs"
    for log in root.glob("group_build_and_evaluate_*/**/*.log"):
        if log.relative_to(root).parts[0] == "group_build_and_evaluate_evaluate":  # an evaluation alone
            continue
        built = re.search(r"wildcards: model=(\S+), split=val", log.read_text(errors="replace"))
        if built:
            spans[built[1]] = birth_time(log), log.stat().st_mtime
    return spans


def iteration_chain(workdir: Path, iteration: int, grouped: dict[str, tuple[float, float]]) -> list[dict]:
    """The jobs of one iteration in the order they depend on each other, with their spans (``grouped``:
    :func:`group_spans`)."""
    results = workdir / "results"
    bench = results / "benchmarks"
    entries = step_entries(read_json(results / "agent" / f"iter_{iteration}" / "proposal.json"))

    def local(stage, path):
        return stage, "local", job_span(path), [path]

    chain = [local("propose", bench / "agent" / f"propose_{iteration}.tsv")]
    for entry in entries:  # with k > 1 the k builds (and evaluations) run side by side
        model = entry["model"]
        action, digest = model.rsplit("-", 1)
        build, evaluation = bench / action / f"{digest}.tsv", bench / "evaluate" / f"{model}.val.tsv"
        if model in grouped:
            chain.append(("build+evaluate val", "slurm", grouped[model], [build, evaluation]))
        else:
            chain.append((f"build {action}", "slurm", slurm_span(workdir, action, digest), [build]))
    chain.append(local("outcome", bench / "agent" / f"outcome_{iteration}.tsv"))
    for entry in entries:
        if entry["model"] not in grouped:
            chain.append(("evaluate val", "slurm", slurm_span(workdir, "evaluate", f"{entry['model']}_val"),
                          [bench / "evaluate" / f"{entry['model']}.val.tsv"]))
    chain += [local("score", bench / "score" / f"{entry['model']}.tsv") for entry in entries]
    chain.append(local("update_memory", bench / "agent" / f"memory_{iteration}.tsv"))
    return [{"iteration": iteration, "stage": stage, "where": where, "start": span[0], "end": span[1],
             "run_s": sum(run_seconds(path) for path in benches if path.is_file())}
            for stage, where, span, benches in chain
            if span is not None]  # a repeated recipe builds nothing


def gaps(workdir: Path, iterations: int) -> pd.DataFrame:
    """One row per SLURM job: seconds from the job it waited for to its start on the node (submission,
    scheduling), on the node outside the job's own work (Snakemake's start-up there), and from its end
    to the start of the next job (status polls, latency-wait)."""
    rows, grouped = [], group_spans(workdir)
    for iteration in range(1, iterations + 1):
        jobs = iteration_chain(workdir, iteration, grouped)
        for index, job in enumerate(jobs):
            if job["where"] != "slurm":
                continue
            before = [j["end"] for j in jobs[:index] if j["stage"] != job["stage"]]
            after = [j["start"] for j in jobs[index + 1:] if j["stage"] != job["stage"]]
            rows.append({
                "iteration": iteration, "job": job["stage"], "run_s": job["run_s"],
                "to_start_s": job["start"] - max(before) if before else float("nan"),
                "on_node_s": job["end"] - job["start"] - job["run_s"],
                "to_next_s": min(after) - job["end"] if after else float("nan"),
            })
    table = pd.DataFrame(rows)
    table["idle_s"] = table["to_start_s"] + table["on_node_s"] + table["to_next_s"]
    return table


def iteration_walls(workdir: Path, iterations: int) -> list[float]:
    """Seconds from the end of update_memory i-1 (iteration 1: propose's start) to the end of update_memory i."""
    walls, grouped = [], group_spans(workdir)
    for iteration in range(1, iterations + 1):
        jobs = iteration_chain(workdir, iteration, grouped)
        start = (job_span(workdir / "results" / "benchmarks" / "agent" / f"memory_{iteration - 1}.tsv") or (None, None))[1]
        walls.append(jobs[-1]["end"] - (start if start is not None else jobs[0]["start"]))
    return walls


def run(args) -> Path:
    from e2e import communicate_bounded, subprocess_env, tiny_config

    scratch = Path(args.scratch)
    workdir = scratch / "run"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model = build_tiny_models(scratch / "models")[0]
    config = tiny_config(model, iterations=args.iterations)
    config["proposals_per_iteration"] = args.k
    config["evaluation"]["with_build"] = args.with_build
    config_path = workdir / "config.yaml"
    config_path.write_text(json.dumps(config))
    overrides = [f"--{item.split('=', 1)[0]}={item.split('=', 1)[1]}" for item in args.set]
    command = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--profile", str(REPO / args.profile),
               "--workflow-profile", "none", "--directory", str(workdir), "--configfile", str(config_path),
               "--cores", "2", *overrides]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=workdir, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, timed_out = communicate_bounded(process, args.timeout)
    (scratch / "snakemake.log").write_text(output)
    if timed_out or process.returncode != 0:
        sys.exit(f"snakemake {'timed out' if timed_out else 'failed'}; log: {scratch / 'snakemake.log'}\n{output[-4000:]}")
    print(f"exploration of {args.iterations} iterations (k = {args.k}) through {args.profile}: "
          f"{time.monotonic() - started:.0f} s")
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--k", type=int, default=1, help="proposals_per_iteration")
    parser.add_argument("--profile", default="profiles/slurm-ci")
    parser.add_argument("--with-build", action="store_true",
                        help="evaluation.with_build: each build and its validation evaluation in one SLURM job")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Snakemake option over the profile's, e.g. seconds-between-status-checks=2")
    parser.add_argument("--scratch", default="/tmp/lamdagent-cluster-latency")
    parser.add_argument("--workdir", help="report on this finished run (its directory) instead of running one")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else run(args)
    table = gaps(workdir, args.iterations)
    print(machine())
    print(table.round(1).to_string(index=False))
    walls = iteration_walls(workdir, args.iterations)
    print(f"per SLURM job, medians: to start {median(table['to_start_s']):.1f} s, on the node outside the job "
          f"{median(table['on_node_s']):.1f} s, to the next job {median(table['to_next_s']):.1f} s; idle in all "
          f"{median(table['idle_s']):.1f} s (max {table['idle_s'].max():.1f} s); the job's own work {median(table['run_s']):.1f} s")
    print(f"per iteration: median wall {median(walls):.1f} s, of which idle around SLURM jobs "
          f"{median(table.groupby('iteration')['idle_s'].sum()):.1f} s")


if __name__ == "__main__":
    main()
