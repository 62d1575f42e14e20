"""`lamdagent status`: where an exploration stands, from a partly explored directory and during and after a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from e2e import communicate_bounded, snakemake_command, subprocess_env, wandb_runs, write_tiny_config

from lamdagent import cli
from lamdagent.report.status import status
from lamdagent.store.fileio import atomic_write_json

LAMDAGENT = str(Path(sys.executable).with_name("lamdagent"))
T0 = 1_800_000_000.0
NO_FALLBACK = {"type_selection": False, "object_selection": False, "memory_update": False}


def score(s_multi: float) -> dict:
    return {"split": "val", "tasks": {"arith": s_multi}, "weights": {"arith": 1.0}, "s_multi": s_multi}


def bench(results: Path, relative: str, wall: float, end: float) -> None:
    path = results / "benchmarks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{wall}\t0:00:00\t100.0\t{wall}\n")
    os.utime(path, (end, end))


@pytest.fixture()
def partial(tmp_path) -> Path:
    """Iteration 1 of 3 done (a type fallback), iteration 2 proposed (an object fallback), its model not built."""
    results = tmp_path / "results"
    agent = results / "agent"
    atomic_write_json(agent / "iter_0" / "step.json", {"iteration": 0, "initial": [
        {"model": "tiny", "pipeline": "tiny", "status": "done", "score": score(0.1)},
        {"model": "specialist-arith", "pipeline": "specialist-arith", "status": "done", "score": score(0.3)}]})
    step1 = {"iteration": 1, "model": "sft-00000000000000a1", "action": "sft", "pipeline": "sft(specialist-arith, all)",
             "objects": {"model": "specialist-arith", "dataset": "all", "learning_rate": 0.001},
             "fallback": dict(NO_FALLBACK, type_selection=True)}
    atomic_write_json(agent / "iter_1" / "proposal.json", dict(step1, status="proposed"))
    atomic_write_json(agent / "iter_1" / "outcome.json", {"iteration": 1, "models": {step1["model"]: {"status": "done"}}})
    atomic_write_json(agent / "iter_1" / "step.json", dict(step1, status="done", score=score(0.6)))
    step2 = {"iteration": 2, "model": "sft-00000000000000a2", "action": "sft", "pipeline": "sft(sft(specialist-arith, all), arith)",
             "objects": {"model": "sft-00000000000000a1", "dataset": "arith", "learning_rate": 0.001},
             "fallback": {"type_selection": False, "object_selection": True}, "status": "proposed"}
    atomic_write_json(agent / "iter_2" / "proposal.json", step2)
    bench(results, "sft/00000000000000a1.tsv", 10.0, T0 + 10)
    for i, model in enumerate(("tiny", "specialist-arith", "sft-00000000000000a1")):
        bench(results, f"evaluate/{model}.val.tsv", 4.0, T0 + 20 + i)
        bench(results, f"score/{model}.tsv", 1.0, T0 + 30 + i)
        atomic_write_json(results / "evals" / model / "val.json", {})
        atomic_write_json(results / "scores" / f"{model}.json", {})
    bench(results, "agent/propose_1.tsv", 2.0, T0 + 40)
    bench(results, "agent/outcome_1.tsv", 0.5, T0 + 41)
    bench(results, "agent/memory_1.tsv", 3.0, T0 + 42)
    bench(results, "agent/propose_2.tsv", 2.0, T0 + 50)
    return tmp_path


CONFIG = {"iterations": 3, "report": {"top_k": 2}, "data": {"train_examples": 8, "val_examples": 6, "test_examples": 6}}


def test_status_of_a_partly_explored_directory(partial):
    report = status(partial, CONFIG, running_pids=[4242], now=T0 + 100)
    assert report["state"] == "running"
    assert (report["iteration"], report["iterations"], report["completed_iterations"]) == (2, 3, 1)
    assert report["best"] == {"model": "sft-00000000000000a1", "pipeline": "sft(specialist-arith, all)",
                              "iteration": 1, "s_multi": 0.6}
    (step,) = report["last_step"]["steps"]
    assert (report["last_step"]["iteration"], step["model"], step["action"], step["state"]) == \
        (2, "sft-00000000000000a2", "sft", "running")
    assert step["objects"]["dataset"] == "arith"
    assert report["fallbacks"] == {"steps": 2, "type_selection": 1, "object_selection": 1, "memory_update": 0}
    assert report["elapsed_s"] == pytest.approx(100.0)  # from the first job's start (T0) to now
    assert report["jobs_finished"] == 11 and report["job_s"] == pytest.approx(32.5)
    # Left: iteration 2 (its action, evaluation, score, outcome, memory), all of iteration 3, the test
    # evaluations of the top-2 and the base, and the four report jobs (none finished: counted as 0 s).
    assert report["remaining_jobs"] == {"agent:propose": 1, "action": 2, "evaluate:val": 2, "score": 2,
                                        "agent:outcome": 2, "agent:update_memory": 2, "evaluate:test": 3,
                                        "report:leaderboard": 1, "report:topk": 1, "report:figures": 1,
                                        "report:costs": 1}
    # Iteration 1's own jobs took 2 + 10 + 4 + 1 + 0.5 + 3 = 20.5 s; iteration 2 has had 2 s of them
    # (its proposal); the test evaluations cost a validation's time x (2 x 6 test / 6 val) each.
    assert report["estimate_basis"] == "iterations"
    assert report["remaining_s"] == pytest.approx((20.5 - 2) + 20.5 + 3 * 8)
    assert report["estimate_missing"] == ["report:costs", "report:figures", "report:leaderboard", "report:topk"]
    # Before any agent iteration finished, each stage's mean: action 10, val 4, score 1, propose 2,
    # outcome 0.5, memory 3.
    (partial / "results" / "agent" / "iter_1" / "step.json").rename(partial / "step-1.json")
    early = status(partial, CONFIG, running_pids=[4242], now=T0 + 100)
    assert early["estimate_basis"] == "stages" and early["remaining_jobs"]["agent:update_memory"] == 3
    assert early["remaining_s"] == pytest.approx(3 * 3 + 2 * 10 + 2 * 0.5 + 2 * 4 + 2 * 1 + 2 + 3 * 8)
    (partial / "step-1.json").rename(partial / "results" / "agent" / "iter_1" / "step.json")

    # Once the action failed: recorded as such, nothing of it left to evaluate.
    atomic_write_json(partial / "results" / "agent" / "iter_2" / "outcome.json",
                      {"iteration": 2, "models": {"sft-00000000000000a2": {"status": "failed"}}})
    stopped = status(partial, CONFIG, now=T0 + 100)
    assert stopped["state"] == "stopped" and stopped["last_step"]["steps"][0]["state"] == "failed"
    assert stopped["elapsed_s"] == pytest.approx(50.0)  # not running: up to the last job's end
    assert stopped["remaining_jobs"]["action"] == 1 and stopped["remaining_jobs"]["evaluate:val"] == 1


def test_cli_prints_text_and_json(partial, capsys):
    (partial / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert cli.main(["status", "--directory", str(partial), "--configfile", "config.yaml"]) == 0
    text = capsys.readouterr().out
    assert "iteration 2 of 3 (1 done" in text
    assert "best so far: sft(specialist-arith, all)  s_multi 0.6000  (sft-00000000000000a1, iteration 1)" in text
    assert "last step: iteration 2: sft(model=sft-00000000000000a1, dataset=arith, learning_rate=0.001)" in text
    assert "fallbacks: type 1, objects 1, memory 0 (of 2 steps)" in text
    assert cli.main(["status", "--directory", str(partial), "--configfile", "config.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remaining_jobs"]["agent:propose"] == 1
    # Without the config the plan's length is unknown, and said so.
    assert cli.main(["status", "--directory", str(partial), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["iterations"] is None and "pass --configfile" in captured.err
    assert cli.main(["status", "--directory", str(partial / "nowhere")]) == 2


def run_status(workdir: Path) -> dict:
    result = subprocess.run([LAMDAGENT, "status", "--directory", str(workdir), "--configfile", "config.yaml", "--json"],
                            check=True, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_status_during_and_after_an_exploration_with_tracking(tmp_path, tiny_model_dir, backend):
    """The real workflow on the tiny model with `tracking` (TensorBoard; W&B offline): status while it
    runs (once the first proposal exists) and after; the runs read back with the tracker's own reader."""
    workdir = tmp_path / "run"
    config = write_tiny_config(workdir, tiny_model_dir, iterations=2, tracking={"backend": backend})
    secret = "sk-lamdagent-status-3d9e7b1c"  # in every job's environment: it must reach no tracker
    process = subprocess.Popen(snakemake_command(workdir, config), cwd=workdir,
                               env=dict(subprocess_env(), OPENAI_API_KEY=secret),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proposal = workdir / "results" / "agent" / "iter_1" / "proposal.json"
    deadline = time.monotonic() + 600
    while not proposal.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    during = run_status(workdir)
    output, timed_out = communicate_bounded(process, 900)
    assert not timed_out and process.returncode == 0, output[-6000:]

    chosen = json.loads(proposal.read_text())
    assert during["state"] == "running" and during["snakemake_pids"]
    assert (during["iteration"], during["iterations"], during["completed_iterations"]) == (1, 2, 0)
    (step,) = during["last_step"]["steps"]
    assert (step["model"], step["action"], step["objects"]) == (chosen["model"], chosen["action"], chosen["objects"])
    assert step["state"] in ("running", "built", "done", "failed")
    initial = json.loads((workdir / "results" / "agent" / "iter_0" / "step.json").read_text())["initial"]
    assert during["best"]["s_multi"] == max(entry["score"]["s_multi"] for entry in initial)
    assert during["remaining_s"] > 0 and during["remaining_jobs"]["agent:update_memory"] == 2

    after = run_status(workdir)
    plan = yaml.safe_load((workdir / "results" / "plan.yaml").read_text())
    assert after["state"] == "finished" and not after["snakemake_pids"]
    assert (after["iteration"], after["completed_iterations"], after["remaining_s"]) == (2, 2, 0.0)
    assert after["best"]["s_multi"] == max(e["score"] for e in plan["initial"] + plan["steps"])
    assert after["last_step"]["steps"][0]["model"] == plan["steps"][-1]["model"]
    assert after["last_step"]["steps"][0]["state"] == plan["steps"][-1]["status"]
    assert after["elapsed_s"] >= during["elapsed_s"] and after["jobs_finished"] > during["jobs_finished"]

    # Tracking: one run per step, the recipe and scores in it; the trainer's curves of every SFT model.
    root = workdir / "results" / "tracking" / backend
    entries = [dict(e, iteration=0) for e in plan["initial"]] + plan["steps"]
    sft_models = {e["model"] for e in entries if e["model"].startswith("sft-")}
    assert sft_models and {p.name for p in (root / "train").iterdir()} == sft_models
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for entry in entries:
            (run,) = (root / "steps").glob(f"iter_{entry['iteration']:04d}-{entry['model']}")
            events = EventAccumulator(str(run))
            events.Reload()
            assert events.Scalars("val/s_multi")[0].value == pytest.approx(entry["score"], abs=1e-6)
        for model in sft_models:
            events = EventAccumulator(str(root / "train" / model))
            events.Reload()
            assert events.Scalars("train/loss")
    else:
        steps = wandb_runs(root / "steps")
        assert sorted(steps) == sorted(f"iter_{e['iteration']:04d}-{e['model']}" for e in entries)
        for entry in entries:
            run = steps[f"iter_{entry['iteration']:04d}-{entry['model']}"]
            assert run["state"] == "finished" and run["project"] == "lamdagent"
            assert run["summary"]["val/s_multi"] == pytest.approx(entry["score"], abs=1e-6)
        for model in sft_models:
            (train,) = wandb_runs(root / "train" / model).values()
            assert train["state"] == "finished" and train["summary"]["train/loss"] > 0
    for path in root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
