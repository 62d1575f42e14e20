"""Search efficiency: the best validation s_multi found after k iterations, per controller and seed.

Each (controller, seed) runs the exploration in its own scratch directory (``snakemake --directory``
with a generated config: the given one with ``seed``, ``controller`` and ``iterations`` replaced)
up to ``results/agent/iter_<max k>/step.json``. "Best after k" is the maximum s_multi over the initial
pool and the models of iterations 1..k (the agent keeps every model, so this is what it has found).
Prints a table (mean, min and max over seeds) and writes a plot.

The default is the embedded default (config/config.yaml: SmolLM2-135M, three tasks), the `random`
and `transformers` controllers, 3 seeds, k = 4, 8, 12: hours of CPU. ``--tiny`` is the reduced setting
that finishes in minutes: the end-to-end tests' tiny random Llama (also as the transformers
controller), two tasks, small data. Usage::

    .venv/bin/python benchmarks/search_efficiency.py                          # the full setting
    .venv/bin/python benchmarks/search_efficiency.py --tiny --k 2 4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, build_tiny_models, machine, run_workflow  # noqa: E402

import yaml  # noqa: E402


def best_after(workdir: Path, ks: list[int]) -> dict[int, float]:
    """{k: best validation s_multi over the initial pool and iterations 1..k} of a finished run."""
    from lamdagent.plan import step_entries

    agent = Path(workdir) / "results" / "agent"
    best, out = float("-inf"), {}
    for i in range(max(ks) + 1):
        # An iteration's record holds its k proposals' steps (or the initial models); a failed step has no score.
        for entry in step_entries(json.loads((agent / f"iter_{i}" / "step.json").read_text())):
            if entry.get("score"):
                best = max(best, entry["score"]["s_multi"])
        if i in ks:
            out[i] = best
    return out


def controller_spec(name: str, base: dict, tiny: bool) -> dict:
    if name == "random":
        return {"type": "random"}
    if name == "transformers":
        spec = dict(base) if base.get("type") == "transformers" else {"type": "transformers", "model": "smollm2"}
        if tiny:
            spec["model"] = "tiny"
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
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=Path("search_efficiency.png"))
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    ks = sorted(set(args.k))
    keep = args.keep or args.scratch is not None
    args.scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lamdagent-search-"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    setting = "tiny random Llama (--tiny)" if args.tiny else args.config
    print(f"setting: {setting}; controllers {args.controllers}; seeds {args.seeds}; k {ks}")
    try:
        base, _ = run_config(args)
        table: dict[str, dict[int, dict[int, float]]] = {}
        for controller in args.controllers:
            for seed in args.seeds:
                workdir = args.scratch / f"{controller}-seed{seed}"
                config = dict(base, seed=seed, iterations=max(ks),
                              controller=controller_spec(controller, base.get("controller", {}), args.tiny))
                workdir.mkdir(parents=True, exist_ok=True)
                config_path = workdir / "config.yaml"
                config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                started = time.perf_counter()
                run_workflow(workdir, config_path, f"results/agent/iter_{max(ks)}/step.json", cores=args.cores)
                table.setdefault(controller, {})[seed] = best_after(workdir, ks)
                print(f"{controller} seed {seed}: {table[controller][seed]} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
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
    finally:
        if not keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
