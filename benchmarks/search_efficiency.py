"""Search efficiency: the best validation s_multi found after k iterations, per controller and seed.

Each (controller, seed) runs the exploration in its own scratch directory (``snakemake --directory``
with a generated config: the given one with ``seed``, ``controller`` and ``iterations`` replaced)
up to ``results/agent/iter_<max k>/step.json``. "Best after k" is the maximum s_multi over the initial
pool and the models of iterations 1..k (the agent keeps every model, so this is what it has found).
Prints a table (mean, min and max over seeds) and writes a plot.

The runs start from one store of the content-addressed folders (models, recipes, evaluations, data;
as ``snakemake baselines`` shares them with its random run): each seed's initial pool is built once,
first, in that store (``pool-seed<s>``), and every run then starts from a copy of the store made of
hard links (no bytes copied). With ``--parallel P`` (default: one run per core) P runs go side by side,
each on cores/P cores: on 2 cores two 1-thread runs keep both cores busy where one run's chain
(propose -> action -> evaluate -> memory) leaves one idle most of the time. Each run owns its copy, so
two runs that build the same recipe at the same moment never delete each other's outputs (the price:
a recipe two runs choose is built by each). ``--store`` points the store at an earlier run's
``results/`` (e.g. the demo's, for its seed). Rerun with the same ``--scratch`` and finished runs cost
only a dry check.

The default is the embedded default (config/config.yaml: SmolLM2-135M, three tasks), the `random`
and `transformers` controllers, 3 seeds, k = 4, 8, 12: hours of CPU. ``--tiny`` is the reduced setting
that finishes in minutes: the end-to-end tests' tiny random Llama (also as the transformers
controller), two tasks, small data. Usage::

    .venv/bin/python benchmarks/search_efficiency.py --scratch /tmp/search    # the full setting
    .venv/bin/python benchmarks/search_efficiency.py --tiny --k 2 4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import REPO, build_tiny_models, machine, run_workflow  # noqa: E402

from lamdagent.studies.baselines import SHARED_DIRS  # noqa: E402


def iteration_entries(workdir: Path, k: int) -> list[list[dict]]:
    """The plan entries of iterations 0..k of a finished run: iteration 0 holds the initial models, each
    later one its proposals' steps (k > 1 proposals per iteration) or its one step."""
    from lamdagent.agent.plan import step_entries

    agent = Path(workdir) / "results" / "agent"
    return [step_entries(json.loads((agent / f"iter_{i}" / "step.json").read_text())) for i in range(k + 1)]


def best_after(workdir: Path, ks: list[int]) -> dict[int, float]:
    """{k: best validation s_multi over the initial pool and iterations 1..k} of a finished run."""
    best, out = float("-inf"), {}
    for i, entries in enumerate(iteration_entries(workdir, max(ks))):
        for entry in entries:
            if entry.get("score"):  # a failed step has no score
                best = max(best, entry["score"]["s_multi"])
        if i in ks:
            out[i] = best
    return out


def models_made(workdir: Path, k: int) -> int:
    """Distinct new models of iterations 1..k: a repeated recipe is the same model, made once, and a
    step that re-proposes a model of the initial pool (a specialist's own recipe) makes none."""
    initial, *steps = iteration_entries(workdir, k)
    made = {entry["model"] for entries in steps for entry in entries if entry.get("score")}
    return len(made - {entry["model"] for entry in initial})


def fallbacks(workdir: Path, k: int) -> dict[str, int]:
    """Steps of iterations 1..k whose type or object choice was the seeded random fallback (the LLM's
    reply named no valid candidate), and iterations whose memory rewrite was done without the LLM:
    how much of a controller's search was its own."""
    counts = {"steps": 0, "type_selection": 0, "object_selection": 0, "memory_update": 0}
    for entries in iteration_entries(workdir, k)[1:]:
        for entry in entries:
            counts["steps"] += 1
            for call in ("type_selection", "object_selection"):
                counts[call] += bool((entry.get("fallback") or {}).get(call))
        # one memory rewrite per iteration, its flag copied to each of the iteration's steps
        counts["memory_update"] += bool((entries[0].get("fallback") or {}).get("memory_update"))
    return counts


def repeats(workdir: Path, k: int) -> int:
    """Steps of iterations 1..k that re-proposed a recipe already in the pool (flagged ``repeat_of``)."""
    return sum(entry.get("repeat_of") is not None for entries in iteration_entries(workdir, k)[1:]
               for entry in entries)


def best_pipeline(workdir: Path, k: int) -> str:
    """The pipeline of the best-scoring model over the initial pool and iterations 1..k (the first found
    on a tie, as the leaderboard's order)."""
    scored = [entry for entries in iteration_entries(workdir, k) for entry in entries if entry.get("score")]
    return max(scored, key=lambda entry: entry["score"]["s_multi"])["pipeline"]


def action_counts(workdir: Path, k: int) -> dict[str, int]:
    """How many steps of iterations 1..k took each action type: what the controller chose to do."""
    counts: dict[str, int] = {}
    for entries in iteration_entries(workdir, k)[1:]:
        for entry in entries:
            counts[entry["action"]] = counts.get(entry["action"], 0) + 1
    return dict(sorted(counts.items()))


def share_store(workdir: Path, store: Path) -> None:
    """Link the run's content-addressed folders to the shared store (kept if already linked)."""
    results = workdir / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DIRS:
        link, target = results / name, store / name
        target.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target.resolve(), target_is_directory=True)


def clone_store(workdir: Path, store: Path) -> None:
    """Give the run its own copy of the store's content-addressed folders, made of hard links.

    Outputs are only ever replaced whole (a new file or directory renamed into place), never written in
    place, so a hard-linked file never changes under the other copies. A folder the run already has (a
    rerun) is kept as it is.
    """
    results = workdir / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DIRS:
        source, target = store / name, results / name
        if target.exists() or target.is_symlink() or not source.is_dir():
            continue
        staging = results / f".{name}.cloning"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, symlinks=True, copy_function=_link_or_copy)
        os.replace(staging, target)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def controller_spec(name: str, base: dict, tiny: bool) -> dict:
    if name == "random":
        return {"type": "random"}
    if name == "transformers":
        spec = dict(base) if base.get("type") == "transformers" else {"type": "transformers", "model": "smollm2"}
        if tiny:
            spec["model"] = "tiny"
        # This study measures the controller, fallbacks included (it counts them): the run must not stop on them.
        spec["max_fallback_rate"] = 1
        return spec
    raise SystemExit(f"controller {name!r}: this script runs 'random' and 'transformers' (openai needs an endpoint)")


def run_config(args) -> tuple[dict, Path | None]:
    """The base config: --config, or the tests' tiny config with --tiny."""
    if args.tiny:
        from e2e import tiny_config

        model = build_tiny_models(args.scratch / "models", seeds=(0,))[0]
        config = tiny_config(model)
        config["data"] = {"train_examples": args.train_examples, "val_examples": args.val_examples,
                          "test_examples": args.val_examples}
        return config, model
    return yaml.safe_load(Path(args.config).read_text()), None


def plot(table: dict, ks: list[int], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for controller, per_seed in table.items():
        means = [sum(s[k] for s in per_seed.values()) / len(per_seed) for k in ks]
        lows = [min(s[k] for s in per_seed.values()) for k in ks]
        highs = [max(s[k] for s in per_seed.values()) for k in ks]
        ax.plot(ks, means, marker="o", label=f"{controller} (mean of {len(per_seed)} seeds)")
        ax.fill_between(ks, lows, highs, alpha=0.2)
    ax.set_xlabel("iterations")
    ax.set_ylabel("best validation s_multi")
    ax.set_xticks(ks)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--tiny", action="store_true", help="the reduced setting (tiny random Llama)")
    parser.add_argument("--controllers", nargs="+", default=["random", "transformers"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 12], help="iterations to report")
    parser.add_argument("--train-examples", type=int, default=16, help="--tiny: training rows per task")
    parser.add_argument("--val-examples", type=int, default=6, help="--tiny: validation rows per task")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, help="runs side by side, each on cores/parallel cores "
                        "(default: one per core, at most the number of runs)")
    parser.add_argument("--plot", type=Path, default=Path("search_efficiency.png"))
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--store", type=Path, help="the shared content-addressed folders (default: <scratch>/store)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    ks = sorted(set(args.k))
    keep = args.keep or args.scratch is not None
    args.scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lamdagent-search-"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    config_name = Path(args.config).resolve()
    config_name = config_name.relative_to(REPO) if config_name.is_relative_to(REPO) else config_name
    setting = "tiny random Llama (--tiny)" if args.tiny else f"{config_name}"
    print(f"setting: {setting}; controllers {args.controllers}; seeds {args.seeds}; k {ks}")
    try:
        base, _ = run_config(args)
        store = args.store or args.scratch / "store"

        def configure(workdir: Path, controller: str, seed: int) -> Path:
            config = dict(base, seed=seed, iterations=max(ks),
                          controller=controller_spec(controller, base.get("controller", {}), args.tiny))
            workdir.mkdir(parents=True, exist_ok=True)
            config_path = workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            return config_path

        # 1. Each seed's initial pool (base and recipe models, their evaluations), once, on all cores.
        for seed in args.seeds:
            workdir = args.scratch / f"pool-seed{seed}"
            share_store(workdir, store)
            wall = run_workflow(workdir, configure(workdir, "random", seed), "results/agent/iter_0/step.json",
                                cores=args.cores)
            print(f"initial pool, seed {seed}: {wall:.0f} s", flush=True)

        # 2. The (controller, seed) runs, side by side, each from its own copy of the store, seed by seed
        # (every controller of a seed before the next seed): a run stopped early still holds whole seeds
        # to compare, each seed's agent-driven run (the longest) first.
        runs = sorted(((controller, seed) for seed in args.seeds for controller in args.controllers),
                      key=lambda run: (args.seeds.index(run[1]), run[0] == "random"))
        parallel = max(1, min(args.parallel or args.cores, len(runs)))
        cores = max(1, args.cores // parallel)
        print(f"{len(runs)} runs, {parallel} side by side on {cores} core(s) each", flush=True)

        def explore(controller: str, seed: int) -> tuple[str, int, dict[int, float], float]:
            workdir = args.scratch / f"{controller}-seed{seed}"
            clone_store(workdir, store)
            wall = run_workflow(workdir, configure(workdir, controller, seed),
                                f"results/agent/iter_{max(ks)}/step.json", cores=cores)
            return controller, seed, best_after(workdir, ks), wall

        table: dict[str, dict[int, dict[int, float]]] = {controller: {} for controller in args.controllers}
        failed: list[tuple[str, int]] = []
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(explore, controller, seed): (controller, seed) for controller, seed in runs}
            for done in as_completed(futures):
                try:
                    controller, seed, best, wall = done.result()
                except RuntimeError as error:  # one failed run: the others go on; the table says which is missing
                    failed.append(futures[done])
                    print(f"{futures[done][0]} seed {futures[done][1]} FAILED: {error}", flush=True)
                    continue
                table[controller][seed] = best
                workdir = args.scratch / f"{controller}-seed{seed}"
                made, fell_back = models_made(workdir, max(ks)), fallbacks(workdir, max(ks))
                print(f"{controller} seed {seed}: best {best}, {made} new models, {repeats(workdir, max(ks))} repeats, "
                      f"action types {action_counts(workdir, max(ks))}, random fallbacks {fell_back}, best pipeline "
                      f"{best_pipeline(workdir, max(ks))} ({wall:.0f} s; {machine()})", flush=True)
        table = {controller: dict(sorted(per_seed.items())) for controller, per_seed in table.items() if per_seed}
        print("\n| controller | " + " | ".join(f"best after {k} (mean [min, max])" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for controller, per_seed in table.items():
            cells = []
            for k in ks:
                values = [s[k] for s in per_seed.values()]
                cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
            print(f"| {controller} | " + " | ".join(cells) + " |")
        print("\nper seed: " + json.dumps({c: {str(s): v for s, v in ps.items()} for c, ps in table.items()}))
        plot(table, ks, args.plot, f"best validation s_multi, {setting}")
        print(f"plot: {args.plot}")
        if failed:
            print(f"failed runs (rerun with the same --scratch to resume them): {failed}")
    finally:
        if not keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
