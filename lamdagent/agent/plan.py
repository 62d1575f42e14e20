"""The dynamic plan: one step per agent iteration, recorded under ``results/agent/iter_<i>/``.

``proposal.json`` is written when the agent chooses the step, ``step.json`` once its model is
scored (or its action failed: ``status: failed``, the failure score, the reason and the log tail) and
the memory rewritten. ``results/plan.yaml`` is the readable view of those records:
rewritten atomically after each, entries only ever added or completed, never changed.

With ``proposals_per_iteration`` k > 1 an iteration's file holds its k steps under ``steps``
(each with its ``index`` in the iteration); with k = 1 (the paper) the file is the step itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from lamdagent.store.fileio import atomic_write_yaml, read_json

_ITER = re.compile(r"^iter_(\d+)$")

# Snakemake builds its DAG by recursion, one level per job on the longest path of dependencies, and
# each iteration's memory depends on the one before: ~4 Python frames per iteration, so Python's
# default limit of 1000 stops a plan at ~240 iterations. 20 per iteration leaves a wide margin, while
# the frames actually used (~4 per iteration) stay far inside the C stack (8 MiB holds ~20 000).
FRAMES_PER_ITERATION = 20


def dag_recursion_limit(iterations: int, current: int) -> int:
    """The recursion limit Snakemake needs for a plan of ``iterations``; never below ``current``."""
    return max(current, 1000 + FRAMES_PER_ITERATION * iterations)


def iteration_dir(agent_dir: str | Path, iteration: int) -> Path:
    return Path(agent_dir) / f"iter_{iteration}"


def iterations_on_disk(agent_dir: str | Path) -> list[int]:
    agent_dir = Path(agent_dir)
    if not agent_dir.is_dir():
        return []
    found = [int(m.group(1)) for p in agent_dir.iterdir() if (m := _ITER.match(p.name))]
    return sorted(found)


def step_entries(record: dict) -> list[dict]:
    """The model entries of one iteration's record: the initial models, the k steps, or the one step."""
    if "initial" in record:
        return [dict(entry, iteration=record["iteration"]) for entry in record["initial"]]
    if "steps" in record:
        return list(record["steps"])
    return [record]


def iteration_record(iteration: int, entries: list[dict], k: int, **extra) -> dict:
    """What ``proposal.json`` / ``step.json`` hold: the step itself for k = 1, else the k steps."""
    if k == 1:
        (entry,) = entries
        return dict(entry, **extra)
    return {"iteration": iteration, "k": k, "steps": entries, **extra}


def history_entries(initial_step: dict, steps: list[dict]) -> list[dict]:
    """What the prompts show: every initial model and every step, with score or failure."""
    entries = step_entries(initial_step)
    for record in steps:
        entries += step_entries(record)
    return entries


def load_steps(agent_dir: str | Path, upto: int) -> tuple[dict, list[dict]]:
    """(iteration 0's record, completed step records 1..upto)."""
    initial = read_json(iteration_dir(agent_dir, 0) / "step.json")
    steps = [read_json(iteration_dir(agent_dir, i) / "step.json") for i in range(1, upto + 1)]
    return initial, steps


def plan_entry(record: dict) -> dict:
    # `index` (the step's place among the iteration's k) only where k > 1: k = 1 keeps the paper's layout.
    index = ("index",) if "index" in record else ()
    keys = ("iteration", *index, "model", "name", "action", "objects", "pipeline", "controller", "fallback", "repeat_of",
            "status")
    entry = {key: record.get(key) for key in keys}
    score = record.get("score")
    entry["score"] = None if not score else round(score["s_multi"], 6)
    if record.get("status") == "failed":  # the failure score, and why
        entry["failure"] = _failure(record)
    return entry


def _failure(record: dict) -> dict:
    failure = record["failure"]
    return {"kind": failure["kind"], "reason": failure["reason"], "log_tail": failure["log_tail"]}


def write_plan(agent_dir: str | Path, plan_path: str | Path) -> dict:
    """Render ``plan.yaml`` from the records on disk (a completed step wins over its proposal)."""
    agent_dir = Path(agent_dir)
    plan: dict = {"initial": [], "steps": []}
    for iteration in iterations_on_disk(agent_dir):
        folder = iteration_dir(agent_dir, iteration)
        record_path = folder / "step.json" if (folder / "step.json").exists() else folder / "proposal.json"
        if not record_path.exists():
            continue
        record = read_json(record_path)
        if iteration == 0:
            plan["initial"] = [
                {"model": e["model"], "name": e.get("name"), "pipeline": e["pipeline"],
                 "score": round(e["score"]["s_multi"], 6) if e.get("score") else None,
                 **({"status": "failed", "failure": _failure(e)} if e.get("status") == "failed" else {})}
                for e in record["initial"]
            ]
        else:
            plan["steps"] += [plan_entry(entry) for entry in step_entries(record)]
    atomic_write_yaml(plan_path, plan)
    return plan
