"""The bodies of rules/agent.smk: the pool, the steps of the exploration, the memory."""

from __future__ import annotations

from pathlib import Path

from lamdagent.store import tracking
from lamdagent.store.fileio import atomic_write_json, atomic_write_text, read_json, write_jsonl
from lamdagent.workflow.common import job_context


def init_pool(smk):
    from lamdagent.agent.objects import Pool
    from lamdagent.data.datasets import dataset_entry
    from lamdagent.store.recipes import RecipeStore

    with job_context(smk):
        datasets = {Path(path).stem: dataset_entry(path) for path in smk.input.datasets}
        pool = Pool.initial(smk.config, datasets, RecipeStore("results/recipes"))
        atomic_write_json(smk.output.pool, pool.to_json())
        tracking.prepare(smk.config)  # before any model is built: the trainers all log to it


def _controller(smk):
    from lamdagent.agent.controller import make_controller

    model_dir = smk.input.get("controller_model")
    return make_controller(smk.config["controller"], model_dir=model_dir, seed=smk.config["seed"])


def _load_pool_and_history(smk, upto: int):
    from lamdagent.agent.objects import Pool
    from lamdagent.agent.plan import history_entries, load_steps

    pool = Pool.from_json(read_json("results/agent/pool.json"))
    initial, steps = load_steps("results/agent", upto)
    history = history_entries(initial, steps)
    # Models the agent made join the pool; a failed action made none, and a failed initial model leaves it.
    pool = pool.with_models([e["model"] for e in history if e["iteration"] and e.get("status") == "done"])
    pool = pool.without_models([h["model"] for h in history if h.get("status") == "failed"])
    return pool, history


def _apply_outcome(record: dict, outcome: dict, config: dict, scores: dict[str, dict]) -> dict:
    """Complete a step record (an initial model or an agent step) from the outcome of its action:
    the score, or the failure (reason, log tail) with the configured failure score."""
    from lamdagent.evaluation.score import failure_score

    entry = outcome["models"].get(record["model"], {"status": "done"})
    if entry["status"] == "failed":
        failure = entry["failure"]
        record.update(status="failed", action=record.get("action") or failure["action"], reason=failure["reason"],
                      failure={key: failure[key] for key in ("kind", "reason", "log", "log_tail")},
                      score=failure_score(config))
    else:
        record.update(status="done", score=scores[record["model"]])
    return record


def outcome(smk):
    """Whether each built model of the step exists or its action failed (``failure.json``)."""
    from lamdagent.actions.failures import read_failure

    with job_context(smk):
        models = {}
        for model_dir in smk.input.models:
            failure = read_failure(model_dir)
            models[Path(model_dir).name] = {"status": "failed" if failure else "done", "failure": failure}
        atomic_write_json(smk.output.outcome, {"iteration": int(smk.wildcards.iteration), "models": models})
        print(f"outcome of iteration {smk.wildcards.iteration}:",
              {model: entry["status"] for model, entry in models.items()})


def initial_step(smk):
    from lamdagent.actions.recipe import pipeline_text
    from lamdagent.agent.objects import Pool
    from lamdagent.agent.plan import write_plan
    from lamdagent.lineage.prune import prune_after_step
    from lamdagent.store.recipes import RecipeStore

    store = RecipeStore("results/recipes")
    with job_context(smk):
        pool = Pool.from_json(read_json(smk.input.pool))
        outcome = read_json(smk.input.outcome)
        scores = {Path(path).stem: read_json(path) for path in smk.input.scores}
        entries = []
        for model in pool.initial_models:
            entries.append(_apply_outcome({
                "model": model,
                "name": pool.labels.get(model),
                "pipeline": pool.label(model),
                "pipeline_full": pipeline_text(model, store, pool.labels, full=True),
            }, outcome, smk.config, scores))
        pruned = prune_after_step(smk.config, "results", entries, 0)
        atomic_write_json(smk.output.step, {"iteration": 0, "initial": entries, "pruned": pruned})
        atomic_write_text(smk.output.memory, smk.config["memory"]["initial"].strip() + "\n")
        write_plan("results/agent", "results/plan.yaml")
        tracking.log_steps(smk.config, [dict(entry, iteration=0) for entry in entries])


def propose(smk):
    from lamdagent.agent.fallbacks import check_fallback_rate
    from lamdagent.agent.plan import iteration_record, write_plan
    from lamdagent.agent.propose import CallLog, propose_many
    from lamdagent.store.recipes import RecipeStore

    iteration = int(smk.wildcards.iteration)
    k = smk.config["proposals_per_iteration"]
    with job_context(smk):
        pool, history = _load_pool_and_history(smk, iteration - 1)
        memory = Path(smk.input.memory).read_text(encoding="utf-8").strip()
        log = CallLog()
        records = propose_many(k=k, iteration=iteration, config=smk.config, pool=pool, history=history, memory=memory,
                               controller=_controller(smk), store=RecipeStore("results/recipes"), log=log)
        for record in records:
            record["status"] = "proposed"
        # Before anything is written: a run that mostly falls back stops here, not N iterations later.
        check_fallback_rate(smk.config, history + records, log.calls)
        write_jsonl(smk.output.calls, log.calls)
        atomic_write_json(smk.output.proposal, iteration_record(iteration, records, k))
        write_plan("results/agent", "results/plan.yaml")
        for record in records:
            print(f"iteration {iteration}: {record['pipeline']} -> {record['model']} (fallback {record['fallback']})")


def update_memory(smk):
    from lamdagent.agent.fallbacks import check_fallback_rate
    from lamdagent.agent.memory import update_memory as run_update
    from lamdagent.agent.plan import iteration_record, step_entries, write_plan
    from lamdagent.agent.propose import CallLog
    from lamdagent.lineage.prune import prune_after_step

    iteration = int(smk.wildcards.iteration)
    k = smk.config["proposals_per_iteration"]
    with job_context(smk):
        _, history = _load_pool_and_history(smk, iteration - 1)
        outcome = read_json(smk.input.outcome)
        scores = {Path(path).stem: read_json(path) for path in smk.input.scores}
        records = [_apply_outcome(record, outcome, smk.config, scores)
                   for record in step_entries(read_json(smk.input.proposal))]
        memory = Path(smk.input.memory).read_text(encoding="utf-8").strip()
        log = CallLog()
        # All k results of the iteration feed one rewrite of the memory.
        new_memory, fallback = run_update(config=smk.config, memory=memory, history=history,
                                          new=records[0] if k == 1 else records, controller=_controller(smk), log=log)
        for record in records:
            record["fallback"]["memory_update"] = fallback
        check_fallback_rate(smk.config, history + records, log.calls)
        write_jsonl(smk.output.calls, log.calls)
        atomic_write_text(smk.output.memory, new_memory.strip() + "\n")
        # Before the step is written: the next proposal sees only what is left.
        pruned = prune_after_step(smk.config, "results", history + records, iteration)
        atomic_write_json(smk.output.step, iteration_record(iteration, records, k, calls_memory=log.totals(),
                                                            pruned=pruned))
        write_plan("results/agent", "results/plan.yaml")
        tracking.log_steps(smk.config, records)  # after the step is recorded: a kill never logs it twice
