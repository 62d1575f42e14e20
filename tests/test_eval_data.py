"""Your own evaluation data: local and hub files as lm-eval tasks, held-out splits, config errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from gsm8k_format import gsm8k_rows, write_gsm8k

from lamdagent.config import load
from lamdagent.errors import ConfigError
from lamdagent.evaluation import eval_data
from lamdagent.evaluation.score import lm_eval_tasks
from lamdagent.store.fileio import read_jsonl

REPO = Path(__file__).resolve().parent.parent
DATA = {"train_examples": 8, "val_examples": 5, "test_examples": 7}
GSM = {"fields": {"prompt": "question", "answer": "answer"}, "extract": "after_marker"}


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def with_task(config: dict, task: dict) -> dict:
    config = copy.deepcopy(config)
    config["eval_tasks"] = [config["eval_tasks"][0], task]
    return config


@pytest.mark.parametrize("extract, gold, reply, expected", [
    ("after_marker", "Step 1.\n#### 1,250", "so\n#### 1,250.", "1,250."),  # exact_match drops the "."
    ("final_number", "9 + 3 = 12\n#### 12", "9 + 3 = 12. The answer is 12.", "12"),
    ("choice_letter", "B", "I pick [[C]].", "C"),
    ("text", "  Lisbon\n", "Lisbon\nbecause ...", "Lisbon"),
])
def test_one_regex_cuts_gold_and_reply(extract, gold, reply, expected):
    task = {"extract": extract}
    assert eval_data.extract_answer(reply, task) == expected
    assert eval_data.extract_answer(gold, task) is not None
    assert eval_data.extract_answer("no digits here", {"extract": "final_number"}) is None


def test_one_file_is_cut_into_disjoint_seeded_val_and_test(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    task = {"task": "gsm", "source": "local", "path": str(path), **GSM}
    splits = eval_data.load_splits(task, DATA, seed=3)
    assert [len(splits[s]) for s in ("val", "test")] == [5, 7]
    assert {r["prompt"] for r in splits["val"]}.isdisjoint(r["prompt"] for r in splits["test"])
    assert splits == eval_data.load_splits(task, DATA, seed=3)
    assert splits["val"] != eval_data.load_splits(task, DATA, seed=4)["val"]
    answers = {r["question"]: r["answer"].rsplit("#### ", 1)[1] for r in gsm8k_rows("test", 20)}
    assert all(answers[r["prompt"]] == r["answer"] for r in splits["val"] + splits["test"])


def test_a_repeated_prompt_never_lands_in_both_splits(tmp_path):
    rows = gsm8k_rows("test", 6) * 3  # every prompt three times
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = eval_data.load_splits({"task": "gsm", "source": "local", "path": str(path), **GSM},
                                   {**DATA, "val_examples": 2}, seed=0)
    assert len(splits["val"]) == 2 and len(splits["test"]) == 4


def test_explicit_split_files_that_overlap_are_refused(tmp_path):
    val = write_gsm8k(tmp_path / "val.jsonl", "val", 6)
    test = tmp_path / "test.jsonl"
    test.write_text(val.read_text().splitlines()[2] + "\n" + write_gsm8k(tmp_path / "t.jsonl", "test", 3).read_text())
    task = {"task": "gsm", "source": "local", "splits": {"val": str(val), "test": str(test)}, **GSM}
    with pytest.raises(eval_data.EvalDataError, match="1 prompt.*validation.*also in test"):
        eval_data.load_splits(task, DATA, seed=0)


def test_prepare_writes_data_and_lm_eval_yamls(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    task = {"task": "gsm", "source": "local", "path": str(path), **GSM, "max_gen_toks": 64}
    manifest = eval_data.prepare(task, tmp_path / "out", DATA, seed=0)
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"val": 5, "test": 7}
    spec = yaml.safe_load((tmp_path / "out" / "lamdagent_gsm_val.yaml").read_text())
    assert spec["task"] == "lamdagent_gsm_val" and spec["output_type"] == "generate_until"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "out" / "val.jsonl")
    assert spec["filter_list"][0]["filter"][0]["regex_pattern"] == r"\#\#\#\#\ \s*([^\n]*)"
    assert spec["generation_kwargs"]["max_gen_toks"] == 64
    assert len(read_jsonl(tmp_path / "out" / "test.jsonl")) == 7
    assert lm_eval_tasks(task, "test") == {"gsm": "lamdagent_gsm_test"}  # no ood split: none asked for


def test_hub_source_loads_with_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    write_gsm8k(repo / "test.jsonl", "test", 12)
    task = {"task": "gsm", "source": "hub", "repo": str(repo), **GSM}  # split: test, the default
    splits = eval_data.load_splits(task, DATA, seed=0)
    assert [len(splits[s]) for s in ("val", "test")] == [5, 7]
    with pytest.raises(eval_data.EvalDataError, match=r"split 'nope': cannot be loaded"):
        eval_data.load_splits({**task, "split": "nope"}, DATA, seed=0)


def test_split_prompts_of_every_kind_of_task(tmp_path, default_config):
    config = {**default_config, "data": DATA}
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    local = list(eval_data.split_prompts({"task": "gsm", "source": "local", "path": str(path), **GSM}, config))
    assert [s for s, _ in local].count("val") == 5 and [s for s, _ in local].count("test") == 7
    embedded = list(eval_data.split_prompts({"task": "arith"}, config))
    assert {s for s, _ in embedded} == {"val", "test", "ood"} and len(embedded) == 5 + 7 + 7


def test_config_accepts_a_local_task_and_reports_bad_ones(tmp_path, default_config):
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    good = {"task": "gsm", "source": "local", "path": str(path), **GSM}
    config = load(with_task(default_config, good), REPO)
    assert config["eval_tasks"][-1]["weight"] == "auto" and config["eval_tasks"][-1]["kind"] == "generate"
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"question": "q?", "answer": "no marker"}\n' * 30)
    for task, key, message in [
        ({**good, "path": str(tmp_path / "missing.jsonl")}, "eval_tasks[1].path", "file not found"),
        ({**good, "path": str(bad_rows)}, "eval_tasks[1].path", "finds no answer"),
        ({**good, "fields": {"prompt": "q"}}, "eval_tasks[1].path", "no field 'q'"),
        ({**good, "task": "choice"}, "eval_tasks[1].task", "embedded task"),
        ({**good, "task": "gsm-8k"}, "eval_tasks[1].task", "letters, digits"),
        ({k: v for k, v in good.items() if k != "path"}, "eval_tasks[1].path", "missing"),
        ({**good, "source": "hub", "split": "test"}, "eval_tasks[1].repo", "missing"),
    ]:
        with pytest.raises(ConfigError, match="config: " + key.replace("[", r"\[").replace("]", r"\]")) as err:
            load(with_task(default_config, task), REPO)
        assert message in str(err.value)
    few = write_gsm8k(tmp_path / "few.jsonl", "test", 4)
    with pytest.raises(ConfigError, match="leave none for test"):
        load(with_task({**default_config, "data": DATA}, {**good, "path": str(few)}), REPO)


def test_same_lm_eval_task_for_val_and_test_is_a_config_error(default_config):
    same = {"task": "gsm8k", "lm_eval_task": {"val": "lamdagent_arith_test", "test": "lamdagent_arith_test"}}
    with pytest.raises(ConfigError, match=r"eval_tasks\[1\]\.lm_eval_task: .*same task and split"):
        load(with_task(default_config, same), REPO)
    load(with_task(default_config, {**same, "allow_same_split": True}), REPO)


def test_unknown_lm_eval_task_names_the_key_and_include_paths_add_tasks(tmp_path, default_config):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_task.yaml").write_text(
        "task: my_task_val\ninclude: ../../no/such/base.yaml\n"  # indexed by name; never loaded here
    )
    mine = {"task": "mine", "lm_eval_task": {"val": "my_task_val"}}
    with pytest.raises(ConfigError, match=r"eval_tasks\[1\]\.lm_eval_task\.val: unknown lm-eval task 'my_task_val'"):
        load(with_task(default_config, mine), tmp_path)
    config = with_task(default_config, mine)
    config["evaluation"] = {"include_paths": ["mine"]}
    load(config, tmp_path)
    config["evaluation"] = {"include_paths": ["nowhere"]}
    with pytest.raises(ConfigError, match=r"evaluation\.include_paths\[0\]"):
        load(config, tmp_path)


def test_gsm8k_local_example_is_valid_with_gsm8k_format_files(tmp_path):
    config = yaml.safe_load((REPO / "config" / "examples" / "gsm8k-local.yaml").read_text())
    with pytest.raises(ConfigError, match=r"datasets\.gsm8k\.path: .*file not found"):
        load(copy.deepcopy(config), tmp_path)
    write_gsm8k(tmp_path / "data/gsm8k/train.jsonl", "train", 40)
    write_gsm8k(tmp_path / "data/gsm8k/test.jsonl", "test", 120)
    loaded = load(config, tmp_path)
    assert loaded["eval_tasks"][0]["source"] == "local"
    splits = eval_data.load_splits(loaded["eval_tasks"][0], loaded["data"], loaded["seed"], tmp_path)
    assert [len(splits[s]) for s in ("val", "test")] == [100, 20]


def test_judge_task_needs_a_judge_and_is_scored_out_of_ten(tmp_path, default_config):
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    judged = {"task": "mt", "source": "local", "path": str(path), "kind": "judge", "fields": {"prompt": "question"}}
    with pytest.raises(ConfigError, match=r"evaluation\.judge: missing"):
        load(with_task(default_config, judged), REPO)
    config = with_task(default_config, judged)
    config["evaluation"] = {"judge": {"model": "gpt-4o", "api_key_env": "JUDGE_KEY"}}
    task = load(config, REPO)["eval_tasks"][-1]
    from lamdagent.evaluation.score import alpha

    assert task["metric"] == "rating" and alpha(task) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"eval_tasks\[1\]\.kind"):
        load(with_task(config, {"task": "choice", "kind": "judge"}), REPO)


def test_judge_prompt_and_rating_format():
    from lamdagent.evaluation.judge import judge_prompt, parse_rating

    prompt = judge_prompt("What is 2+3?", "5")
    assert "[Question]\nWhat is 2+3?" in prompt and "[The Start of Assistant's Answer]\n5\n" in prompt
    assert "Rating: [[5]]" in prompt and "Reference" not in prompt
    assert "[The Start of Reference Answer]\n5 apples" in judge_prompt("q", "a", reference="5 apples")
    assert parse_rating("Good answer. Rating: [[8]]") == 8.0
    assert parse_rating("[[3]] then, on reflection, Rating: [[6.5]]") == 6.5
    for reply in ("Rating: 8", "Rating: [[0]]", "Rating: [[11]]", "Rating: [[77]]", ""):
        assert parse_rating(reply) is None


def test_split_prompts_of_a_users_lm_eval_task(tmp_path, default_config):
    from test_own_eval_workflow import my_lm_eval_task

    write_gsm8k(tmp_path / "val.jsonl", "val", 4)
    my_lm_eval_task(tmp_path / "my_tasks", "my_gsm_val", tmp_path / "val.jsonl")
    config = {**default_config, "evaluation": {"include_paths": ["my_tasks"]}}
    prompts = list(eval_data.split_prompts({"task": "mine", "lm_eval_task": {"val": "my_gsm_val"}}, config, tmp_path))
    assert prompts == [("val", r["question"]) for r in gsm8k_rows("val", 4)]


def test_contamination_guard_reads_local_eval_tasks(tmp_path, default_config):
    """Training on the file a local eval task holds out is caught by the guard (issue 24) before any job."""
    from lamdagent.evaluation.contamination import ContaminationError, guard

    test = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    config = with_task({**default_config, "data": DATA},
                       {"task": "gsm", "source": "local", "path": str(test), **GSM})
    config["datasets"]["leaky"] = {"source": "local", "path": str(test),
                                   "fields": {"prompt": "question", "completion": "answer"}}
    config["objects"]["sft_dataset"] = [*config["objects"]["sft_dataset"], "leaky"]
    with pytest.raises(ContaminationError, match=r"leaky.*gsm|gsm.*leaky"):
        guard(load(config, REPO), REPO, cache_dir=tmp_path / "cache")
    train = write_gsm8k(tmp_path / "train.jsonl", "train", 20)
    config["datasets"]["leaky"]["path"] = str(train)
    guard(load(config, REPO), REPO, cache_dir=tmp_path / "cache")
