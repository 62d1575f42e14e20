"""Where an exploration stands (``lamdagent status``), read from what the run writes under ``results/``.

Nothing here writes: it reads the agent's records (``results/agent/iter_*/{proposal,outcome,step}.json``,
see ``lamdagent.agent.plan``), so it works while Snakemake runs, after it stopped, or on a copy of results/.
The time left is estimated from the finished jobs' benchmark files (``lamdagent.report.costs.read_benchmarks``),
one job after another: each iteration still to run costs what the finished iterations' own jobs did
on average (before the first one finished: each stage's mean wall time times its jobs left), plus
the final test evaluations and reports at their stage's mean.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lamdagent.actions.registry import is_built_id
from lamdagent.agent.plan import iteration_dir, iterations_on_disk, step_entries
from lamdagent.report.costs import read_benchmarks

FALLBACK_CALLS = ("type_selection", "object_selection", "memory_update")
# The rules that end the default target, after the last step (one job each).
REPORT_JOBS = ("report:leaderboard", "report:topk", "report:figures", "report:costs")


def _read(path: Path) -> dict | None:
    """A record, or None while it does not exist (written by rename, so never half-written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _score(entry: dict) -> float | None:
    score = entry.get("score")
    return None if not score else float(score["s_multi"])


def _step_state(entry: dict, outcome: dict | None, running: bool) -> str:
    """done / failed (scored or recorded), built (being evaluated), running (the action is being
    built; ``stopped`` where no Snakemake runs to build it)."""
    if entry.get("status") in ("done", "failed"):
        return entry["status"]
    if outcome is not None:
        return "failed" if outcome["models"].get(entry["model"], {}).get("status") == "failed" else "built"
    return "running" if running else "stopped"


def iteration_records(agent_dir: Path) -> list[dict]:
    """Per iteration on disk: its entries (from step.json, else proposal.json) and its outcome."""
    records = []
    for iteration in iterations_on_disk(agent_dir):
        folder = iteration_dir(agent_dir, iteration)
        step, proposal = _read(folder / "step.json"), _read(folder / "proposal.json")
        record = step or proposal
        if record is None:
            continue
        records.append({"iteration": iteration, "complete": step is not None, "entries": step_entries(record),
                        "outcome": _read(folder / "outcome.json")})
    return records


def _best(records: list[dict]) -> dict | None:
    scored = [(score, record["iteration"], entry) for record in records for entry in record["entries"]
              if entry.get("status") == "done" and (score := _score(entry)) is not None]
    if not scored:
        return None
    score, iteration, entry = max(scored, key=lambda item: (item[0], -item[1]))  # ties: the earliest
    return {"model": entry["model"], "pipeline": entry.get("pipeline"), "iteration": iteration, "s_multi": score}


def _fallbacks(records: list[dict]) -> dict:
    counts = {"steps": 0, **{call: 0 for call in FALLBACK_CALLS}}
    for record in records:
        if record["iteration"] == 0:
            continue
        for entry in record["entries"]:
            counts["steps"] += 1
            for call in FALLBACK_CALLS:
                counts[call] += bool((entry.get("fallback") or {}).get(call))
    return counts


def _jobs_left(records: list[dict], iterations: int | None, k: int, top_k: int, results: Path) -> dict | None:
    """Jobs still to run per stage, from the records on disk (None when the plan's length is unknown)."""
    if iterations is None:
        return None
    left = {"agent:propose": 0, "action": 0, "evaluate:val": 0, "score": 0, "agent:outcome": 0,
            "agent:update_memory": 0, "evaluate:test": 0}
    by_iteration = {record["iteration"]: record for record in records}
    if not (0 in by_iteration and by_iteration[0]["complete"]):
        # The initial pool: its recipe models built, every model evaluated and scored, one initial step.
        pool = _read(results / "agent" / "pool.json") or {}
        initial = pool.get("initial_models", [])
        left["agent:initial_step"] = 1
        left["agent:outcome"] += int(not (results / "agent" / "iter_0" / "outcome.json").exists())
        left["action"] += sum(is_built_id(m) and not (results / "models" / m).exists() for m in initial)
        left["evaluate:val"] += sum(not (results / "evals" / m / "val.json").exists() for m in initial)
        left["score"] += sum(not (results / "scores" / f"{m}.json").exists() for m in initial)
    for iteration in range(1, iterations + 1):
        record = by_iteration.get(iteration)
        if record is not None and record["complete"]:
            continue
        left["agent:update_memory"] += 1
        if record is None:  # not proposed yet: all of it
            for stage, count in (("agent:propose", 1), ("action", k), ("evaluate:val", k), ("score", k),
                                 ("agent:outcome", 1)):
                left[stage] += count
            continue
        outcome = record["outcome"]
        models = [entry["model"] for entry in record["entries"]]
        if outcome is None:
            left["action"] += sum(not (results / "models" / m / "config.json").exists()
                                  and not (results / "models" / m / "failure.json").exists() for m in models)
            left["agent:outcome"] += 1
            built = models
        else:
            built = [m for m in models if outcome["models"].get(m, {}).get("status") != "failed"]
        left["evaluate:val"] += sum(not (results / "evals" / m / "val.json").exists() for m in built)
        left["score"] += sum(not (results / "scores" / f"{m}.json").exists() for m in built)
    if not (results / "report" / "topk.tsv").exists():
        # The top-k and the base model are evaluated on test and OOD at the end.
        left["evaluate:test"] = top_k + 1
        for stage in REPORT_JOBS:
            left[stage] = 1
    return left


def _mean_walls(jobs, config: dict) -> dict:
    """Mean wall seconds per stage of the finished jobs; every action type counts as one stage."""
    means = {}
    if jobs.empty:
        return means
    actions = jobs[jobs["stage"].str.startswith("action:")]
    if not actions.empty:
        means["action"] = float(actions["wall_s"].mean())
    for stage, wall in jobs.groupby("stage")["wall_s"].mean().items():
        means[stage] = float(wall)
    if "evaluate:test" not in means and "evaluate:val" in means:
        # Not run yet: a validation run scaled by the examples (test and OOD splits against val).
        data = config.get("data") or {}
        ratio = 2 * data.get("test_examples", 1) / max(1, data.get("val_examples", 1))
        means["evaluate:test"] = means["evaluate:val"] * ratio
    return means


def by_number(records: list[dict], iteration: int) -> dict | None:
    return next((record for record in records if record["iteration"] == iteration), None)


def _iteration_costs(records: list[dict], jobs) -> dict[int, float]:
    """Wall seconds of each agent iteration's finished jobs: propose, outcome, update_memory, and the
    action, validation and score of each model it made (a repeated recipe's jobs ran before)."""
    if jobs.empty:
        return {}
    wall = {(row.family, row.name): row.wall_s for row in jobs.itertuples()}
    costs = {}
    for record in records:
        i = record["iteration"]
        if i == 0:
            continue
        keys = [("agent", f"propose_{i}"), ("agent", f"outcome_{i}"), ("agent", f"memory_{i}")]
        for entry in record["entries"]:
            if entry.get("repeat_of") is None and is_built_id(entry["model"]):
                action, digest = entry["model"].split("-", 1)
                keys += [(action, digest), ("evaluate", f"{entry['model']}.val"), ("score", entry["model"])]
        costs[i] = float(sum(wall.get(key, 0.0) for key in keys))
    return costs


def _elapsed(bench_dir: Path, now: float, running: bool) -> float | None:
    """From the first job's start (its benchmark's time minus its wall seconds) to now (running) or
    the last job's end. A run stopped and resumed later counts the pause too."""
    starts, ends = [], []
    for path in bench_dir.rglob("*.tsv"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            wall = float(lines[1].split("\t")[0]) if len(lines) > 1 else 0.0
        except (OSError, ValueError):
            continue
        end = path.stat().st_mtime
        starts.append(end - wall)
        ends.append(end)
    if not starts:
        return None
    return (now if running else max(ends)) - min(starts)


def status(workdir: str | Path, config: dict | None, *, running_pids: list[int] = (), now: float | None = None) -> dict:
    """Everything ``lamdagent status`` shows, as one JSON-serialisable dict."""
    workdir = Path(workdir)
    results = workdir / "results"
    now = time.time() if now is None else now
    config = config or {}
    iterations = config.get("iterations")
    k = int(config.get("proposals_per_iteration", 1))
    top_k = int((config.get("report") or {}).get("top_k", 3))
    records = iteration_records(results / "agent")
    complete = [r["iteration"] for r in records if r["complete"] and r["iteration"] > 0]
    done = max(complete, default=0)
    last = next((r for r in reversed(records) if r["iteration"] > 0), None)
    running = bool(running_pids)
    finished = (iterations is not None and done >= iterations and (results / "report" / "topk.tsv").exists()
                and not running)
    if running:
        state = "running"
    elif finished:
        state = "finished"
    elif not records and not (results / "benchmarks").exists():
        state = "not started"
    else:
        state = "stopped"

    last_step = None
    if last is not None:
        last_step = {"iteration": last["iteration"], "steps": [
            {"model": entry["model"], "action": entry.get("action"), "objects": entry.get("objects"),
             "pipeline": entry.get("pipeline"), "state": _step_state(entry, last["outcome"], running),
             "score": _score(entry) if last["complete"] else None,
             **({"reason": entry["reason"]} if entry.get("reason") else {})}
            for entry in last["entries"]]}

    bench_dir = results / "benchmarks"
    jobs = read_benchmarks(bench_dir) if bench_dir.is_dir() else None
    left = _jobs_left(records, iterations, k, top_k, results)
    remaining_s, unknown, basis = None, [], None
    if left is not None and jobs is not None:
        means = _mean_walls(jobs, config)
        unknown = sorted(stage for stage, count in left.items() if count and stage not in means)
        remaining_s = sum(count * means.get(stage, 0.0) for stage, count in left.items())
        basis = "stages"
        per_iteration = _iteration_costs(records, jobs)
        finished_iterations = [cost for i, cost in per_iteration.items() if by_number(records, i)["complete"]]
        if finished_iterations and iterations is not None:
            # The agent's iterations cost what the finished ones did (their own jobs' wall time): the
            # initial pool's jobs, run side by side, would skew the per-stage means.
            mean = sum(finished_iterations) / len(finished_iterations)
            agent_s = 0.0
            for i in range(done + 1, iterations + 1):
                record = by_number(records, i)
                agent_s += mean if record is None else max(0.0, mean - per_iteration.get(i, 0.0))
            end_stages = ("evaluate:test", *REPORT_JOBS)
            remaining_s = agent_s + sum(left.get(stage, 0) * means.get(stage, 0.0) for stage in end_stages)
            unknown = [stage for stage in unknown if stage in end_stages]
            basis = "iterations"
    return {
        "directory": str(workdir.resolve()),
        "state": state,
        "snakemake_pids": list(running_pids),
        # The iteration under way (or the last one, once all are done), of N.
        "iteration": last["iteration"] if last is not None else 0,
        "iterations": iterations,
        "completed_iterations": done,
        "proposals_per_iteration": k,
        "best": _best(records),
        "last_step": last_step,
        "fallbacks": _fallbacks(records),
        "elapsed_s": _elapsed(bench_dir, now, running) if bench_dir.is_dir() else None,
        "jobs_finished": 0 if jobs is None else int(len(jobs)),
        "job_s": 0.0 if jobs is None else round(float(jobs["wall_s"].sum()), 3),
        "remaining_s": None if remaining_s is None else (0.0 if finished else round(remaining_s, 1)),
        "remaining_jobs": None if left is None else {stage: n for stage, n in left.items() if n},
        "estimate_missing": unknown,  # stages with jobs left but none finished yet (counted as 0 s)
        # iterations: the finished agent iterations' mean cost; stages: per-stage means (none finished yet)
        "estimate_basis": basis,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _objects(objects: dict | None) -> str:
    return ", ".join(f"{slot}={value}" for slot, value in (objects or {}).items())


def render(report: dict) -> str:
    """The text ``lamdagent status`` prints."""
    lines = []
    pids = report["snakemake_pids"]
    state = report["state"] + (f" (snakemake pid {', '.join(map(str, pids))})" if pids else "")
    lines.append(f"{report['directory']}: {state}")
    of = report["iterations"] if report["iterations"] is not None else "?"
    lines.append(f"iteration {report['iteration']} of {of} ({report['completed_iterations']} done, "
                 f"k = {report['proposals_per_iteration']} per iteration)")
    best = report["best"]
    lines.append("best so far: none scored yet" if best is None else
                 f"best so far: {best['pipeline']}  s_multi {best['s_multi']:.4f}  "
                 f"({best['model']}, iteration {best['iteration']})")
    step = report["last_step"]
    if step is None:
        lines.append("last step: none proposed yet")
    for entry in (step or {}).get("steps", []):
        score = f", s_multi {entry['score']:.4f}" if entry.get("score") is not None else ""
        reason = f": {entry['reason']}" if entry.get("reason") else ""
        lines.append(f"last step: iteration {step['iteration']}: {entry['action']}({_objects(entry['objects'])}) "
                     f"-> {entry['model']}: {entry['state']}{score}{reason}")
    fallbacks = report["fallbacks"]
    lines.append(f"fallbacks: type {fallbacks['type_selection']}, objects {fallbacks['object_selection']}, "
                 f"memory {fallbacks['memory_update']} (of {fallbacks['steps']} steps)")
    lines.append(f"elapsed: {_duration(report['elapsed_s'])} since the first job started "
                 f"({report['jobs_finished']} jobs finished, {_duration(report['job_s'])} of job time)")
    if report["remaining_s"] is None:
        left = "unknown (no finished job or plan length to go by)"
    else:
        jobs = sum((report["remaining_jobs"] or {}).values())
        basis = ("the finished iterations' mean" if report["estimate_basis"] == "iterations"
                 else "the finished jobs' mean time per stage")
        left = f"~{_duration(report['remaining_s'])} ({jobs} jobs to go, one after another, at {basis}"
        if report["estimate_missing"]:
            left += f"; none finished yet of {', '.join(report['estimate_missing'])}"
        left += ")"
    lines.append(f"time left: {left}")
    return "\n".join(lines) + "\n"
