"""Experiment tracking (config ``tracking``): trl's curves and the step runs, read back with each tracker's
own reader (TensorBoard's event accumulator, MLflow's client, W&B's ``wandb leet inspect``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from e2e import tiny_config, wandb_runs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from lamdagent import config as cfg
from lamdagent.actions.train import sft
from lamdagent.store import tracking
from lamdagent.store.fileio import atomic_write_json, write_jsonl


WANDB_VARIABLES = ("WANDB_DIR", "WANDB_PROJECT", "WANDB_MODE", "WANDB_JOB_TYPE", "WANDB_DISABLE_GIT",
                   "WANDB_DISABLE_CODE", "WANDB_CONSOLE", "WANDB_SILENT", "WANDB_LOG_MODEL", "WANDB_WATCH",
                   "WANDB_ENTITY", "WANDB_API_KEY")


@pytest.fixture(autouse=True)
def tracker_environment(monkeypatch):
    """A training run in this process sets the variables transformers' callbacks read: undone after each
    test, as is W&B's per-process state (its settings and service), which a job's process would not share."""
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS",
                 *WANDB_VARIABLES):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def read_run(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


def session_start(events: EventAccumulator):
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    return metadata.parse_session_start_info_plugin_data(content)


def test_sft_reports_its_loss_curve_through_trl(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(8)])
    run_dir = tmp_path / "tb" / "train" / "sft-0123456789abcdef"
    run_dir.mkdir(parents=True)
    (run_dir / "events.out.tfevents.stale").write_bytes(b"")  # a retried job starts its curves afresh
    metrics = sft(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-3, batch_size=2, max_length=64,
                  tracking={"backend": "tensorboard", "run_name": "sft-0123456789abcdef", "dir": str(run_dir)})
    events = read_run(run_dir)
    losses = events.Scalars("train/loss")
    assert [point.step for point in losses] == list(range(1, metrics["steps"] + 1))
    assert "train/learning_rate" in events.Tags()["scalars"]
    assert not (run_dir / "events.out.tfevents.stale").exists()


def test_no_backend_reports_nothing(tiny_model_dir, tmp_path):
    assert tracking.report_to(None) == ("none", None)
    config = cfg.load(tiny_config(tiny_model_dir))
    assert config["tracking"]["backend"] == "none"
    assert tracking.trainer_tracking(config, "sft-0123456789abcdef") is None
    assert tracking.log_steps(config, [{"iteration": 1, "model": "sft-0123456789abcdef"}]) == []


def step_entry(model: str, iteration: int, s_multi: float, **extra) -> dict:
    return {"iteration": iteration, "model": model, "action": "sft", "pipeline": f"sft(tiny, arith) #{iteration}",
            "objects": {"model": "tiny", "dataset": "arith", "learning_rate": 1e-3}, "status": "done",
            "controller": "openai", "score": {"split": "val", "tasks": {"arith": s_multi, "choice": 0.0},
                                               "weights": {"arith": 1.0, "choice": 1.0}, "s_multi": s_multi},
            **extra}


def test_each_step_is_a_run_with_recipe_scores_and_model_uri(tiny_model_dir, tmp_path, monkeypatch):
    secret = "sk-lamdagent-tracking-5e1f0c2a9b"
    monkeypatch.setenv("LAMDAGENT_TEST_KEY", secret)
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tiny_model_dir)
    config["controller"] = {"type": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1",
                            "api_key_env": "LAMDAGENT_TEST_KEY"}
    config["tracking"] = {"backend": "tensorboard", "dir": "tb", "experiment": "study-1"}
    config = cfg.load(config)
    models = ["sft-00000000000000a1", "sft-00000000000000a2"]
    for model in models:
        atomic_write_json(Path("results/recipes") / f"{model}.json",
                          {"action": "sft", "inputs": {"model": "tiny", "dataset": {"name": "arith", "rows": 16}},
                           "params": {"learning_rate": 1e-3, "epochs": 1}, "seed": 0})
    entries = [step_entry(models[0], 1, 0.25), step_entry(models[1], 2, 0.5)]
    names = tracking.log_steps(config, entries[:1]) + tracking.log_steps(config, entries[1:])
    assert names == [f"iter_0001-{models[0]}", f"iter_0002-{models[1]}"]

    for name, entry in zip(names, entries):
        events = read_run(tmp_path / "tb" / "steps" / name)
        start = session_start(events)
        assert start.model_uri == (tmp_path / "results" / "models" / entry["model"]).as_uri()
        assert start.group_name == "study-1"
        hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
                   for key, value in start.hparams.items()}
        assert hparams["model"] == entry["model"] and hparams["action"] == "sft"
        assert hparams["recipe.params.learning_rate"] == pytest.approx(1e-3)
        assert hparams["recipe.inputs.dataset.name"] == "arith" and hparams["objects.dataset"] == "arith"
        assert not any("controller" in key for key in hparams)
        (point,) = events.Scalars("val/s_multi")
        assert (point.step, point.value) == (entry["iteration"], pytest.approx(entry["score"]["s_multi"]))
        assert events.Scalars("val/arith")[0].value == pytest.approx(entry["score"]["tasks"]["arith"])
    # The exploration's curve: one point per step.
    curve = read_run(tmp_path / "tb" / "exploration").Scalars("val/s_multi")
    assert [(p.step, p.value) for p in curve] == [(1, 0.25), (2, 0.5)]
    # The local base model's run names its own directory, not one in results/.
    (name,) = tracking.log_steps(config, [dict(step_entry("tiny", 0, 0.0), action=None)])
    assert session_start(read_run(tmp_path / "tb" / "steps" / name)).model_uri == Path(tiny_model_dir).as_uri()

    for path in (tmp_path / "tb").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_tracker_that_fails_does_not_fail_the_step(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tb").write_text("a file where the log directory should be")
    config = cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "tensorboard", "dir": "tb"}))
    assert tracking.log_steps(config, [step_entry("sft-00000000000000a1", 1, 0.25)]) == []
    assert "tracking: step sft-00000000000000a1 not logged" in capsys.readouterr().err


def test_an_unknown_backend_is_a_one_line_config_error(tiny_model_dir):
    with pytest.raises(cfg.ConfigError, match=r"^config: tracking\.backend: 'comet' is not one of"):
        cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "comet"}))
    with pytest.raises(cfg.ConfigError, match=r"^config: tracking\.mode: only backend wandb takes a mode"):
        cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "tensorboard", "mode": "offline"}))


# ---- mlflow -------------------------------------------------------------------------------------


def mlflow_config(tiny_model_dir, **tracking_spec) -> dict:
    return cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "mlflow", **tracking_spec}))


def test_mlflow_sft_curves_and_step_runs_in_the_local_store(tiny_model_dir, tmp_path, monkeypatch):
    import mlflow

    secret = "sk-lamdagent-tracking-77aa0c2a9b"
    monkeypatch.setenv("LAMDAGENT_TEST_KEY", secret)
    monkeypatch.chdir(tmp_path)
    config = mlflow_config(tiny_model_dir, experiment="study-2")
    tracking.prepare(config)  # what init_pool does: the store and the experiment, once
    uri = f"sqlite:///{tmp_path / 'results' / 'tracking' / 'mlflow.db'}"
    assert tracking.mlflow_uri(tracking.settings(config)) == uri

    model = "sft-00000000000000b1"
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(8)])
    metrics = sft(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-3, batch_size=2, max_length=64,
                  tracking=tracking.trainer_tracking(config, model))
    atomic_write_json(Path("results/recipes") / f"{model}.json",
                      {"action": "sft", "inputs": {"model": "tiny", "dataset": {"name": "arith", "rows": 8}},
                       "params": {"learning_rate": 1e-3}, "seed": 0})
    assert tracking.log_steps(config, [step_entry(model, 1, 0.75)]) == [f"iter_0001-{model}"]

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("study-2").experiment_id])
    by_kind = {run.data.tags["lamdagent.kind"]: run for run in runs}
    assert sorted(by_kind) == ["step", "training"] and len(runs) == 2
    train = by_kind["training"]
    assert train.info.run_name == model and train.data.tags["lamdagent.model"] == model
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == list(range(1, metrics["steps"] + 1))
    assert float(train.data.params["learning_rate"]) == pytest.approx(1e-3)
    step = by_kind["step"]
    assert step.info.status == "FINISHED" and step.data.metrics["val/s_multi"] == pytest.approx(0.75)
    assert step.data.params["recipe.params.learning_rate"] == "0.001" and step.data.params["action"] == "sft"
    assert step.data.tags["lamdagent.model_uri"] == (tmp_path / "results" / "models" / model).as_uri()
    assert client.get_metric_history(step.info.run_id, "val/s_multi")[0].step == 1
    recipe = mlflow.artifacts.load_dict(f"{step.info.artifact_uri}/recipe.json")
    assert recipe["params"] == {"learning_rate": 1e-3}
    assert (tmp_path / "results" / "tracking" / "mlflow-artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    for path in (tmp_path / "results" / "tracking").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_an_mlflow_uri_with_credentials_is_refused_without_echoing_them(tiny_model_dir):
    password = "hunter2-6c1d"
    with pytest.raises(cfg.ConfigError) as raised:
        mlflow_config(tiny_model_dir, uri=f"https://team:{password}@mlflow.example.org")
    message = str(raised.value)
    assert message.startswith("config: tracking.uri: holds credentials") and password not in message
    assert "\n" not in message
    assert mlflow_config(tiny_model_dir, uri="https://mlflow.example.org")["tracking"]["uri"]
    with pytest.raises(cfg.ConfigError, match=r"^config: tracking\.uri: only backend mlflow takes a uri"):
        cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "tensorboard", "uri": "http://x"}))


# ---- wandb --------------------------------------------------------------------------------------


def test_wandb_sft_curves_and_step_runs_offline(tiny_model_dir, tmp_path, monkeypatch):
    secret = "sk-lamdagent-tracking-3c9e0c2a9b"
    monkeypatch.setenv("LAMDAGENT_TEST_KEY", secret)
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tiny_model_dir)
    config["controller"] = {"type": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1",
                            "api_key_env": "LAMDAGENT_TEST_KEY"}
    config["tracking"] = {"backend": "wandb", "experiment": "study-3"}
    config = cfg.load(config)
    spec = tracking.settings(config)
    assert (spec["dir"], spec["mode"]) == ("results/tracking/wandb", "offline")
    tracking.prepare(config)  # offline: nothing to check, no network

    model = "sft-00000000000000c1"
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(8)])
    curves = tracking.trainer_tracking(config, model)
    stale = Path(curves["dir"]) / "wandb" / "offline-run-stale"
    stale.mkdir(parents=True)  # a retried job starts its curves afresh
    metrics = sft(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-3, batch_size=2, max_length=64,
                  tracking=curves)
    assert not stale.exists()
    atomic_write_json(Path("results/recipes") / f"{model}.json",
                      {"action": "sft", "inputs": {"model": "tiny", "dataset": {"name": "arith", "rows": 8}},
                       "params": {"learning_rate": 1e-3}, "seed": 0})
    (tmp_path / "results" / "models" / model).mkdir(parents=True)
    (tmp_path / "results" / "models" / model / "config.json").write_text("{}")
    failed = dict(step_entry("sft-00000000000000c2", 2, 0.0), status="failed")
    assert tracking.log_steps(config, [step_entry(model, 1, 0.75), failed]) == [
        f"iter_0001-{model}", "iter_0002-sft-00000000000000c2"]

    root = tmp_path / "results" / "tracking" / "wandb"
    runs = wandb_runs(root)
    assert sorted(runs) == [f"iter_0001-{model}", "iter_0002-sft-00000000000000c2", model]
    train = runs[model]
    assert train["project"] == "study-3" and train["state"] == "finished"
    (run_record,) = [r["run"] for r in train["records"] if r["type"] == "run"]
    assert run_record["job_type"] == "training"
    losses = [r["history"]["item"] for r in train["records"] if r["type"] == "history" and "train/loss" in r["history"]["item"]]
    assert [item["train/global_step"] for item in losses] == list(range(1, metrics["steps"] + 1))
    assert float(train["config"]["learning_rate"]) == pytest.approx(1e-3)

    step = runs[f"iter_0001-{model}"]
    assert step["state"] == "finished" and step["exit_code"] == 0 and step["step"] == 1
    assert step["summary"]["val/s_multi"] == pytest.approx(0.75) and step["summary"]["val/arith"] == pytest.approx(0.75)
    assert step["config"]["recipe.params.learning_rate"] == pytest.approx(1e-3) and step["config"]["action"] == "sft"
    assert not any("controller" in key for key in step["config"])
    model_uri = (tmp_path / "results" / "models" / model).as_uri()
    assert step["summary"]["model_uri"] == model_uri
    (artifact,) = [r["artifact"] for r in step["records"] if r["type"] == "artifact"]
    assert artifact["type"] == "model" and artifact["name"] == f"model-{model}"
    refs = {entry["path"]: entry.get("ref") for entry in artifact["manifest"]["contents"]}
    assert refs["config.json"] == f"{model_uri}/config.json" and "recipe.json" in refs
    # A failed step's run ends failed, with the failure score and no artifact (no model directory).
    failed_run = runs["iter_0002-sft-00000000000000c2"]
    assert failed_run["exit_code"] == 1 and failed_run["summary"]["status"] == "failed"
    assert not [r for r in failed_run["records"] if r["type"] == "artifact"]

    for path in root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wandb_online_without_a_key_stops_before_any_job(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no `wandb login`
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    config = cfg.load(dict(tiny_config(tiny_model_dir), tracking={"backend": "wandb", "mode": "online"}))
    with pytest.raises(RuntimeError, match=r"^tracking\.mode online: W&B cannot log in .*WANDB_API_KEY"):
        tracking.prepare(config)
