"""Failing actions become feedback, not a crash (and infrastructure failures are retried, not recorded).

The unit tests run the real child process of an action (``python -m lamdagent.actions.failures``) on the
tiny model; the end-to-end test runs the workflow with a learning rate that makes SFT diverge.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from e2e import communicate_bounded, run_snakemake, snakemake_command, subprocess_env, tiny_config

from lamdagent.actions import failures
from lamdagent.actions.recipe import make_recipe
from lamdagent.actions.train import TrainingDiverged
from lamdagent.agent import prompts
from lamdagent.agent.memory import summary_memory, update_memory
from lamdagent.agent.objects import Pool
from lamdagent.agent.plan import plan_entry, write_plan
from lamdagent.config import DEFAULTS, load
from lamdagent.errors import ConfigError
from lamdagent.report.figures import step_points
from lamdagent.report.leaderboard import leaderboard_table
from lamdagent.store.fileio import atomic_write_json, read_json, write_jsonl
from lamdagent.store.recipes import model_id
from lamdagent.workflow import agent as agent_jobs
from lamdagent.workflow import models as model_jobs

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"What is {a} plus {a + 1}?", "completion": str(2 * a + 1)} for a in range(16)]
REASON = "training loss is nan at step 2"


# ---- what a failure is --------------------------------------------------------------------------


def test_exceptions_are_classified_with_a_one_line_reason():
    import torch

    assert failures.classify(TrainingDiverged(REASON)) == ("diverged", REASON)
    assert failures.classify(torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2 GiB"))[0] == "out_of_memory"
    assert failures.classify(MemoryError()) == ("out_of_memory", "out of memory: MemoryError")
    kind, reason = failures.classify(ValueError("bad.jsonl:3: 'completion'\nmust be a string"))
    assert (kind, reason) == ("error", "ValueError: bad.jsonl:3: 'completion' must be a string")
    assert len(failures.classify(RuntimeError("x" * 5000))[1]) == failures.MAX_REASON_CHARS


def test_the_deadline_is_the_runtime_less_the_margin():
    assert failures.deadline_s(10, 60) == 540
    assert failures.deadline_s(None, 60) is None
    assert failures.deadline_s(1, 90) == 30  # a margin that leaves nothing keeps half the runtime


def test_failure_config_defaults_and_errors_name_the_key():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    loaded = load(copy.deepcopy(config), REPO)
    assert loaded["failures"] == DEFAULTS["failures"] and loaded["failures"]["score"] == 0.0
    assert loaded["resources"]["sft"]["retries"] == 2
    for broken, key in [({"failures": {"score": "low"}}, "failures.score"),
                        ({"failures": {"time_margin_s": -1}}, "failures.time_margin_s"),
                        ({"failures": {"time_margin_s": 600}, "resources": {"sft": {"runtime": 10}}},
                         "failures.time_margin_s"),
                        ({"failures": {"colour": 1}}, "failures"),
                        ({"resources": {"sft": {"retries": -1}}}, "resources.sft.retries"),
                        ({"resources": {"evaluate": {"retries": 1.5}}}, "resources.evaluate.retries")]:
        with pytest.raises(ConfigError) as err:
            load({**copy.deepcopy(config), **broken}, REPO)
        assert str(err.value).startswith(f"config: {key}"), (broken, str(err.value))


# ---- the job records it ---------------------------------------------------------------------


def sft_smk(tmp_path: Path, model_dir: Path, dataset: Path, *, runtime=10, margin=60, learning_rate=1e-3) -> SimpleNamespace:
    """The parts of Snakemake's object that the sft job reads, for one real recipe."""
    config = {"failures": dict(DEFAULTS["failures"], time_margin_s=margin), "training": DEFAULTS["training"],
              "seed": 0}
    recipe = make_recipe("sft", ("tiny", "data", learning_rate), datasets={"data": {"sha256": "0" * 64, "rows": 16}},
                         training=dict(DEFAULTS["training"], max_length=64), merging={}, seed=0)
    recipe_path = tmp_path / "recipes" / f"{model_id(recipe)}.json"
    atomic_write_json(recipe_path, recipe)
    return SimpleNamespace(
        rule="sft", threads=1, config=config, resources=SimpleNamespace(runtime=runtime, gpu=0),
        input=SimpleNamespace(model=str(model_dir), dataset=str(dataset), recipe=str(recipe_path)),
        output=SimpleNamespace(model=str(tmp_path / "models" / model_id(recipe))),
        log=[str(tmp_path / "logs" / "sft" / "job.log")], wildcards=SimpleNamespace(hash=model_id(recipe)[4:]))


def only_failure_record(out_dir: Path) -> dict:
    assert sorted(p.name for p in out_dir.iterdir()) == [failures.FAILURE_FILE]  # no weights, nothing to load
    assert not [p for p in out_dir.parent.iterdir() if p.name.endswith(".partial")]
    return failures.read_failure(out_dir)


def test_an_exception_in_the_action_is_recorded_with_the_log_tail(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    smk = sft_smk(tmp_path, tiny_model_dir, bad)
    model_jobs.build_model(smk)  # the job itself succeeds: Snakemake keeps the record and does not retry it
    record = only_failure_record(Path(smk.output.model))
    assert record["kind"] == "error" and record["status"] == "failed" and record["action"] == "sft"
    assert record["reason"].startswith("ValueError: ") and "bad.jsonl:2: 'completion'" in record["reason"]
    assert "Traceback" in record["log_tail"] and "bad.jsonl:2" in record["log_tail"]
    assert record["model"] == Path(smk.output.model).name


def test_a_time_limit_is_recorded_and_the_child_is_stopped(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, ROWS)
    # runtime 1 min less a 58.5 s margin: the action has 1.5 s, less than loading torch and the model takes.
    smk = sft_smk(tmp_path, tiny_model_dir, data, runtime=1, margin=58.5)
    started = time.monotonic()
    model_jobs.build_model(smk)
    assert time.monotonic() - started < 1.5 + failures.STOP_GRACE_S
    record = only_failure_record(Path(smk.output.model))
    assert record["kind"] == "time_limit" and record["reason"].startswith("time limit: stopped after")
    assert record["deadline_s"] == 1.5 and record["elapsed_s"] >= 1.5
    assert not list(Path(smk.log[0]).parent.glob("*.metrics.json"))


def test_a_merge_that_succeeds_in_its_child_is_a_model(tmp_path, tiny_model_dir):
    import shutil

    parents = {}
    for name in ("a", "b"):  # two distinct directories: mergekit refuses one listed twice
        parents[name] = tmp_path / name
        shutil.copytree(tiny_model_dir, parents[name])
    recipe = make_recipe("ties_merging", ("tiny", "a", "b", [0.5, 0.5], 0.5), datasets={}, training={},
                         merging=DEFAULTS["merging"], seed=0)
    atomic_write_json(tmp_path / "recipe.json", recipe)
    smk = SimpleNamespace(
        rule="ties_merging", threads=1, resources=SimpleNamespace(runtime=10, gpu=0),
        config=dict(copy.deepcopy(DEFAULTS), models={}, seed=0),
        input=SimpleNamespace(recipe=str(tmp_path / "recipe.json"), base_model=str(tiny_model_dir),
                              model_a=str(parents["a"]), model_b=str(parents["b"])),
        output=SimpleNamespace(model=str(tmp_path / "models" / model_id(recipe))),
        log=[str(tmp_path / "logs" / "ties.log")], wildcards=SimpleNamespace(hash=model_id(recipe)[-16:]))
    model_jobs.build_model(smk)
    out = Path(smk.output.model)
    assert failures.read_failure(out) is None and (out / "config.json").is_file() and (out / "lineage.json").is_file()
    assert read_json(out / "lineage.json")["run"]["metrics"]["method"] == "ties"


def test_a_failed_input_model_fails_the_action_unrun(tmp_path, tiny_model_dir):
    parent = tmp_path / "models" / "sft-0123456789abcdef"
    failures.write_failure(parent, {"model": parent.name, "reason": REASON})
    data = tmp_path / "train.jsonl"
    write_jsonl(data, ROWS)
    smk = sft_smk(tmp_path, parent, data)
    model_jobs.build_model(smk)
    record = only_failure_record(Path(smk.output.model))
    assert record["kind"] == "input_failed" and record["reason"] == f"its input model {parent.name} failed: {REASON}"
    assert not list(Path(smk.log[0]).parent.glob("*.args.json"))  # no child was started


def test_a_child_killed_from_outside_is_infrastructure_not_a_failure(tmp_path):
    kill_self = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        failures.run_action(kill_self, metrics_json=tmp_path / "m.json", failure_json=tmp_path / "f.json",
                            deadline=60, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing recorded: the job fails and Snakemake retries it


def _gone(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return True
    return "Z" in state.split()[1]  # a zombie waiting for its new parent to reap it is gone too


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux only")
def test_the_child_dies_with_its_job(tmp_path):
    """kill -9 of a job (or of the whole run) leaves no orphan action behind."""
    pid_file = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                   "time.sleep(120)"]
    job = (f"from lamdagent.actions import failures; failures.run_action({child!r}, metrics_json={str(tmp_path / 'm')!r}, "
           f"failure_json={str(tmp_path / 'f')!r}, deadline=300, out_dir={str(tmp_path / 'out')!r})")
    parent = subprocess.Popen([sys.executable, "-c", job], env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid)


# ---- what the agent and the reports see -----------------------------------------------------


FAILURE = {"model": "sft-aaaaaaaaaaaaaaaa", "action": "sft", "status": "failed", "kind": "diverged", "reason": REASON,
           "log": "results/logs/sft/aaaaaaaaaaaaaaaa.log", "log_tail": "step 1 loss 10.8\nTrainingDiverged: " + REASON}
CONFIG = {"failures": {"score": -1.0}}


def failed_step(iteration=1, model="sft-aaaaaaaaaaaaaaaa") -> dict:
    proposal = {"iteration": iteration, "model": model, "action": "sft", "pipeline": "sft(base, arith)",
                "objects": {"model": "base"}, "controller": "random", "fallback": {}, "repeat_of": None}
    outcome = {"models": {model: {"status": "failed", "failure": dict(FAILURE, model=model)}}}
    return agent_jobs._apply_outcome(proposal, outcome, CONFIG, {})


def test_a_failed_step_gets_the_failure_score_reason_and_log_tail(tmp_path):
    step = failed_step()
    assert step["status"] == "failed" and step["score"]["s_multi"] == -1.0 and step["reason"] == REASON
    entry = plan_entry(step)
    assert entry["score"] == -1.0 and entry["failure"]["reason"] == REASON
    assert entry["failure"]["log_tail"].endswith(REASON)
    for i, record in enumerate([{"iteration": 0, "initial": []}, step]):
        atomic_write_json(tmp_path / "agent" / f"iter_{i}" / "step.json", record)
    write_plan(tmp_path / "agent", tmp_path / "plan.yaml")
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["steps"][0]["status"] == "failed" and plan["steps"][0]["failure"]["kind"] == "diverged"


HISTORY = [{"iteration": 0, "model": "base", "pipeline": "base", "status": "done",
            "score": {"s_multi": 0.2, "tasks": {"arith": 0.2}}}]


def test_the_next_prompts_say_which_action_failed_and_why():
    step = dict(failed_step(), score={"s_multi": 9.0, "tasks": {}})  # a failure score above every result
    history = HISTORY + [step]
    eval_tasks = [{"task": "arith", "metric": "exact_match"}]
    text = f"action sft failed: {REASON}"
    typed = prompts.type_selection(eval_tasks=eval_tasks, memory="m", history=history, action_types=["sft"],
                                   counts={"sft": 2})
    assert text in typed
    best = typed.split("Results so far, best first:\n")[1].splitlines()[0]
    assert best.startswith("- base: score 0.200")  # a failure score is not a result
    objects = prompts.object_selection(action="sft", slots=[("the model", ["base", "x"])], memory="m", history=history)
    assert text in objects and "not a candidate" in objects
    assert text not in prompts.object_selection(action="sft", slots=[("the model", ["base", "x"])], memory="m")
    memory = prompts.memory_update(eval_tasks=eval_tasks, memory="m", history=HISTORY, new=step, note="", max_words=50)
    assert text in memory
    assert text in summary_memory(HISTORY, step) and "Best so far: base" in summary_memory(HISTORY, step)


def test_memory_update_notes_the_failure_score():
    class Echo:
        def __init__(self):
            self.prompts = []

        def complete(self, prompt, **kwargs):
            from lamdagent.agent.controller import Completion

            self.prompts.append(prompt)
            return Completion(text="What worked: base. Avoid lr 1e10.", tokens_in=1, tokens_out=1, latency_s=0.0)

    from lamdagent.agent.propose import CallLog

    echo = Echo()
    config = {"memory": {"max_words": 40, "style": "free"}, "eval_tasks": [{"task": "arith"}],
              "controller": {"retries": 0, "max_tokens": {"memory_update": 20}}}
    update_memory(config=config, memory="m", history=HISTORY, new=failed_step(), controller=echo, log=CallLog())
    assert "the action failed, so it made no model; it counts with the failure score -1.000" in echo.prompts[0]
    assert f"action sft failed: {REASON}" in echo.prompts[0]


def test_with_k_proposals_only_the_failed_one_counts_as_failed():
    from lamdagent.agent.memory import step_note

    built = "sft-bbbbbbbbbbbbbbbb"
    outcome = {"models": {FAILURE["model"]: {"status": "failed", "failure": FAILURE}, built: {"status": "done"}}}
    score = {"s_multi": 0.4, "tasks": {"arith": 0.4}}
    records = [agent_jobs._apply_outcome({"iteration": 1, "index": i, "model": m, "action": "sft", "pipeline": f"p{i}"},
                                   outcome, CONFIG, {built: score}) for i, m in enumerate([FAILURE["model"], built])]
    assert [r["status"] for r in records] == ["failed", "done"] and records[1]["score"] == score
    assert records[0]["score"]["s_multi"] == -1.0
    assert "Best so far: m1.2 = p1 (score 0.400)" in summary_memory(HISTORY, records)
    assert f"p0: action sft failed: {REASON}" in summary_memory(HISTORY, records)
    assert step_note(records, HISTORY).startswith("Note: p0: the action failed")


def test_failed_models_leave_the_pool_and_the_reports(tmp_path, monkeypatch):
    base, special, failed_special = "base", "sft-1111111111111111", "sft-2222222222222222"
    pool = Pool(candidates={"base_models": [base], "models": [base, special, failed_special], "lr": [1e-3]},
                kinds={"base_models": "model", "models": "model", "lr": "number"}, join_types=["models"],
                initial_models=[base, special, failed_special])
    monkeypatch.chdir(tmp_path)
    atomic_write_json("results/agent/pool.json", pool.to_json())
    done = {"status": "done", "score": {"s_multi": 0.5, "tasks": {"arith": 0.5}}}
    initial = [dict(done, model=base, pipeline="base"), dict(done, model=special, pipeline="special"),
               dict(failed_step(0, failed_special), pipeline="failed-special")]
    atomic_write_json("results/agent/iter_0/step.json", {"iteration": 0, "initial": initial})
    atomic_write_json("results/agent/iter_1/step.json", dict(failed_step(1), score={"s_multi": 9.0, "tasks": {}}))
    atomic_write_json("results/agent/iter_2/step.json", dict(done, iteration=2, model="sft-3333333333333333",
                                                             pipeline="sft(special)"))
    loaded, history = agent_jobs._load_pool_and_history(None, 2)
    assert loaded.candidates["models"] == [base, special, "sft-3333333333333333"]
    assert loaded.candidates["base_models"] == [base]
    assert [h["status"] for h in history] == ["done", "done", "failed", "failed", "done"]

    records = [read_json(f"results/agent/iter_{i}/step.json") for i in range(3)]
    board = leaderboard_table(records)
    assert set(board["model"]) == {base, special, "sft-3333333333333333"}  # a failure score never ranks
    assert list(step_points(records)["model"]) == ["sft-3333333333333333"]


# ---- end to end ---------------------------------------------------------------------------------


def _kill_first_sft_job(workdir: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first model-building job's script process (a job lost to the infrastructure), once:
    every action of this test is an SFT."""
    while not stop.is_set() and not killed:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd == str(workdir) and any(part.endswith(b".build_model.py") for part in cmdline):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_diverging_action_is_fed_back_and_a_killed_job_is_retried(tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # max_fallback_rate 1: a random tiny model cannot answer; this test is about the failed actions.
    config = tiny_config(tiny_model_dir, iterations=2, controller={"type": "transformers", "model": "tiny",
                                                                   "max_fallback_rate": 1})
    config["objects"]["sft_lr"] = [1.0e10]  # every SFT the agent chooses diverges to a NaN loss
    config["action_types"] = {"sft": config["action_types"]["sft"]}
    del config["models"]["specialist-choice"]  # one specialist is enough here: a minute less
    config["objects"]["models"].remove("specialist-choice")
    config["resources"]["sft"]["retries"] = 1
    config["failures"] = {"score": -0.5}
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_sft_job, args=(workdir, stop, killed), daemon=True)
    killer.start()
    process = subprocess.Popen(snakemake_command(workdir, config_path, "results/leaderboard.tsv"), cwd=workdir,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output, timed_out = communicate_bounded(process, 600)
    stop.set()
    assert not timed_out and process.returncode == 0, output[-6000:]

    # The job killed from outside was retried by Snakemake and not recorded: both specialists are models.
    assert killed and "Trying to restart job" in output
    results = workdir / "results"
    plan = yaml.safe_load((results / "plan.yaml").read_text())
    for entry in plan["initial"]:
        assert entry.get("status") != "failed", entry
    for specialist in [e["model"] for e in plan["initial"] if e["model"] != "tiny"]:
        assert (results / "models" / specialist / "model.safetensors").is_file()

    # Every agent step diverged: recorded with the failure score, reason and log tail; the exploration went on.
    assert [s["iteration"] for s in plan["steps"]] == [1, 2]
    for step in plan["steps"]:
        assert step["status"] == "failed" and step["score"] == -0.5
        assert step["failure"]["kind"] == "diverged" and "training loss is nan" in step["failure"]["reason"]
        assert "TrainingDiverged" in step["failure"]["log_tail"]
        record = read_json(results / "agent" / f"iter_{step['iteration']}" / "step.json")
        assert record["failure"]["reason"] == step["failure"]["reason"]
        assert [p.name for p in (results / "models" / step["model"]).iterdir()
                if p.name != ".snakemake_timestamp"] == ["failure.json"]
        assert not (results / "scores" / f"{step['model']}.json").exists()
    # ... and the failed model was no candidate of the next step.
    proposal = read_json(results / "agent" / "iter_2" / "proposal.json")
    assert plan["steps"][0]["model"] not in json.dumps(proposal["recipe"]["inputs"])

    # The agent saw it in its next prompts: memory update of iteration 1, both selections of iteration 2.
    def prompts_of(name):
        return {c["kind"]: c["prompt"] for c in map(json.loads, (results / "agent" / name).read_text().splitlines())}

    seen = {**prompts_of("iter_2/propose_calls.jsonl"), "memory_update": prompts_of("iter_1/memory_calls.jsonl")["memory_update"]}
    assert set(seen) == {"type_selection", "object_selection", "memory_update"}
    for kind, prompt in seen.items():
        assert "action sft failed: training loss is nan" in prompt, kind

    board = (results / "leaderboard.tsv").read_text()
    assert all(step["model"] not in board for step in plan["steps"])

    # A rerun does not retry the deterministic failure.
    before = (results / "models" / plan["steps"][0]["model"] / "failure.json").stat().st_mtime_ns
    rerun = run_snakemake(workdir, config_path, "results/leaderboard.tsv", timeout=300)
    assert "Nothing to be done" in rerun.stdout
    assert (results / "models" / plan["steps"][0]["model"] / "failure.json").stat().st_mtime_ns == before


def test_the_evaluation_of_a_failed_action_records_the_failure_and_is_never_scored(tmp_path):
    """evaluation.with_build asks for a built model's evaluation before the outcome says whether it
    failed (both run in one cluster job): the evaluation says so instead of failing the job."""
    from lamdagent.actions.failures import failure_record, write_failure
    from lamdagent.workflow import evaluate as evaluate_rules

    model = "sft-aaaaaaaaaaaaaaaa"
    model_dir = tmp_path / "models" / model
    (tmp_path / "log.txt").write_text("Traceback ...\nTrainingDiverged: training loss is nan\n")
    write_failure(model_dir, failure_record(model=model, action="sft", kind="diverged", reason="training loss is nan",
                                            log_path=tmp_path / "log.txt", log_lines=5))
    evaluation = tmp_path / "evals" / model / "val.json"
    smk = SimpleNamespace(rule="evaluate", threads=1, config={"evaluation": DEFAULTS["evaluation"]},
                          params=SimpleNamespace(settings={}, tasks=["arith"]), input=SimpleNamespace(model=str(model_dir)),
                          output=SimpleNamespace(evaluation=str(evaluation)), log=[str(tmp_path / "evaluate.log")],
                          wildcards=SimpleNamespace(model=model, split="val"))
    evaluate_rules.evaluate(smk)
    record = read_json(evaluation)
    assert record["status"] == "failed" and record["tasks"] == {} and record["model"] == model
    assert record["failure"]["kind"] == "diverged" and record["failure"]["reason"] == "training loss is nan"

    score = SimpleNamespace(rule="score", threads=1, config={}, input=SimpleNamespace(evaluation=str(evaluation)),
                            output=SimpleNamespace(score=str(tmp_path / "score.json")), log=[str(tmp_path / "score.log")],
                            params=SimpleNamespace(eval_tasks=[], card_dir=""), wildcards=SimpleNamespace(model=model))
    with pytest.raises(ValueError, match=f"{model} holds no model, its action failed \\(training loss is nan\\)"):
        evaluate_rules.score(score)
    assert not (tmp_path / "score.json").exists()
