"""Your own evaluation through the workflow: file and hub tasks, your lm-eval tasks, failing once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e import run_snakemake, tiny_config
from gsm8k_format import write_gsm8k
from lamdagent.fileio import read_json, read_jsonl

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
    for model_dir in (tmp_path / "results/evals").iterdir():
        val = read_json(model_dir / "val.json")
        assert set(val["tasks"]) == {"lamdagent_gsm_val", "my_gsm_val"}
        assert {s["prompt"] for s in val["samples"]["lamdagent_gsm_val"]} == val_prompts
        test = read_json(model_dir / "test.json")
        assert set(test["tasks"]) == {"lamdagent_gsm_test", "my_gsm_test"} and test["tasks"]["lamdagent_gsm_test"]["n"] == 8
    score = read_json(tmp_path / "results/scores/specialist-gsm.json")
    assert set(score["tasks"]) == {"gsm", "mine"} and score["weights"] == {"gsm": 1.0, "mine": 1.0}
    step = json.loads((tmp_path / "results/agent/iter_1/step.json").read_text())
    assert step
