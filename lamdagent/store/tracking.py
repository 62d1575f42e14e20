"""Experiment tracking (config ``tracking``): training curves and one run per agent step.

Training curves go through trl's own ``report_to`` (the trainer's TensorBoard callback), one run per
built model. Each step of the plan (an initial model or an agent step) is also logged as a run once
its ``step.json`` is written: the recipe as hyper-parameters, the validation scores as metrics
(step = the iteration) and the model directory as the run's model URI. The weights are not copied:
a 2B model is GBs, and they are already in results/models.

``tensorboard`` writes event files under ``tracking.dir`` (default ``results/tracking/tensorboard``):
``tensorboard --logdir results/tracking/tensorboard`` shows them, offline. The step runs are
written with TensorBoard's own protos (no torch import in the agent's jobs).
``mlflow`` logs to ``tracking.uri``: the team's tracking server, or by default a local SQLite store
(``results/tracking/mlflow.db``; ``mlflow ui --backend-store-uri sqlite:///results/tracking/mlflow.db``).
The experiment (and a local store's tables) is created once, by ``init_pool``, before any training
job: parallel jobs creating it at once would race. Credentials for a server come from mlflow's own
environment variables (``MLFLOW_TRACKING_TOKEN``, ...), never from config.
``wandb`` writes Weights & Biases runs under ``tracking.dir`` (default ``results/tracking/wandb``), offline
by default (``mode: offline``: ``wandb sync`` uploads them later; ``wandb leet`` shows them), the project
being ``tracking.experiment``. ``mode: online`` logs to the server, whose key W&B reads itself
(``WANDB_API_KEY`` or ``wandb login``; ``WANDB_BASE_URL`` for a self-hosted one); ``init_pool`` checks it
is there before any job runs. The model directory is a reference artifact: its URI, no bytes copied.

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

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")
DEFAULT_DIRS = {"tensorboard": "results/tracking/tensorboard", "wandb": "results/tracking/wandb"}
DEFAULT_MLFLOW_STORE = "results/tracking/mlflow.db"
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


def settings(config: dict) -> dict:
    """The ``tracking`` section with its defaults (backend none: nothing is logged)."""
    spec = dict(config.get("tracking") or {})
    spec.setdefault("backend", "none")
    spec.setdefault("dir", DEFAULT_DIRS.get(spec["backend"], DEFAULT_DIRS["tensorboard"]))
    spec.setdefault("training_curves", True)
    spec.setdefault("experiment", "lamdagent")
    if spec["backend"] == "wandb":
        spec.setdefault("mode", "offline")
    return spec


def check(config: dict) -> tuple[str, str] | None:
    """A config problem of section ``tracking`` as (key, problem), or None. Never quotes the URI: it
    may hold a secret."""
    spec = settings(config)
    if spec["backend"] == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            return "backend", "mlflow is not installed: pip install 'lamdagent[mlflow]'"
        uri = spec.get("uri") or ""
        netloc = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""
        if "@" in netloc or "token=" in uri.lower() or "password=" in uri.lower():
            return "uri", ("holds credentials; give them in the environment (MLFLOW_TRACKING_TOKEN, or "
                           "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), which mlflow reads itself")
    elif spec.get("uri"):
        return "uri", f"only backend mlflow takes a uri (backend is {spec['backend']})"
    if spec["backend"] == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return "backend", "wandb is not installed: pip install 'lamdagent[wandb]'"
    else:
        for key in ("mode", "entity"):
            if key in spec:
                return key, f"only backend wandb takes a {key} (backend is {spec['backend']})"
    return None


def mlflow_uri(spec: dict) -> str:
    """The tracking URI: config's, or the local SQLite store (absolute: jobs may run elsewhere)."""
    if spec.get("uri"):
        return spec["uri"]
    store = Path(DEFAULT_MLFLOW_STORE).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def prepare(config: dict) -> None:
    """Before any job logs: create the MLflow experiment (and a local store's tables) once; check that
    W&B's online mode has a key (an exploration of hours must not find out at its first training)."""
    spec = settings(config)
    if spec["backend"] == "mlflow":
        _mlflow_experiment(_mlflow_client(spec), spec)
    elif spec["backend"] == "wandb" and spec["mode"] == "online":
        import wandb

        try:
            wandb.login(verify=True)  # the key from WANDB_API_KEY or `wandb login`, checked with the server
        except Exception as err:  # noqa: BLE001 - whatever W&B raises, the run must not start
            from lamdagent.redact import redact

            reason = redact(f"{type(err).__name__}: {err}", [os.environ.get("WANDB_API_KEY", "")])
            raise RuntimeError(f"tracking.mode online: W&B cannot log in ({reason}); set WANDB_API_KEY in the "
                               "environment or run `wandb login`, or use mode offline") from None


def _mlflow_client(spec: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri(spec))


def _mlflow_experiment(client, spec: dict) -> str:
    found = client.get_experiment_by_name(spec["experiment"])
    if found is not None:
        return found.experiment_id
    # A local store keeps its artifacts beside it (MLflow's default is ./mlruns of whichever job is first).
    location = None if spec.get("uri") else Path(DEFAULT_MLFLOW_STORE).resolve().with_name("mlflow-artifacts").as_uri()
    return client.create_experiment(spec["experiment"], artifact_location=location)


def trainer_tracking(config: dict, model: str) -> dict | None:
    """What a training child process needs to report its curves (JSON, passed in its arguments)."""
    spec = settings(config)
    if spec["backend"] == "none" or not spec["training_curves"]:
        return None
    if spec["backend"] == "mlflow":
        return {"backend": "mlflow", "run_name": model, "uri": mlflow_uri(spec), "experiment": spec["experiment"],
                "tags": {"lamdagent.kind": "training", "lamdagent.model": model}}
    if spec["backend"] == "wandb":
        return {"backend": "wandb", "run_name": model, "dir": str(Path(spec["dir"]).resolve() / "train" / model),
                "project": spec["experiment"], "mode": spec["mode"], "entity": spec.get("entity")}
    return {"backend": spec["backend"], "run_name": model,
            "dir": str(Path(spec["dir"]).resolve() / "train" / model)}


def report_to(tracking: dict | None) -> tuple[str, str | None]:
    """(trl's ``report_to``, ``run_name``) for a training run, configuring the callback through the
    environment variables transformers reads (this is the training child process: nothing else sees
    them). A retried job starts its curves afresh."""
    if not tracking:
        return "none", None
    if tracking["backend"] in ("tensorboard", "wandb"):
        if int(os.environ.get("RANK", "0")) == 0 and os.path.isdir(tracking["dir"]):
            shutil.rmtree(tracking["dir"])
    if tracking["backend"] == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = tracking["dir"]
    elif tracking["backend"] == "wandb":
        Path(tracking["dir"]).mkdir(parents=True, exist_ok=True)
        # transformers' WandbCallback calls wandb.init, which reads these. Git and code capture off (a
        # user's working tree is not the recipe); the console stays in the job's log.
        os.environ.update(WANDB_DIR=tracking["dir"], WANDB_PROJECT=tracking["project"], WANDB_MODE=tracking["mode"],
                          WANDB_JOB_TYPE="training", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true",
                          WANDB_CONSOLE="off", WANDB_SILENT="true", WANDB_LOG_MODEL="false", WANDB_WATCH="false")
        if tracking.get("entity"):
            os.environ["WANDB_ENTITY"] = tracking["entity"]
    elif tracking["backend"] == "mlflow":
        os.environ.update(MLFLOW_TRACKING_URI=tracking["uri"], MLFLOW_EXPERIMENT_NAME=tracking["experiment"],
                          MLFLOW_TAGS=json.dumps(tracking["tags"]))
    return tracking["backend"], tracking["run_name"]


def end_training_run(report_to) -> None:
    """End the trainer's W&B run once the model is saved. transformers' callback leaves it open (for a
    user's own logging after training); left open, it would end only with the process, or be cut by
    the next run started in it."""
    if "wandb" in ([report_to] if isinstance(report_to, str) else list(report_to or ())):
        import wandb

        if wandb.run is not None:
            wandb.finish()


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
        log = {"mlflow": _mlflow_step, "wandb": _wandb_step}.get(spec["backend"], _tensorboard_step)
        try:
            written.append(log(spec, entry, step_params(entry, recipe), step_metrics(entry), model_dir, recipe))
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not fail the step
            print(f"[lamdagent] tracking: step {entry['model']} not logged: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
    return written


def _mlflow_step(spec: dict, entry: dict, params: dict, metrics: dict, model_dir: Path, recipe: dict | None) -> str:
    """One MLflow run per step: params, the scores at step = the iteration, the model directory's URI
    as a tag, and the recipe as a small artifact."""
    from mlflow.entities import Metric, Param, RunTag

    client = _mlflow_client(spec)
    name = step_run_name(entry)
    tags = {"lamdagent.kind": "step", "lamdagent.model": entry["model"], "lamdagent.iteration": str(entry["iteration"]),
            "lamdagent.model_uri": model_dir.as_uri()}
    run = client.create_run(_mlflow_experiment(client, spec), run_name=name, tags=tags)
    now = int(time.time() * 1000)
    step = int(entry["iteration"])
    client.log_batch(run.info.run_id,
                     metrics=[Metric(key, value, now, step) for key, value in metrics.items()],
                     params=[Param(key, str(value)[:MLFLOW_PARAM_CHARS]) for key, value in params.items()],
                     tags=[RunTag("mlflow.note.content", str(entry.get("pipeline") or ""))])
    if recipe is not None:
        client.log_dict(run.info.run_id, recipe, "recipe.json")
    client.set_terminated(run.info.run_id, "FAILED" if entry.get("status") == "failed" else "FINISHED")
    return name


def _tensorboard_step(spec: dict, entry: dict, params: dict, metrics: dict, model_dir: Path,
                      recipe: dict | None) -> str:
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


def _wandb_step(spec: dict, entry: dict, params: dict, metrics: dict, model_dir: Path, recipe: dict | None) -> str:
    """One W&B run per step (job type ``step``): params as its config, the scores at step = the
    iteration, the model directory as a reference artifact (its URI; checksum off: no GBs read) holding
    the recipe."""
    import re

    import wandb

    name = step_run_name(entry)
    root = Path(spec["dir"]) / "steps"
    root.mkdir(parents=True, exist_ok=True)
    # No git, code, system metrics or host metadata: this process is the agent's, and a step run
    # records the agent's decision, not the machine.
    quiet = wandb.Settings(disable_git=True, save_code=False, x_disable_stats=True, x_disable_meta=True,
                           console="off", silent=True)
    run = wandb.init(project=spec["experiment"], entity=spec.get("entity"), name=name, job_type="step",
                     dir=str(root), mode=spec["mode"], config=params, notes=str(entry.get("pipeline") or ""),
                     settings=quiet, reinit="create_new")
    try:
        run.log(metrics, step=int(entry["iteration"]))
        run.summary["model_uri"] = model_dir.as_uri()
        run.summary["status"] = str(entry.get("status") or "done")
        if model_dir.is_dir():
            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "_", f"model-{entry['model']}"), type="model",
                                      metadata={"pipeline": str(entry.get("pipeline") or "")})
            artifact.add_reference(model_dir.as_uri(), checksum=False)
            if recipe is not None:
                with artifact.new_file("recipe.json", mode="w", encoding="utf-8") as out:
                    json.dump(recipe, out, indent=1)
            run.log_artifact(artifact)
    finally:
        run.finish(exit_code=1 if entry.get("status") == "failed" else 0)
    return name
