"""The bodies of rules/models.smk: ``import_model``, the rule of every action (``build_model``: a
built-in or a custom action, run in its own child process) and ``restore_model`` (after ``keep_top_k``)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from lamdagent.store import tracking
from lamdagent.store.fileio import atomic_directory, atomic_write_json, read_json
from lamdagent.workflow.common import job_context, require_weights

SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"


def import_model(smk):
    from lamdagent.actions.models import import_embedded_smollm2, import_hub_model
    from lamdagent.lineage.clock import start_clock, stop_clock
    from lamdagent.lineage.records import record_base

    spec = dict(smk.params.spec)
    # Staged, lineage and card included, then renamed: a kill never leaves a base without its record.
    with job_context(smk), _staged_model(smk) as staged:
        clock = start_clock()
        if spec["source"] == "embedded":
            import_embedded_smollm2(staged)
        elif spec["source"] == "hub":
            import_hub_model(spec["repo"], staged, revision=spec.get("revision"), dtype=spec.get("dtype", "auto"))
        else:
            raise ValueError(f"models.{smk.wildcards.name}: source {spec['source']!r} needs no import")
        record_base(staged, smk.wildcards.name, spec, stop_clock(clock), final_dir=smk.output.model)


def _store_recipe(smk, staged, recipe: dict, usage: dict, **run) -> dict:
    """recipe.json, lineage.json and the model card (README.md) into the staging directory ``staged``
    that becomes the model directory: a kill at any moment leaves the model whole or absent."""
    from lamdagent.actions.registry import action_spec
    from lamdagent.lineage.records import record_model

    slots = action_spec(recipe["action"]).slots
    parents = {s.name: getattr(smk.input, s.name) for s in slots if s.kind == "model"}
    datasets = {s.name: getattr(smk.input, s.name) for s in slots if s.is_dataset}
    return record_model(staged, recipe, parents=parents, datasets=datasets, config=smk.config, usage=usage,
                        final_dir=smk.output.model, **run)


def _run_action(smk, action: str, call: str, kwargs: dict, *, gpus: int = 0) -> dict | None:
    """Run the action (``call``: lamdagent.<module>:<function>) in a child process under the rule's deadline.

    Returns its metrics; or, when the action failed, writes the output directory with
    ``failure.json`` only and returns None (see ``lamdagent.actions.failures``: what is recorded, what is retried).
    """
    from lamdagent.actions import failures
    from lamdagent.actions.launch import distributed_command
    from lamdagent.actions.registry import action_spec

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
    command = distributed_command(gpus, "lamdagent.actions.failures", args)
    if command is None:  # 0 or 1 GPU: one child process
        command = [sys.executable, "-m", "lamdagent.actions.failures", *args]
    # The child imports this package the way this job did, even from a bare conda env.
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    deadline = failures.deadline_s(getattr(smk.resources, "runtime", None), settings["time_margin_s"])
    print("launching:", " ".join(command), f"(deadline {deadline} s)", flush=True)
    started = time.monotonic()
    try:
        return failures.run_action(command, metrics_json=files["metrics"], failure_json=files["failure"],
                                   deadline=deadline, out_dir=out_dir, env=env, config=smk.config,
                                   resources=smk.resources)
    except failures.ActionFailed as failed:
        failures.write_failure(out_dir, failures.failure_record(kind=failed.kind, reason=failed.reason,
                                                                elapsed_s=time.monotonic() - started,
                                                                deadline=deadline, **record))
        print(f"[lamdagent] {action} failed ({failed.kind}): {failed.reason}; recorded in {out_dir}/failure.json",
              flush=True)
        return None


def build_model(smk):
    """Every action's rule (named after the action): its family says how the recipe is run."""
    from lamdagent.actions.registry import action_spec, register_custom_actions

    register_custom_actions(smk.config)  # this job is a process of its own: the registry starts with the built-ins
    family = action_spec(smk.rule).family
    {"train": _train, "merge": _merge, "custom": _custom}[family](smk)


def _train(smk):
    """sft, sft_lora and dpo: one child process on 0 or 1 GPU, one torchrun worker per GPU on more."""
    from lamdagent.actions.launch import gpu_count
    from lamdagent.lineage.clock import start_clock, stop_clock
    from lamdagent.lineage.rebuild import TRAIN_METHOD, sft_kwargs

    recipe = read_json(smk.input.recipe)
    method = TRAIN_METHOD[recipe["action"]]
    curves = tracking.trainer_tracking(smk.config, Path(smk.output.model).name)
    require_weights(smk.input.model)
    with job_context(smk), _staged_model(smk) as staged:
        # The same mapping from recipe to trainer arguments that `lamdagent rebuild` uses.
        kwargs = sft_kwargs(recipe, smk.input.model, smk.input.dataset, str(staged))
        if curves is not None:  # where the trainer reports its curves; not part of the recipe
            kwargs["tracking"] = curves
        clock = start_clock()
        gpus = gpu_count(smk.resources)
        metrics = _run_action(smk, recipe["action"], f"lamdagent.actions.train:{method}", kwargs, gpus=gpus)
        if metrics is None:
            raise _ActionRecorded
        print(f"{recipe['action']} metrics: {metrics}")
        cuda = metrics.get("hardware", {}).get("torch_device") == "cuda"
        _store_recipe(smk, staged, recipe, stop_clock(clock), device="cuda" if cuda else "cpu",
                      precision=metrics["precision"], processes=1 if gpus <= 1 else gpus,
                      gpus=max(gpus, 1) if cuda else 0, metrics=metrics)


def _merge(smk):
    """Every mergekit action: the recipe names the method and its parameters."""
    from lamdagent.actions.registry import action_spec
    from lamdagent.lineage.clock import start_clock, stop_clock
    from lamdagent.lineage.rebuild import merge_kwargs, merge_precision

    recipe = read_json(smk.input.recipe)
    parents = {s.name: getattr(smk.input, s.name) for s in action_spec(recipe["action"]).slots if s.kind == "model"}
    require_weights(*parents.values())
    with job_context(smk), _staged_model(smk) as staged:
        clock = start_clock()
        metrics = _run_action(smk, recipe["action"], "lamdagent.actions.merge:merge",
                              merge_kwargs(recipe, parents, str(staged)))
        if metrics is None:
            raise _ActionRecorded
        metrics["out_dir"] = str(smk.output.model)  # not the staging directory it was written to
        print(f"merge metrics: {metrics}")
        _store_recipe(smk, staged, recipe, stop_clock(clock), device=metrics["device"],
                      precision=merge_precision(recipe["params"]["dtype"]), gpus=int(metrics["device"] != "cpu"),
                      metrics=metrics)


def _custom(smk):
    """A custom action (config's custom_actions): its command or entry point in the child process, into a
    staging directory that becomes the model directory, lineage included, by one rename."""
    from lamdagent.actions import custom
    from lamdagent.actions.launch import gpu_count
    from lamdagent.actions.registry import action_spec
    from lamdagent.lineage.clock import start_clock, stop_clock

    recipe = read_json(smk.input.recipe)
    spec = action_spec(recipe["action"])
    parents = {s.name: getattr(smk.input, s.name) for s in spec.slots if s.kind == "model"}
    datasets = {s.name: getattr(smk.input, s.name) for s in spec.slots if s.is_dataset}
    require_weights(*parents.values())
    with job_context(smk):
        custom.verify_code(spec.name, recipe["code"])
        clock = start_clock()
        gpus = gpu_count(smk.resources)
        with _staged_model(smk) as staged:
            kwargs = dict(code=recipe["code"], values=custom.action_values(recipe, spec, parents, datasets),
                          output=str(staged), seed=recipe["seed"], threads=max(1, int(smk.threads or 1)),
                          gpus=gpus, workdir=os.getcwd())
            # One child process; the command itself starts more (torchrun, accelerate) where it wants.
            metrics = _run_action(smk, spec.name, "lamdagent.actions.custom:run", kwargs)
            if metrics is None:  # recorded as a failed step in the model directory
                raise _ActionRecorded
            print(f"{spec.name} metrics: {metrics}")
            # The action's own code decides the device; the rule's GPUs say what it could use.
            lineage = _store_recipe(smk, staged, recipe, stop_clock(clock), device="cuda" if gpus else "cpu",
                                    precision=metrics.get("precision", "unknown"), gpus=gpus, metrics=metrics)
            print(f"lineage: {spec.name} code {recipe['code']['sha256'][:12]}, {len(lineage['files'])} files")


class _ActionRecorded(Exception):
    """Leaves the staging of an action whose failure ``_run_action`` has recorded."""


@contextlib.contextmanager
def _staged_model(smk):
    """A staging directory that becomes ``smk.output.model`` by one rename once the weights and the job's
    records are in it; dropped (a recorded failure stays) if the action failed.

    It holds Snakemake's ``.snakemake_timestamp`` (by which Snakemake dates a directory output; it
    touches it again after the job): a run killed between the rename and Snakemake's record of the job
    leaves the model complete and dated, and the next run, which may not rebuild it (Snakemake passes
    over the incomplete marker of an output behind the agent's checkpoints), reads it as it is."""
    try:
        with atomic_directory(smk.output.model) as staged:
            yield staged
            (Path(staged) / SNAKEMAKE_TIMESTAMP).touch()
    except _ActionRecorded:
        pass


def restore_model(smk):
    from lamdagent.lineage.prune import restore, write_restored

    local = {name: spec["path"] for name, spec in smk.config["models"].items() if spec.get("source") == "local"}
    with job_context(smk):
        rebuilt = restore(smk.wildcards.model, results="results", config=smk.config, model_dirs=local)
        write_restored(smk.output.restored, smk.wildcards.model, rebuilt)
