"""The body of every Snakemake rule: ``scripts/<rule>.py`` calls ``jobs.<rule>(snakemake)``.

Each job sends its output (Python and C level, subprocesses included) to the rule's log file and
limits torch to the rule's threads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from . import tracking
from .fileio import atomic_directory, atomic_write_json, atomic_write_text, read_json, write_jsonl


@contextlib.contextmanager
def job_context(smk):
    """Redirect fds 1 and 2 to the rule's log and pin torch's thread count; register config's custom actions."""
    from .actions import register_custom_actions

    # A job is a process of its own: its registry starts with the built-ins until config's are added.
    register_custom_actions(getattr(smk, "config", None) or {})
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            threads = max(1, int(getattr(smk, "threads", 1) or 1))
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            if "torch" in sys.modules or _wants_torch(smk):
                import torch

                torch.set_num_threads(threads)
            print(f"[lamdagent] {smk.rule} started {time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)
            try:
                yield
            except Exception as exc:  # the reason goes to the rule's log too, not only to Snakemake's output
                print(f"[lamdagent] {smk.rule} failed: {type(exc).__name__}: {exc}", flush=True)
                raise
            print(f"[lamdagent] {smk.rule} finished {time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _wants_torch(smk) -> bool:
    from .actions import ACTIONS

    # Importing torch costs ~2 s of CPU per job: the agent rules need it only for a local LLM controller.
    if smk.rule in {"propose", "update_memory"}:
        return smk.config["controller"]["type"] == "transformers"
    return smk.rule in {*ACTIONS, "import_model", "restore_model", "evaluate"}


# ---- data -------------------------------------------------------------------------------------


def generate_task(smk):
    from .tasks import write_splits

    with job_context(smk):
        write_splits(smk.wildcards.task, Path(smk.output.train).parent, dict(smk.params.sizes), smk.params.seed)


def prepare_eval_task(smk):
    from .eval_data import prepare

    with job_context(smk):
        manifest = prepare(dict(smk.params.spec), smk.output.tasks, dict(smk.params.data), smk.params.seed)
        print(f"prepared {smk.wildcards.task}: " + ", ".join(f"{split} {entry['rows']} rows"
                                                           for split, entry in manifest["splits"].items()))


def fetch_lm_eval_task(smk):
    from .evaluate import fetch_task

    with job_context(smk):
        entry = fetch_task(smk.wildcards.lm_task, list(smk.params.include_paths), smk.output.docs)
        print(f"fetched lm-eval task {entry['task']}: {entry['docs']} docs into {entry['hf_datasets_cache']}")


def prepare_dataset(smk):
    from .datasets import prepare

    with job_context(smk):
        entry = prepare(dict(smk.params.spec), smk.output.dataset, task_train_files=list(smk.input.get("tasks", [])))
        print(f"prepared {smk.wildcards.dataset}: {entry}")


# ---- models -----------------------------------------------------------------------------------


def import_model(smk):
    from .models import import_embedded_smollm2, import_hub_model

    from .lineage import record_base, start_clock, stop_clock

    spec = dict(smk.params.spec)
    # Staged, lineage and card included, then renamed: a kill never leaves a base without its record.
    with job_context(smk), atomic_directory(smk.output.model) as staged:
        clock = start_clock()
        if spec["source"] == "embedded":
            import_embedded_smollm2(staged)
        elif spec["source"] == "hub":
            import_hub_model(spec["repo"], staged, revision=spec.get("revision"), dtype=spec.get("dtype", "auto"))
        else:
            raise ValueError(f"models.{smk.wildcards.name}: source {spec['source']!r} needs no import")
        record_base(staged, smk.wildcards.name, spec, stop_clock(clock), final_dir=smk.output.model)


def _store_recipe(smk, recipe: dict, usage: dict, **run) -> None:
    """recipe.json, lineage.json and the model card (README.md), once the model directory is in place."""
    from .actions import action_spec
    from .lineage import record_model

    slots = action_spec(recipe["action"]).slots
    parents = {s.name: getattr(smk.input, s.name) for s in slots if s.kind == "model"}
    datasets = {s.name: getattr(smk.input, s.name) for s in slots if s.is_dataset}
    record_model(smk.output.model, recipe, parents=parents, datasets=datasets, config=smk.config, usage=usage, **run)


def _run_action(smk, action: str, call: str, kwargs: dict, *, gpus: int = 0) -> dict | None:
    """Run the action (``call``: lamdagent.<module>:<function>) in a child process under the rule's deadline.

    Returns its metrics; or, when the action failed, writes the output directory with
    ``failure.json`` only and returns None (see ``lamdagent.failures``: what is recorded, what is retried).
    """
    from . import failures
    from .actions import action_spec
    from .launch import distributed_command

    settings = smk.config["failures"]
    out_dir = Path(smk.output.model)
    record = dict(model=out_dir.name, action=action, log_path=smk.log[0], log_lines=settings["log_tail_lines"])
    # A parent that failed (possible only for models named in config) fails this action too, unrun.
    for slot in action_spec(action).slots:
        parent = failures.read_failure(getattr(smk.input, slot.name)) if slot.kind == "model" else None
        if parent is not None:
            failures.write_failure(out_dir, failures.failure_record(
                kind="input_failed", reason=f"its input model {parent['model']} failed: {parent['reason']}", **record))
            print(f"[lamdagent] {action} not run: input {parent['model']} failed", flush=True)
            return None
    stem = Path(smk.log[0]).with_suffix("")
    files = {name: f"{stem}.{name}.json" for name in ("args", "metrics", "failure")}
    atomic_write_json(files["args"], kwargs)
    args = failures.child_command(call, files["args"], files["metrics"], files["failure"],
                                  threads=max(1, int(smk.threads or 1)))
    command = distributed_command(gpus, "lamdagent.failures", args)
    if command is None:  # 0 or 1 GPU: one child process
        command = [sys.executable, "-m", "lamdagent.failures", *args]
    # The child imports this package the way this job did, even from a bare conda env.
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    deadline = failures.deadline_s(getattr(smk.resources, "runtime", None), settings["time_margin_s"])
    print("launching:", " ".join(command), f"(deadline {deadline} s)", flush=True)
    started = time.monotonic()
    try:
        return failures.run_action(command, metrics_json=files["metrics"], failure_json=files["failure"],
                                   deadline=deadline, out_dir=out_dir, env=env)
    except failures.ActionFailed as failed:
        failures.write_failure(out_dir, failures.failure_record(kind=failed.kind, reason=failed.reason,
                                                                elapsed_s=time.monotonic() - started,
                                                                deadline=deadline, **record))
        print(f"[lamdagent] {action} failed ({failed.kind}): {failed.reason}; recorded in {out_dir}/failure.json",
              flush=True)
        return None


def build_model(smk):
    """Every action's rule (named after the action): its family says how the recipe is run."""
    from .actions import action_spec, register_custom_actions

    register_custom_actions(smk.config)  # this job is a process of its own: the registry starts with the built-ins
    family = action_spec(smk.rule).family
    {"train": _train, "merge": _merge, "custom": _custom}[family](smk)


def _train(smk):
    """sft, sft_lora and dpo: one child process on 0 or 1 GPU, one torchrun worker per GPU on more."""
    from .launch import gpu_count
    from .lineage import TRAIN_METHOD, sft_kwargs, start_clock, stop_clock

    recipe = read_json(smk.input.recipe)
    method = TRAIN_METHOD[recipe["action"]]
    # The same mapping from recipe to trainer arguments that `lamdagent rebuild` uses.
    kwargs = sft_kwargs(recipe, smk.input.model, smk.input.dataset, smk.output.model)
    curves = tracking.trainer_tracking(smk.config, Path(smk.output.model).name)
    if curves is not None:  # where the trainer reports its curves; not part of the recipe
        kwargs["tracking"] = curves
    _require_weights(smk.input.model)
    with job_context(smk):
        clock = start_clock()
        gpus = gpu_count(smk.resources)
        metrics = _run_action(smk, recipe["action"], f"lamdagent.train:{method}", kwargs, gpus=gpus)
        if metrics is None:
            return
        print(f"{recipe['action']} metrics: {metrics}")
        import torch

        cuda = torch.cuda.is_available()
        _store_recipe(smk, recipe, stop_clock(clock), device="cuda" if cuda else "cpu", precision=metrics["precision"],
                      processes=1 if gpus <= 1 else gpus, gpus=max(gpus, 1) if cuda else 0, metrics=metrics)


def _merge(smk):
    """Every mergekit action: the recipe names the method and its parameters."""
    from .actions import action_spec
    from .lineage import merge_kwargs, merge_precision, start_clock, stop_clock

    recipe = read_json(smk.input.recipe)
    parents = {s.name: getattr(smk.input, s.name) for s in action_spec(recipe["action"]).slots if s.kind == "model"}
    _require_weights(*parents.values())
    with job_context(smk):
        clock = start_clock()
        metrics = _run_action(smk, recipe["action"], "lamdagent.merge:merge", merge_kwargs(recipe, parents,
                                                                                          smk.output.model))
        if metrics is None:
            return
        print(f"merge metrics: {metrics}")
        _store_recipe(smk, recipe, stop_clock(clock), device=metrics["device"],
                      precision=merge_precision(recipe["params"]["dtype"]), gpus=int(metrics["device"] != "cpu"),
                      metrics=metrics)


def _custom(smk):
    """A custom action (config's custom_actions): its command or entry point in the child process, into a
    staging directory that becomes the model directory, lineage included, by one rename."""
    from . import custom
    from .actions import action_spec
    from .launch import gpu_count
    from .lineage import start_clock, stop_clock

    recipe = read_json(smk.input.recipe)
    spec = action_spec(recipe["action"])
    parents = {s.name: getattr(smk.input, s.name) for s in spec.slots if s.kind == "model"}
    datasets = {s.name: getattr(smk.input, s.name) for s in spec.slots if s.is_dataset}
    _require_weights(*parents.values())
    with job_context(smk):
        custom.verify_code(spec.name, recipe["code"])
        clock = start_clock()
        gpus = gpu_count(smk.resources)
        try:
            with atomic_directory(smk.output.model) as staged:
                kwargs = dict(code=recipe["code"], values=custom.action_values(recipe, spec, parents, datasets),
                              output=str(staged), seed=recipe["seed"], threads=max(1, int(smk.threads or 1)),
                              gpus=gpus, workdir=os.getcwd())
                # One child process; the command itself starts more (torchrun, accelerate) where it wants.
                metrics = _run_action(smk, spec.name, "lamdagent.custom:run", kwargs)
                if metrics is None:  # recorded as a failed step in the model directory
                    raise _ActionRecorded
                print(f"{spec.name} metrics: {metrics}")
                lineage = _lineage_of(smk, recipe, staged, stop_clock(clock), gpus=gpus, metrics=metrics)
                print(f"lineage: {spec.name} code {recipe['code']['sha256'][:12]}, {len(lineage['files'])} files")
        except _ActionRecorded:
            return


class _ActionRecorded(Exception):
    """Leaves the staging of a custom action whose failure ``_run_action`` has recorded."""


def _lineage_of(smk, recipe: dict, staged, usage: dict, *, gpus: int, metrics: dict) -> dict:
    from .actions import action_spec
    from .lineage import record_model

    slots = action_spec(recipe["action"]).slots
    device = "cuda" if gpus else "cpu"  # the action's own code decides; the rule's GPUs say what it could use
    return record_model(staged, recipe, parents={s.name: getattr(smk.input, s.name) for s in slots if s.kind == "model"},
                        datasets={s.name: getattr(smk.input, s.name) for s in slots if s.is_dataset},
                        config=smk.config, usage=usage, device=device, precision=metrics.get("precision", "unknown"),
                        gpus=gpus, metrics=metrics, final_dir=smk.output.model)


def restore_model(smk):
    from .prune import restore, write_restored

    local = {name: spec["path"] for name, spec in smk.config["models"].items() if spec.get("source") == "local"}
    with job_context(smk):
        rebuilt = restore(smk.wildcards.model, results="results", config=smk.config, model_dirs=local)
        write_restored(smk.output.restored, smk.wildcards.model, rebuilt)


def _require_weights(*model_dirs) -> None:
    """A pruned input (keep_top_k) is restored by rule restore_model before its consumers run;
    reaching here without weights means that flag is stale, so say how to get them back."""
    from .prune import is_pruned

    for model_dir in model_dirs:
        if is_pruned(model_dir):
            name = Path(model_dir).name
            raise RuntimeError(f"{model_dir}: its weights were removed by keep_top_k; rebuild them with "
                               f"`snakemake --force results/restored/{name}/user.json`")


# ---- evaluation -------------------------------------------------------------------------------


def evaluate(smk):
    from .contamination import ContaminationError, check_deferred
    from .evaluate import evaluate as run_evaluate, offline_if_fetched
    from .failures import read_failure
    from .lineage import start_clock, stop_clock

    # The tasks and the settings that determine the result come from params (the rule's rerun trigger).
    settings = {**smk.config["evaluation"], **smk.params.settings}
    tasks = list(smk.params.tasks)
    _require_weights(smk.input.model)
    with job_context(smk):
        failure = read_failure(smk.input.model)
        if failure is not None:  # the workflow never asks for it; an explicit target gets a clear error
            raise ValueError(f"{smk.input.model} holds no model: its action failed ({failure['reason']})")
        # Before datasets is imported (its offline switch is read then), by the guard or by lm-eval.
        offline_if_fetched(smk.input.get("lm_eval_data", []))
        # What parse time could not read (lm-eval documents, hub data not prepared yet) is checked by
        # the first evaluation job, which stops the exploration on an overlap (and records it for the next parse).
        try:
            check_deferred(smk.config)
        except ContaminationError as err:
            print(err, flush=True)  # in the log, which Snakemake shows when the job fails
            raise
        clock = start_clock()
        # Our file tasks' YAMLs (results/eval_tasks/<task>/) and the user's own task directories.
        include = [str(path) for path in smk.input.get("tasks", [])] + list(settings["include_paths"])
        run_evaluate(smk.input.model, tasks, smk.output.evaluation, batch_size=settings["batch_size"],
                     device=settings["device"], dtype=settings["dtype"], backend=settings["backend"],
                     limit=settings["limit"], seed=settings["seed"], extra_include_paths=include,
                     usage=lambda: stop_clock(clock))


def judge(smk):
    from .judge import judge_evaluation

    failed = Path(smk.log[0]).with_suffix(".failed.json")
    with job_context(smk):
        result = judge_evaluation(smk.input.answers, smk.output.evaluation, dict(smk.params.judged),
                                  dict(smk.params.judge), seed=smk.config["seed"], failed_json=failed)
        print("judged: " + ", ".join(f"{task} {result['tasks'][task]['rating,judge']:.2f}"
                                     for task in smk.params.judged), flush=True)


def score(smk):
    from .score import score as compute_score

    from .lineage import refresh_card

    with job_context(smk):
        result = compute_score(read_json(smk.input.evaluation), smk.params.eval_tasks, "val")
        result["model"] = smk.wildcards.model
        atomic_write_json(smk.output.score, result)
        if smk.params.card_dir and refresh_card(smk.params.card_dir, {"validation": result}):
            print(f"model card of {smk.params.card_dir} now shows the validation scores")


# ---- agent ------------------------------------------------------------------------------------


def init_pool(smk):
    from .datasets import dataset_entry
    from .objects import Pool
    from .recipe import RecipeStore

    with job_context(smk):
        datasets = {Path(path).stem: dataset_entry(path) for path in smk.input.datasets}
        pool = Pool.initial(smk.config, datasets, RecipeStore("results/recipes"))
        atomic_write_json(smk.output.pool, pool.to_json())
        tracking.prepare(smk.config)  # before any model is built: the trainers all log to it


def _controller(smk):
    from .controller import make_controller

    model_dir = smk.input.get("controller_model")
    return make_controller(smk.config["controller"], model_dir=model_dir, seed=smk.config["seed"])


def _load_pool_and_history(smk, upto: int):
    from .objects import Pool
    from .plan import history_entries, load_steps

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
    from .score import failure_score

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
    from .failures import read_failure

    with job_context(smk):
        models = {}
        for model_dir in smk.input.models:
            failure = read_failure(model_dir)
            models[Path(model_dir).name] = {"status": "failed" if failure else "done", "failure": failure}
        atomic_write_json(smk.output.outcome, {"iteration": int(smk.wildcards.iteration), "models": models})
        print(f"outcome of iteration {smk.wildcards.iteration}:",
              {model: entry["status"] for model, entry in models.items()})


def initial_step(smk):
    from .objects import Pool
    from .plan import write_plan
    from .prune import prune_after_step
    from .recipe import RecipeStore, pipeline_text

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
    from .agent import CallLog, propose_many
    from .fallbacks import check_fallback_rate
    from .plan import iteration_record, write_plan
    from .recipe import RecipeStore

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
    from .agent import CallLog
    from .fallbacks import check_fallback_rate
    from .memory import update_memory as run_update
    from .plan import iteration_record, step_entries, write_plan
    from .prune import prune_after_step

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


# ---- report -----------------------------------------------------------------------------------


def leaderboard(smk):
    from .report import leaderboard_table

    with job_context(smk):
        table = leaderboard_table([read_json(p) for p in smk.input.steps])
        atomic_write_text(smk.output.leaderboard, table.to_csv(sep="\t", index=False))


def topk(smk):
    import pandas as pd

    from .lineage import refresh_card
    from .report import topk_table
    from .score import score as compute_score

    with job_context(smk):
        board = pd.read_csv(smk.input.leaderboard, sep="\t")
        evals = {Path(p).parent.name: read_json(p) for p in smk.input.evals}
        table = topk_table(board, evals, smk.config["eval_tasks"], smk.config["report"]["top_k"])
        atomic_write_text(smk.output.topk, table.to_csv(sep="\t", index=False))
        # The reported models' cards gain their test and OOD scores beside the validation ones.
        validation = {Path(p).stem: read_json(p) for p in smk.input.scores}
        for model, evaluation in evals.items():
            # Named models may live outside results/ (a user's directory: card_dir is empty, never written).
            card_dir = smk.params.card_dirs.get(model, f"{smk.params.models_dir}/{model}")
            if card_dir and model in validation:
                refresh_card(card_dir, {"validation": validation[model],
                                        "test": compute_score(evaluation, smk.config["eval_tasks"], "test")})
