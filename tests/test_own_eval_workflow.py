"""Your own evaluation through the workflow: file and hub tasks, your lm-eval tasks, failing once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from e2e import run_snakemake, tiny_config
from gsm8k_format import write_gsm8k

from lamdagent.store.fileio import read_json, read_jsonl

GSM = {"fields": {"prompt": "question", "answer": "answer"}, "extract": "final_number", "max_gen_toks": 16}


def write_config(workdir: Path, config: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def my_lm_eval_task(root: Path, name: str, data_file: Path) -> None:
    """A user's own lm-eval task over a local GSM8k-format file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer.split('#### ')[-1]}}", "generation_kwargs": {"until": [], "max_gen_toks": 8},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))


def test_prepare_and_fetch_write_the_task_files(tmp_path, tiny_model_dir):
    write_gsm8k(tmp_path / "gsm8k" / "test.jsonl", "test", 14)
    write_gsm8k(tmp_path / "mine" / "val.jsonl", "val", 4)
    my_lm_eval_task(tmp_path / "my_tasks", "my_gsm_val", tmp_path / "mine" / "val.jsonl")
    config = tiny_config(tiny_model_dir)
    config["eval_tasks"] = [{"task": "gsm", "source": "local", "path": "gsm8k/test.jsonl", **GSM},
                            {"task": "mine", "lm_eval_task": {"val": "my_gsm_val"}}]
    config["evaluation"] = {"include_paths": ["my_tasks"]}
    run_snakemake(tmp_path, write_config(tmp_path, config), "results/eval_tasks/gsm",
                  "results/lm_eval_data/my_gsm_val.json", timeout=300)
    manifest = read_json(tmp_path / "results/eval_tasks/gsm/manifest.json")
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"val": 6, "test": 6}
    assert not set(manifest["splits"]["val"]["prompt_sha256"]) & set(manifest["splits"]["test"]["prompt_sha256"])
    assert (tmp_path / "results/eval_tasks/gsm/lamdagent_gsm_test.yaml").is_file()
    assert read_json(tmp_path / "results/lm_eval_data/my_gsm_val.json")["docs"] == 4


@pytest.mark.parametrize("broken", ["hub", "lm_eval"])
def test_data_that_cannot_be_loaded_fails_once_with_its_reason(tmp_path, tiny_model_dir, broken):
    config = tiny_config(tiny_model_dir)
    if broken == "hub":  # no network (HF_DATASETS_OFFLINE) and no such dataset in the cache
        config["eval_tasks"] = [{"task": "gsm", "source": "hub", "repo": "nobody/no-such-gsm8k", **GSM}]
        target, rule, reason = "results/eval_tasks/gsm", "prepare_eval_task", "nobody/no-such-gsm8k split 'test'"
    else:  # the user's lm-eval task names a data file that is not there
        my_lm_eval_task(tmp_path / "my_tasks", "my_gsm_val", tmp_path / "missing.jsonl")
        config["eval_tasks"] = [{"task": "mine", "lm_eval_task": {"val": "my_gsm_val"}}]
        config["evaluation"] = {"include_paths": ["my_tasks"]}
        target, rule, reason = "results/lm_eval_data/my_gsm_val.json", "fetch_lm_eval_task", "missing.jsonl"
    # A profile's global --retries (profiles/slurm has 2) must not retry a deterministic failure.
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "--retries", "2", target,
                           timeout=300, check=False)
    assert result.returncode != 0
    assert result.stdout.count(f"Error in rule {rule}") == 1, result.stdout[-4000:]
    assert "Trying to restart" not in result.stdout
    log = (tmp_path / "results/logs" / rule / f"{Path(target).stem}.log").read_text()
    assert reason in log and reason in result.stdout, log[-3000:]


@pytest.mark.slow
def test_exploration_trains_and_evaluates_from_local_gsm8k_files(tmp_path, tiny_model_dir):
    """No network: SFT on a local GSM8k-format train file, validation and test held out of the test
    file, and the user's own lm-eval task beside it; the agent's score comes from those files."""
    write_gsm8k(tmp_path / "gsm8k" / "train.jsonl", "train", 16)
    write_gsm8k(tmp_path / "gsm8k" / "test.jsonl", "test", 12)
    write_gsm8k(tmp_path / "mine" / "val.jsonl", "val", 3)
    write_gsm8k(tmp_path / "mine" / "test.jsonl", "ood", 3)
    my_lm_eval_task(tmp_path / "my_tasks", "my_gsm_val", tmp_path / "mine" / "val.jsonl")
    my_lm_eval_task(tmp_path / "my_tasks", "my_gsm_test", tmp_path / "mine" / "test.jsonl")
    config = tiny_config(tiny_model_dir, iterations=1)
    config["models"] = {"tiny": config["models"]["tiny"],
                        "specialist-gsm": {"recipe": {"action": "sft", "objects": ["tiny", "gsm8k", 1.0e-3]}}}
    config["datasets"] = {"gsm8k": {"source": "local", "path": "gsm8k/train.jsonl",
                                    "fields": {"prompt": "question", "completion": "answer"}}}
    config["objects"] = {"models": ["tiny", "specialist-gsm"], "sft_dataset": ["gsm8k"], "sft_lr": [1.0e-3]}
    config["action_types"] = {"sft": ["models", "sft_dataset", "sft_lr"]}
    config["eval_tasks"] = [{"task": "gsm", "source": "local", "path": "gsm8k/test.jsonl", **GSM},
                            {"task": "mine", "lm_eval_task": {"val": "my_gsm_val", "test": "my_gsm_test"}}]
    config["evaluation"] = {"batch_size": 8, "include_paths": ["my_tasks"]}
    config["data"] = {"train_examples": 16, "val_examples": 4, "test_examples": 8}
    config["report"] = {"top_k": 1}
    run_snakemake(tmp_path, write_config(tmp_path, config), timeout=1500)
    val_prompts = {r["prompt"] for r in read_jsonl(tmp_path / "results/eval_tasks/gsm/val.jsonl")}
    test_prompts = {r["prompt"] for r in read_jsonl(tmp_path / "results/eval_tasks/gsm/test.jsonl")}
    assert len(val_prompts) == 4 and len(test_prompts) == 8 and not val_prompts & test_prompts
    evals = sorted((tmp_path / "results/evals").iterdir())
    assert len(evals) >= 2  # tiny, the specialist (and the agent's model)
    for model_dir in evals:
        val = read_json(model_dir / "val.json")
        assert set(val["tasks"]) == {"lamdagent_gsm_val", "my_gsm_val"}
        assert {s["prompt"] for s in val["samples"]["lamdagent_gsm_val"]} == val_prompts
    tests = [read_json(path) for path in (tmp_path / "results/evals").glob("*/test.json")]
    assert tests and all(set(t["tasks"]) == {"lamdagent_gsm_test", "my_gsm_test"} for t in tests)
    assert all(t["tasks"]["lamdagent_gsm_test"]["n"] == 8 and t["tasks"]["my_gsm_test"]["n"] == 3 for t in tests)
    scores = [read_json(path) for path in (tmp_path / "results/scores").glob("*.json")]
    assert len(scores) == len(evals)
    assert all(set(s["tasks"]) == {"gsm", "mine"} and s["weights"] == {"gsm": 1.0, "mine": 1.0} for s in scores)
    assert (tmp_path / "results/leaderboard.tsv").read_text().count("\n") == len(evals) + 1


def judged_config(tmp_path: Path, tiny_model_dir: Path, judge: dict) -> dict:
    """The tiny model evaluated on one judged task (3 validation prompts of a GSM8k-format file)."""
    write_gsm8k(tmp_path / "prompts.jsonl", "test", 8)
    config = tiny_config(tiny_model_dir)
    config["eval_tasks"] = [{"task": "mt", "kind": "judge", "source": "local", "path": "prompts.jsonl",
                             "fields": {"prompt": "question", "answer": "answer"}, "max_gen_toks": 8}]
    config["data"] = {"train_examples": 4, "val_examples": 3, "test_examples": 5}
    config["evaluation"] = {"batch_size": 4, "judge": judge}
    return config


@pytest.mark.slow
def test_judge_grades_through_a_real_server_and_fails_clearly_without_ratings(tmp_path, tiny_model_dir,
                                                                              openai_server, monkeypatch):
    """The model answers in rule evaluate; rule judge sends every answer to `transformers serve` (the
    tiny random model, which never writes "[[N]]"): its replies are kept and the evaluation fails,
    once, saying so; it is never scored 0. A judge that cannot be reached fails the same way."""
    monkeypatch.setenv("JUDGE_KEY", "not-a-secret")
    config = judged_config(tmp_path, tiny_model_dir, {
        "model": str(tiny_model_dir), "base_url": openai_server, "api_key_env": "JUDGE_KEY", "max_tokens": 12,
        "backoff": {"attempts": 2, "initial_s": 0.1, "max_s": 0.2}})
    config_path = write_config(tmp_path, config)
    result = run_snakemake(tmp_path, config_path, "--retries", "2", "results/evals/tiny/val.json",
                           timeout=600, check=False)
    assert result.returncode != 0 and result.stdout.count("Error in rule judge") == 1, result.stdout[-4000:]
    assert "none of the judge's 3 replies has a rating in the format [[N]]" in result.stdout
    answers = read_json(tmp_path / "results/evals/tiny/val.answers.json")
    assert len(answers["samples"]["lamdagent_mt_val"]) == 3
    record = read_json(tmp_path / "results/logs/judge/tiny.val.failed.json")
    assert record["status"] == "failed" and len(record["samples"]) == 3
    for sample in record["samples"]:
        assert sample["rating"] is None and sample["judge_reply"] and sample["response"] in sample["judge_prompt"]
        assert "[The Start of Reference Answer]" in sample["judge_prompt"]  # the gold answer as reference
    assert not (tmp_path / "results/evals/tiny/val.json").exists()

    # No server: every call fails after its retries; the evaluation fails and the error is recorded.
    config["evaluation"]["judge"]["base_url"] = "http://127.0.0.1:9/v1"
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "results/evals/tiny/val.json",
                           timeout=300, check=False)
    assert result.returncode != 0 and "the judge call failed after its retries" in result.stdout
    assert "not-a-secret" not in result.stdout
    record = read_json(tmp_path / "results/logs/judge/tiny.val.failed.json")
    assert "no reply after 2 attempt(s)" in record["samples"][0]["judge_error"]


@pytest.fixture(scope="module")
def rating_judge_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A judge that follows MT-Bench's format: the tiny model fine-tuned (by the project's own SFT) to
    close every judge prompt with "Rating: [[8]]". Small, deterministic and real: served over HTTP, it
    generates its reply token by token like any judge."""
    from lamdagent.store.fileio import write_jsonl
    from lamdagent.evaluation.judge import judge_prompt
    from lamdagent.actions.train import sft

    root = tmp_path_factory.mktemp("rating-judge")
    answers = ["It is 12.", "", "zq " * 9, "The answer is 40 because 5 times 8 is 40.", "?", "no", "1 2 3 4", "ok ok"]
    rows = [{"prompt": judge_prompt("Compute this. " * (i % 4) + f"What is {i} times {i + 3}?", answers[i],
                                    str(i * (i + 3))), "completion": "Rating: [[8]]"} for i in range(8)]
    write_jsonl(root / "train.jsonl", rows)
    # A constant learning rate: with the default linear decay 40 steps do not fix the reply.
    sft(tiny_model_dir, root / "train.jsonl", root / "judge", learning_rate=1e-2, epochs=40, batch_size=8,
        max_length=384, seed=0, lr_scheduler_type="constant")
    return root / "judge"


@pytest.mark.slow
def test_judge_grades_every_answer_and_the_rating_is_the_score(tmp_path, tiny_model_dir, rating_judge_dir,
                                                               monkeypatch):
    """The success path against a real server: every answer graded, the ratings' mean is the task's
    metric (maximum 10, so `weight: auto` is 1/10 as in the paper), the judge's prompts, replies and
    ratings are in the evaluation JSON, and the key never reaches results/."""
    from conftest import ServedModel

    monkeypatch.setenv("JUDGE_KEY", "judge-secret-value")
    server = ServedModel(rating_judge_dir, tmp_path).start()
    try:
        config = judged_config(tmp_path, tiny_model_dir, {
            "model": str(rating_judge_dir), "base_url": server.url, "api_key_env": "JUDGE_KEY", "max_tokens": 16})
        config_path = write_config(tmp_path, config)
        run_snakemake(tmp_path, config_path, "results/scores/tiny.json", timeout=600)
    finally:
        server.stop()
    val = read_json(tmp_path / "results/evals/tiny/val.json")
    graded = val["tasks"]["lamdagent_mt_val"]
    assert graded == {"rating,judge": 8.0, "rating_stderr,judge": 0.0, "n": 3, "rated": 3}
    for sample in val["samples"]["lamdagent_mt_val"]:
        assert sample["rating"] == 8.0 and sample["judge_reply"].strip().endswith("[[8]]")
        assert sample["response"] in sample["judge_prompt"] and "[The Start of Reference Answer]" in sample["judge_prompt"]
    assert val["judge"]["calls"] == 3 and val["judge"]["base_url"] == server.url
    score = read_json(tmp_path / "results/scores/tiny.json")
    assert score["weights"] == {"mt": 0.1} and score["s_multi"] == pytest.approx(0.8)
    assert not (tmp_path / "results/logs/judge/tiny.val.failed.json").exists()
    leaked = [p for p in (tmp_path / "results").rglob("*") if p.is_file() and b"judge-secret-value" in p.read_bytes()]
    assert leaked == []
