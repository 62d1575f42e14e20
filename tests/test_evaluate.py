"""lamdagent.evaluation.evaluate: a real lm-eval run on the tiny random model, and the pure helpers."""

from __future__ import annotations

import pytest

from lamdagent.data.tasks import TASKS, write_splits
from lamdagent.evaluation.evaluate import (TASKS_DIR, evaluate, model_args, needs_default_tasks, own_task_names,
                                           task_metric)
from lamdagent.store.fileio import read_json, read_jsonl


def test_own_task_names_are_the_nine_yaml_tasks():
    assert own_task_names() == {f"lamdagent_{t}_{s}" for t in TASKS for s in ("val", "test", "ood")}
    assert TASKS_DIR.is_dir()


def test_model_args_for_the_hf_backend_and_no_other():
    assert model_args("hf", "/m", "cpu", "float32", 8) == (
        "hf", {"pretrained": "/m", "device": "cpu", "dtype": "float32", "batch_size": 8})
    # vLLM is not offered until an environment installs it and a test runs it (no stub backend).
    for backend in ("vllm", "sglang"):
        with pytest.raises(ValueError, match="unknown backend"):
            model_args(backend, "/m", "cuda", "bfloat16", 8)


RESULT = {
    "tasks": {
        "t1": {"exact_match,extract": 0.5, "exact_match_stderr,extract": 0.1, "n": 4},
        "t2": {"exact_match,strict": 0.25, "exact_match,flex": 0.75, "n": 4},
    }
}


def test_task_metric_bare_and_full_keys():
    assert task_metric(RESULT, "t1", "exact_match") == 0.5
    assert task_metric(RESULT, "t1", "exact_match,extract") == 0.5
    assert task_metric(RESULT, "t2", "exact_match,flex") == 0.75


@pytest.mark.parametrize(
    "task, metric, message",
    [
        ("t2", "exact_match", r"several keys.*'t2'|'t2'.*several"),
        ("t1", "acc", "no keys"),
        ("t1", "exact_match,strict", "no metric"),
        ("t3", "exact_match", "not in this evaluation"),
    ],
)
def test_task_metric_errors_name_the_task_and_keys(task, metric, message):
    with pytest.raises(ValueError, match=message) as err:
        task_metric(RESULT, task, metric)
    assert task in str(err.value)
    if task != "t3":
        assert "exact_match" in str(err.value)  # the available keys are listed


def test_evaluate_tiny_model_writes_the_result_json(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAMLs read results/data/... relative to the working directory
    for task in TASKS:
        write_splits(task, tmp_path / "results" / "data" / task, {"val": 6}, seed=0)
    names = [f"lamdagent_{t}_val" for t in TASKS]
    out = tmp_path / "eval" / "scores.json"
    result = evaluate(tiny_model_dir, names, out, batch_size=4, device="cpu", limit=3, seed=1)

    assert read_json(out) == result
    assert result["model_dir"] == str(tiny_model_dir)
    assert set(result["tasks"]) == set(result["samples"]) == set(names)
    assert result["settings"] == {"batch_size": 4, "device": "cpu", "dtype": "float32", "backend": "hf",
                                  "limit": 3, "seed": 1}
    assert set(result["versions"]) == {"lm_eval", "transformers"} and result["versions"]["lm_eval"]
    assert result["timing"]["include_defaults"] is False
    assert 0 < result["timing"]["startup_s"] <= result["timing"]["total_s"]
    for name in names:
        metrics = result["tasks"][name]
        assert metrics["n"] == 3
        assert 0.0 <= metrics["exact_match,extract"] <= 1.0
        assert "exact_match_stderr,extract" in metrics
        assert task_metric(result, name, "exact_match") == metrics["exact_match,extract"]
        samples = result["samples"][name]
        docs = read_jsonl(tmp_path / "results" / "data" / name.split("_")[1] / "val.jsonl")
        assert [s["doc_id"] for s in samples] == [0, 1, 2]
        for s, doc in zip(samples, docs):
            assert set(s) == {"doc_id", "prompt", "target", "response", "filtered", "exact_match"}
            assert (s["prompt"], s["target"]) == (doc["prompt"], doc["answer"])
            assert isinstance(s["response"], str) and isinstance(s["filtered"], str)
        # The reported score is the mean of the per-sample scores kept for audit.
        assert metrics["exact_match,extract"] == pytest.approx(sum(s["exact_match"] for s in samples) / 3)


def test_default_task_index_only_for_foreign_tasks(tmp_path):
    assert not needs_default_tasks(["lamdagent_arith_val", "lamdagent_context_ood"])
    assert needs_default_tasks(["lamdagent_arith_val", "gsm8k"])
    (tmp_path / "mine.yaml").write_text("task: my_extra_task\ninclude: base.yaml\n")
    assert needs_default_tasks(["my_extra_task"])
    assert not needs_default_tasks(["my_extra_task", "lamdagent_choice_test"], extra_include_paths=[tmp_path])
