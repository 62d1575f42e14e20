"""Shared pieces of the benchmark scripts: tiny models, scratch workflow runs, job times, machine line.

The scripts run from a fresh clone as ``.venv/bin/python benchmarks/<name>.py``; this module puts the
repository root (for ``lamdagent``) and ``tests/`` (for the tiny-model config of the end-to-end tests)
on ``sys.path``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(REPO / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402

from lamdagent.report.costs import read_benchmarks  # noqa: E402,F401 - re-exported for the scripts

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def machine() -> str:
    """One line for RESULTS.md: date, CPU, cores, load (the machine is shared), Python, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu}; {os.cpu_count()} cores; load average {load}; "
            f"Python {platform.python_version()}; nice {os.nice(0)}")


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def build_tiny_models(out_dir: Path, seeds=(0,), hidden_size: int = 32, num_layers: int = 2) -> list[Path]:
    """Tiny random Llamas with SmolLM2's tokenizer (the tests' model), one per seed; reused if present."""
    from transformers import AutoTokenizer

    from lamdagent.actions.models import build_tiny_llama, smollm2_gguf_path

    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    models = []
    for seed in seeds:
        path = out_dir / f"tiny-{seed}-h{hidden_size}-l{num_layers}"
        if not (path / "config.json").is_file():
            build_tiny_llama(path, tokenizer_source=tokenizer_dir, seed=seed, hidden_size=hidden_size,
                             num_layers=num_layers)
        models.append(path)
    return models


def run_workflow(workdir: Path, config_path: Path, *targets: str, cores: int = 2, timeout: float = 36000) -> float:
    """Run the project's Snakefile on ``workdir`` (``--directory``) and return the wall seconds."""
    from e2e import communicate_bounded, snakemake_command, subprocess_env

    command = snakemake_command(workdir, config_path, *targets, "--quiet", "rules", cores=cores)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, timed_out = communicate_bounded(process, timeout)
    wall = time.perf_counter() - started
    if timed_out or process.returncode != 0:
        raise RuntimeError(f"snakemake {'timed out' if timed_out else 'failed'} in {workdir}:\n{output[-6000:]}")
    return wall


def job_times(workdir: Path) -> pd.DataFrame:
    """One row per finished job of a run (stage, family, wall_s, cpu_s), from results/benchmarks/."""
    return read_benchmarks(Path(workdir) / "results" / "benchmarks")


def stage_totals(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs and summed wall/CPU seconds per stage, largest first."""
    totals = jobs.groupby("stage", sort=True).agg(jobs=("wall_s", "size"), wall_s=("wall_s", "sum"),
                                                  cpu_s=("cpu_s", "sum")).reset_index()
    return totals.sort_values(["wall_s", "stage"], ascending=[False, True], ignore_index=True)


def model_for_benchmark(spec: str | None, scratch: Path, hidden_size: int, num_layers: int) -> Path:
    """``smollm2``: the embedded SmolLM2-135M-Instruct (dequantised once into ``scratch``); a directory:
    that model; None: a random Llama of the given size with SmolLM2's tokenizer."""
    if spec is None:
        return build_tiny_models(scratch / "models", seeds=(0,), hidden_size=hidden_size, num_layers=num_layers)[0]
    if spec == "smollm2":
        from lamdagent.actions.models import import_embedded_smollm2

        path = Path(scratch) / "models" / "smollm2"
        if not (path / "config.json").is_file():
            import_embedded_smollm2(path)
        return path
    return Path(spec)


def run_span_s(bench_dir: Path) -> float:
    """Seconds from the first job's start to the last job's end, from the benchmark files' times.

    Snakemake writes a benchmark file when its job ends, so a job ran from (mtime - s) to mtime. A run
    that was interrupted and resumed counts the pause too.
    """
    starts, ends = [], []
    for path in Path(bench_dir).rglob("*.tsv"):
        table = pd.read_csv(path, sep="\t")
        if table.empty or "s" not in table:
            continue
        end = path.stat().st_mtime
        starts.append(end - float(pd.to_numeric(table["s"], errors="coerce").sum()))
        ends.append(end)
    return max(ends) - min(starts) if ends else 0.0
