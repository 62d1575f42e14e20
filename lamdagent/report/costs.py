"""What the exploration cost (the paper's Tables 4 and 5): compute per stage and agent tokens per call kind.

Compute comes from Snakemake's benchmark files (``results/benchmarks/<rule>/<name>.tsv``: ``s`` wall
seconds, ``cpu_time``, ``max_rss`` MB; plus ``<name>.tsv.server.json`` for a job the job server ran);
the GPU count of a job is the one its rule family asks for in
config ``resources`` (a benchmark does not record it), or 0 where the job's lineage or evaluation JSON
says it ran on the CPU; ``gpu_s`` is that count x wall time (what a scheduler bills) and ``gpu_busy_s``
what the job measured (NVML utilisation x time, in the lineage ``run`` or the evaluation's ``run``;
empty where no GPU job measured it). Tokens come from the controller call logs
(``results/agent/iter_*/{propose,memory}_calls.jsonl``). Prices are config ``report.prices``.
Per evaluation task, the time of each evaluate job is split by the tasks' example counts (an estimate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lamdagent.actions.registry import ACTIONS

COLUMNS = ["kind", "stage", "jobs", "wall_s", "cpu_s", "gpus", "gpu_s", "gpu_busy_s", "max_rss_mb", "calls", "tokens_in",
           "tokens_out", "latency_s", "cost_usd"]

# Rules besides the actions (ACTIONS: the built-ins and config's custom ones) whose jobs run with config
# resources[<family>] (and so with its GPU count).
GPU_FAMILIES = {"evaluate", "import_model"}
AGENT_STAGES = {"propose": "agent:propose", "memory": "agent:update_memory", "iter": "agent:initial_step",
                "init": "agent:init_pool", "outcome": "agent:outcome"}


def stage_of(relative: Path) -> tuple[str, str]:
    """(stage, rule family) of a benchmark file, from its path under results/benchmarks/."""
    rule = relative.parts[0]
    name = relative.stem
    if rule in ACTIONS:
        return f"action:{rule}", rule
    if rule == "evaluate":  # evaluate/<model>.<split>.tsv: one lm-eval process per model and split, all tasks
        return f"evaluate:{name.rsplit('.', 1)[-1]}", rule
    if rule == "agent":
        return AGENT_STAGES.get(name.split("_", 1)[0], f"agent:{name}"), rule
    if rule == "report":
        return f"report:{name}", rule
    return rule, rule


def read_benchmarks(bench_dir: str | Path) -> pd.DataFrame:
    """One row per job: its stage, wall and CPU seconds, peak RSS (the mean over a benchmark's repeats)."""
    bench_dir = Path(bench_dir)
    rows = []
    for path in sorted(bench_dir.rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if table.empty or "s" not in table:
            continue
        numbers = table.apply(pd.to_numeric, errors="coerce")
        stage, family = stage_of(path.relative_to(bench_dir))
        cpu_s = numbers["cpu_time"].mean() if "cpu_time" in numbers else float("nan")
        max_rss_mb = numbers["max_rss"].mean() if "max_rss" in numbers else float("nan")
        # A job run by the job server: Snakemake measured only the waiting job process; the server's
        # child (and its own children) measured the rest (lamdagent.actions.job_server).
        server = path.with_name(path.name + ".server.json")
        if server.is_file():
            usage = json.loads(server.read_text(encoding="utf-8"))
            cpu_s = usage["cpu_s"] + (0.0 if pd.isna(cpu_s) else cpu_s)
            max_rss_mb = max(usage["max_rss_mb"], 0.0 if pd.isna(max_rss_mb) else max_rss_mb)
        rows.append({"stage": stage, "family": family, "name": path.stem, "wall_s": numbers["s"].mean(),
                     "cpu_s": cpu_s, "max_rss_mb": max_rss_mb})
    return pd.DataFrame(rows, columns=["stage", "family", "name", "wall_s", "cpu_s", "max_rss_mb"])


def read_calls(agent_dir: str | Path) -> pd.DataFrame:
    """Every controller call (retries and failed calls included: they were paid for)."""
    rows = []
    for pattern in ("iter_*/propose_calls.jsonl", "iter_*/memory_calls.jsonl"):
        for path in sorted(Path(agent_dir).glob(pattern)):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    call = json.loads(line)
                    rows.append({"kind": call.get("kind", "unknown"), "tokens_in": call.get("tokens_in") or 0,
                                 "tokens_out": call.get("tokens_out") or 0, "latency_s": call.get("latency_s") or 0.0})
    return pd.DataFrame(rows, columns=["kind", "tokens_in", "tokens_out", "latency_s"])


def job_record(family: str, name: str, evals_dir: Path | None, models_dir: Path | None) -> dict:
    """What a job wrote about its own run: a model's lineage ``run``, an evaluation's ``settings`` and
    ``run`` (device, measured GPU busy seconds); empty where there is none."""
    path = None
    if (family in ACTIONS or family == "import_model") and models_dir is not None:
        path, keys = models_dir / (name if family == "import_model" else f"{family}-{name}") / "lineage.json", ("run",)
    elif family == "evaluate" and evals_dir is not None:
        model, split = name.rsplit(".", 1)
        path, keys = evals_dir / model / f"{split}.json", ("settings", "run")
    if path is None or not path.is_file():
        return {}
    document = json.loads(path.read_text(encoding="utf-8"))
    record = {}
    for key in keys:
        record.update(document.get(key) or {})
    return record


def recorded_gpus(record: dict) -> int | None:
    """0 where a job's own record says it ran on the CPU, else None (use config's GPU count).

    Config asks for GPUs per rule family, but a run on a machine without them falls back to the CPU
    (``device: auto``); the lineage and the evaluation JSON record the device actually used.
    """
    return 0 if record.get("device") == "cpu" else None


def evaluation_task_shares(jobs: pd.DataFrame, evals_dir: str | Path) -> pd.DataFrame:
    """Each evaluate job's time split over its tasks in proportion to their examples (``kind`` compute_share).

    One lm-eval process evaluates all tasks of a split, so per-task time is not measured: this is the
    estimate the paper's per-task rows need. The shares add up to the evaluate rows; totals skip them.
    """
    rows = []
    for job in jobs[jobs["family"] == "evaluate"].itertuples():
        model, split = job.name.rsplit(".", 1)
        path = Path(evals_dir) / model / f"{split}.json"
        if not path.is_file():
            continue
        tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
        sizes = {task: float(info.get("n") or info.get("sample_len") or 0) for task, info in tasks.items()}
        total = sum(sizes.values())
        for task, size in sizes.items():
            share = size / total if total else 1.0 / len(sizes)
            rows.append({"stage": f"evaluate_task:{task}", "wall_s": job.wall_s * share, "cpu_s": job.cpu_s * share,
                         "gpus": job.gpus, "gpu_s": job.gpu_s * share})
    if not rows:
        return pd.DataFrame(columns=["kind", "stage", "jobs", "wall_s", "cpu_s", "gpus", "gpu_s"])
    shares = pd.DataFrame(rows).groupby("stage", sort=True).agg(
        jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"), gpus=("gpus", "max"),
        gpu_s=("gpu_s", "sum")).reset_index()
    shares.insert(0, "kind", "compute_share")
    return shares


def costs_table(bench_dir: str | Path, agent_dir: str | Path, resources: dict, prices: dict,
                evals_dir: str | Path | None = None, models_dir: str | Path | None = None) -> pd.DataFrame:
    jobs = read_benchmarks(bench_dir)
    evals_dir = None if evals_dir is None else Path(evals_dir)
    models_dir = None if models_dir is None else Path(models_dir)
    gpus, busy = [], []
    for job in jobs.itertuples():
        record = job_record(job.family, job.name, evals_dir, models_dir)
        recorded = recorded_gpus(record)
        asked = int(resources.get(job.family, {}).get("gpu", 0)) if job.family in GPU_FAMILIES or job.family in ACTIONS else 0
        gpus.append(asked if recorded is None else recorded)
        measured = record.get("gpu_busy_s")
        busy.append(float(measured) if measured is not None else (0.0 if gpus[-1] == 0 else float("nan")))
    jobs["gpus"] = pd.Series(gpus, index=jobs.index, dtype="int64")
    jobs["gpu_s"] = jobs["wall_s"] * jobs["gpus"]  # what a scheduler bills: allocated GPUs x wall time
    jobs["gpu_busy_s"] = pd.Series(busy, index=jobs.index, dtype="float64")  # measured (NVML), NaN if not
    compute = jobs.groupby("stage", sort=True).agg(
        jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"), gpus=("gpus", "max"),
        gpu_s=("gpu_s", "sum"), gpu_busy_s=("gpu_busy_s", lambda v: v.sum(min_count=len(v))),
        max_rss_mb=("max_rss_mb", "max")).reset_index()
    compute.insert(0, "kind", "compute")
    if evals_dir is not None:
        compute = pd.concat([compute, evaluation_task_shares(jobs, evals_dir)], ignore_index=True)
    compute["cost_usd"] = (compute["gpu_s"] * prices["gpu_hour"]
                           + compute["cpu_s"].fillna(0) * prices["cpu_hour"]) / 3600

    calls = read_calls(agent_dir)
    agent = calls.groupby("kind", sort=True).agg(
        calls=("tokens_in", "size"), tokens_in=("tokens_in", "sum"), tokens_out=("tokens_out", "sum"),
        latency_s=("latency_s", "sum")).reset_index().rename(columns={"kind": "stage"})
    agent["stage"] = "agent_call:" + agent["stage"]
    agent.insert(0, "kind", "agent")
    agent["cost_usd"] = (agent["tokens_in"] * prices["input_per_1m_tokens"]
                         + agent["tokens_out"] * prices["output_per_1m_tokens"]) / 1e6

    parts = [part for part in (compute, agent) if not part.empty]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    table = table.reindex(columns=COLUMNS)
    total = {"kind": "total", "stage": "total"}
    counted = table[table["kind"] != "compute_share"]  # the shares repeat the evaluate rows
    for column in ("jobs", "wall_s", "cpu_s", "gpu_s", "calls", "tokens_in", "tokens_out", "latency_s", "cost_usd"):
        total[column] = counted[column].sum()
    total["gpu_busy_s"] = counted.loc[counted["kind"] == "compute", "gpu_busy_s"].sum(min_count=1)
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True).reindex(columns=COLUMNS)
    for column in ("jobs", "gpus", "calls", "tokens_in", "tokens_out"):
        table[column] = table[column].astype("Int64")
    # Seconds to the millisecond; dollars to the micro-dollar (a few hundred tokens cost fractions of a cent).
    return table.round({"wall_s": 3, "cpu_s": 3, "gpu_s": 3, "gpu_busy_s": 3, "max_rss_mb": 2, "latency_s": 3, "cost_usd": 6})
