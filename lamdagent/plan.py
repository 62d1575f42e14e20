"""The dynamic plan: one step per agent iteration, recorded under ``results/agent/iter_<i>/``.

``proposal.json`` is written when the agent chooses the step, ``step.json`` once its model is
scored and the memory rewritten. ``results/plan.yaml`` is the readable view of those records:
rewritten atomically after each, entries only ever added or completed, never changed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .fileio import atomic_write_yaml, read_json

_ITER = re.compile(r"^iter_(\d+)$")


def iteration_dir(agent_dir: str | Path, iteration: int) -> Path:
    return Path(agent_dir) / f"iter_{iteration}"


def iterations_on_disk(agent_dir: str | Path) -> list[int]:
    agent_dir = Path(agent_dir)
    if not agent_dir.is_dir():
        return []
    found = [int(m.group(1)) for p in agent_dir.iterdir() if (m := _ITER.match(p.name))]
    return sorted(found)


def history_entries(initial_step: dict, steps: list[dict]) -> list[dict]:
    """What the prompts show: every initial model and every step, with score or failure."""
    entries = [dict(entry, iteration=0) for entry in initial_step["initial"]]
    entries += steps
    return entries


def load_steps(agent_dir: str | Path, upto: int) -> tuple[dict, list[dict]]:
    """(iteration 0's record, completed step records 1..upto)."""
    initial = read_json(iteration_dir(agent_dir, 0) / "step.json")
    steps = [read_json(iteration_dir(agent_dir, i) / "step.json") for i in range(1, upto + 1)]
    return initial, steps


def plan_entry(record: dict) -> dict:
    keys = ("iteration", "model", "action", "objects", "pipeline", "controller", "fallback", "repeat_of", "status")
    entry = {key: record.get(key) for key in keys}
    score = record.get("score")
    entry["score"] = None if not score else round(score["s_multi"], 6)
    return entry


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
                 "score": round(e["score"]["s_multi"], 6) if e.get("score") else None}
                for e in record["initial"]
            ]
        else:
            plan["steps"].append(plan_entry(record))
    atomic_write_yaml(plan_path, plan)
    return plan
