"""Experiment tracking (config ``tracking``): training curves and one run per agent step.

Training curves go through trl's own ``report_to`` (the trainer's TensorBoard callback), one run per
built model. Each step of the plan (an initial model or an agent step) is also logged as a run once
its ``step.json`` is written: the recipe as hyper-parameters, the validation scores as metrics
(step = the iteration) and the model directory as the run's model URI. The weights are not copied:
a 2B model is GBs, and they are already in results/models.

``tensorboard`` writes event files under ``tracking.dir`` (default ``results/tracking/tensorboard``):
``tensorboard --logdir results/tracking/tensorboard`` shows them, offline. The step runs are
written with TensorBoard's own protos (no torch import in the agent's jobs).

What is logged comes from recipes, scores and the trainer's arguments only: never the environment
nor the controller's settings, so no API key reaches a tracker.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

BACKENDS = ("none", "tensorboard")
DEFAULT_DIR = "results/tracking/tensorboard"


def settings(config: dict) -> dict:
    """The ``tracking`` section with its defaults (backend none: nothing is logged)."""
    spec = dict(config.get("tracking") or {})
    spec.setdefault("backend", "none")
    spec.setdefault("dir", DEFAULT_DIR)
    spec.setdefault("training_curves", True)
    return spec


def enabled(config: dict) -> bool:
    return settings(config)["backend"] != "none"


def trainer_tracking(config: dict, model: str) -> dict | None:
    """What a training child process needs to report its curves (JSON, passed in its arguments)."""
    spec = settings(config)
    if spec["backend"] == "none" or not spec["training_curves"]:
        return None
    return {"backend": spec["backend"], "run_name": model,
            "dir": str(Path(spec["dir"]).resolve() / "train" / model)}


def report_to(tracking: dict | None) -> tuple[str, str | None]:
    """(trl's ``report_to``, ``run_name``) for a training run, configuring the callback through the
    environment variables transformers reads (this is the training child process: nothing else sees
    them). A retried job starts its curves afresh."""
    if not tracking:
        return "none", None
    if tracking["backend"] == "tensorboard":
        if int(os.environ.get("RANK", "0")) == 0 and os.path.isdir(tracking["dir"]):
            shutil.rmtree(tracking["dir"])
        os.environ["TENSORBOARD_LOGGING_DIR"] = tracking["dir"]
    return tracking["backend"], tracking["run_name"]


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (bool, int, float, str)) or value is None:
        out[prefix] = "None" if value is None else value
    else:
        out[prefix] = json.dumps(value)


def step_params(entry: dict, recipe: dict | None) -> dict:
    """A step's hyper-parameters: what the agent chose and the recipe it made (flat, scalar values)."""
    params: dict = {}
    for key in ("iteration", "model", "action", "pipeline", "status", "repeat_of"):
        if key in entry:
            _flat(key, entry[key], params)
    _flat("objects", entry.get("objects") or {}, params)
    if recipe:
        _flat("recipe", {key: recipe[key] for key in ("action", "inputs", "params", "seed") if key in recipe}, params)
    return params


def step_metrics(entry: dict) -> dict:
    """The validation scores: s_multi and each task's (a failed action: the failure score only)."""
    score = entry.get("score") or {}
    metrics = {}
    if "s_multi" in score:
        metrics["val/s_multi"] = float(score["s_multi"])
    for task, value in (score.get("tasks") or {}).items():
        number = value.get("score") if isinstance(value, dict) else value
        if isinstance(number, (int, float)):
            metrics[f"val/{task}"] = float(number)
    return metrics


def step_run_name(entry: dict) -> str:
    index = f".{entry['index']}" if "index" in entry else ""
    return f"iter_{int(entry['iteration']):04d}{index}-{entry['model']}"


def log_steps(config: dict, entries: list[dict], *, results: str | Path = "results") -> list[str]:
    """Log each step entry as a run; returns the runs written. A tracker that fails is reported in
    the job's log and skipped: tracking never stops an exploration."""
    spec = settings(config)
    if spec["backend"] == "none":
        return []
    results = Path(results)
    written = []
    for entry in entries:
        recipe_path = results / "recipes" / f"{entry['model']}.json"
        recipe = json.loads(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
        named = (config.get("models") or {}).get(entry["model"], {})
        # A user's local model stays where it is; every other model lives in results/models.
        model_dir = Path(named["path"] if named.get("source") == "local" else results / "models" / entry["model"])
        model_dir = model_dir.resolve()
        try:
            written.append(_tensorboard_step(spec, entry, step_params(entry, recipe), step_metrics(entry), model_dir))
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not fail the step
            print(f"[lamdagent] tracking: step {entry['model']} not logged: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
    return written


def _tensorboard_step(spec: dict, entry: dict, params: dict, metrics: dict, model_dir: Path) -> str:
    """One run directory per step: an hparams session (params, model URI) and the scores as scalars;
    the scores also go to the run ``exploration``, one point per step, for the curve over iterations."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    now = time.time()
    step = int(entry["iteration"])
    info = plugin_data_pb2.SessionStartInfo(model_uri=model_dir.as_uri(), group_name=str(spec.get("experiment", "")),
                                            start_time_secs=now)
    for key, value in params.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = str(value)
    session = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
        session_start_info=info, version=metadata.PLUGIN_DATA_VERSION))
    scalars = [Summary.Value(tag=tag, simple_value=value) for tag, value in metrics.items()]
    root = Path(spec["dir"])
    name = step_run_name(entry)
    run = EventFileWriter(str(root / "steps" / name))
    run.add_event(Event(wall_time=now, step=step, summary=Summary(value=[Summary.Value(
        tag=metadata.SESSION_START_INFO_TAG, metadata=session, tensor=metadata.NULL_TENSOR)])))
    run.add_event(Event(wall_time=now, step=step, summary=Summary(value=scalars)))
    run.close()
    if scalars:
        curve = EventFileWriter(str(root / "exploration"), filename_suffix=f".{name}")
        curve.add_event(Event(wall_time=now, step=step, summary=Summary(value=scalars)))
        curve.close()
    return name
