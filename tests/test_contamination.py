"""The contamination guard: training data holding evaluation prompts, and validation prompts in a
test split, stop the run before any job (or in the first evaluation job for lm-eval documents)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lamdagent.config import load
from lamdagent.data.datasets import prepare
from lamdagent.data.tasks import generate, write_splits
from lamdagent.errors import ConfigError
from lamdagent.evaluation import contamination
from lamdagent.evaluation.contamination import ContaminationError, guard
from lamdagent.evaluation.eval_data import task_yaml
from lamdagent.store.fileio import write_jsonl

REPO = Path(__file__).resolve().parent.parent
UNRELATED = [{"prompt": "Name a colour of the sky.", "completion": "blue"},
             {"prompt": "What is two plus two?", "completion": "4"}]


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _with_local_dataset(config: dict, tmp_path: Path, rows: list[dict], **extra) -> dict:
    """The default config, plus a local SFT dataset `mine` among the agent's SFT candidates."""
    config = copy.deepcopy(config)
    write_jsonl(tmp_path / "mine.jsonl", rows)
    config["datasets"]["mine"] = {"source": "local", "path": str(tmp_path / "mine.jsonl")}
    config["objects"]["sft_dataset"].append("mine")
    config.update(extra)
    return load(config, REPO)


def _eval_prompt(config: dict, task: str, split: str, index: int = 0) -> str:
    size = config["data"]["val_examples" if split == "val" else "test_examples"]
    return generate(task, split, size, config["seed"])[index]["prompt"]


def test_the_embedded_default_is_clean(default_config):
    result = guard(load(copy.deepcopy(default_config), REPO))
    assert set(result["training"]) == {"arith", "choice", "context", "all", "train-all"}
    assert {n for per_task in result["training"].values() for per in per_task.values() for n in per.values()} == {0}
    assert result["held_out"]["arith"] == {"val/test": 0, "val/ood": 0}
    assert result["eval_rows"]["arith/test"] == default_config["data"]["test_examples"]
    assert not result["deferred"]


def test_a_training_file_without_evaluation_rows_passes(default_config, tmp_path):
    result = guard(_with_local_dataset(default_config, tmp_path, UNRELATED))
    assert result["training"]["mine"]["arith"] == {"val": 0, "test": 0, "ood": 0}


def test_one_shared_row_is_a_config_error_naming_dataset_task_split_and_count(default_config, tmp_path):
    leaked = {"prompt": _eval_prompt(default_config, "arith", "test", 3), "completion": "The answer is 1."}
    config = _with_local_dataset(default_config, tmp_path, UNRELATED + [leaked])
    with pytest.raises(ContaminationError) as caught:
        guard(config)
    message = str(caught.value)
    assert message.startswith("config: datasets.mine: 1 of 12 rows of eval task 'arith', split 'test'")
    assert "\n" not in message


def test_a_row_differing_only_in_whitespace_and_case_is_the_same_row(default_config, tmp_path):
    prompt = _eval_prompt(default_config, "choice", "val", 0)
    disguised = "  " + prompt.upper().replace(" ", "   ").replace("\n", " \n\t") + "\n"
    assert disguised != prompt
    config = _with_local_dataset(default_config, tmp_path, UNRELATED + [{"prompt": disguised, "completion": "[[A]]"}])
    with pytest.raises(ContaminationError, match=r"datasets\.mine: 1 of 16 rows of eval task 'choice', split 'val'"):
        guard(config)


def test_an_allowed_pair_passes_and_a_typo_in_allow_is_an_error(default_config, tmp_path):
    leaked = {"prompt": _eval_prompt(default_config, "arith", "test"), "completion": "x"}
    allow = {"allow": [{"dataset": "mine", "task": "arith", "split": "test"}]}
    config = _with_local_dataset(default_config, tmp_path, [leaked], contamination=allow)
    assert guard(config)["training"]["mine"]["arith"]["test"] == 1
    # Allowed for another split only: still an error.
    config["contamination"] = {"allow": [{"dataset": "mine", "task": "arith", "split": "val"}]}
    with pytest.raises(ContaminationError, match="split 'test'"):
        guard(config)
    config["contamination"] = {"allow": [{"dataset": "mnie", "task": "arith"}]}
    with pytest.raises(ConfigError, match=r"^config: contamination\.allow\[0\]\.dataset: 'mnie'"):
        guard(config)
    with pytest.raises(ConfigError, match=r"contamination\.allow\[0\]\.split"):
        load(dict(copy.deepcopy(default_config), contamination={"allow": [{"dataset": "arith", "task": "arith",
                                                                            "split": "train"}]}), REPO)


def test_the_cache_is_keyed_by_the_files_it_read(default_config, tmp_path):
    cache = tmp_path / "cache"
    config = _with_local_dataset(default_config, tmp_path, UNRELATED)
    guard(config, cache_dir=cache)
    assert json.loads((cache / contamination.CACHE_FILE).read_text())["counts"]["training"]["mine"]
    # The user adds a test row to the file: the cached clean result must not hide it.
    write_jsonl(tmp_path / "mine.jsonl", UNRELATED + [{"prompt": _eval_prompt(default_config, "context", "ood"),
                                                       "completion": "x"}])
    with pytest.raises(ContaminationError, match="eval task 'context', split 'ood'"):
        guard(config, cache_dir=cache)


def test_lineage_records_zero_overlaps_for_the_embedded_default(default_config, tmp_path, monkeypatch):
    from lamdagent.lineage.records import dataset_node

    config = load(copy.deepcopy(default_config), REPO)
    monkeypatch.chdir(tmp_path)
    train = write_splits("arith", tmp_path / "results" / "data" / "arith",
                         {"train": config["data"]["train_examples"]}, config["seed"])["train"]
    prepare(config["datasets"]["arith"], tmp_path / "arith.jsonl", task_train_files=[train])
    node = dataset_node("arith", tmp_path / "arith.jsonl", config["datasets"]["arith"], config)
    assert node["contamination"]["overlaps"] == {task: {"val": 0, "test": 0, "ood": 0}
                                                 for task in ("arith", "choice", "context")}
    assert node["contamination"]["allowed"] == []


def test_lineage_records_an_allowed_overlap(default_config, tmp_path, monkeypatch):
    from lamdagent.lineage.records import dataset_node

    leaked = {"prompt": _eval_prompt(default_config, "arith", "val", 2), "completion": "x"}
    config = _with_local_dataset(default_config, tmp_path, UNRELATED + [leaked],
                                 contamination={"allow": [{"dataset": "mine", "task": "arith"}]})
    monkeypatch.chdir(tmp_path)
    node = dataset_node("mine", tmp_path / "mine.jsonl", config["datasets"]["mine"], config)
    assert node["contamination"]["overlaps"]["arith"] == {"val": 1, "test": 0, "ood": 0}
    assert node["contamination"]["allowed"] == ["arith/val"]


def _lm_eval_config(default_config: dict, tmp_path: Path, rows: list[dict], lm_eval_task: dict) -> dict:
    """A local training file and an evaluation task named by lm-eval task names (read only in a job)."""
    config = _with_local_dataset(default_config, tmp_path, rows)
    config["eval_tasks"] = [{"task": "ext", "lm_eval_task": lm_eval_task, "metric": "exact_match", "weight": "auto"}]
    return config


def test_lm_eval_documents_are_checked_by_the_first_evaluation_job(default_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(copy.deepcopy(default_config), REPO)
    write_splits("arith", tmp_path / "results" / "data" / "arith", {"val": 16, "test": 12}, config["seed"])
    leaked = {"prompt": _eval_prompt(default_config, "arith", "val", 5), "completion": "x"}
    config = _lm_eval_config(default_config, tmp_path, UNRELATED + [leaked],
                             {"val": "lamdagent_arith_val", "test": "lamdagent_arith_test"})
    # Parse time cannot read lm-eval documents: the pair is deferred, not passed as clean.
    result = guard(config, tmp_path)
    assert result["training"]["mine"]["ext"] == {"val": None, "test": None}
    assert result["deferred"]["ext/val"].startswith("lm-eval task lamdagent_arith_val")
    with pytest.raises(ContaminationError) as caught:
        contamination.check_deferred(config, tmp_path)
    assert str(caught.value).startswith("config: datasets.mine: 1 of 16 rows of eval task 'ext', split 'val'")
    # Recorded: the next parse stops with the same message before any job.
    with pytest.raises(ContaminationError) as again:
        guard(config, tmp_path)
    assert str(again.value) == str(caught.value)


def test_validation_and_test_on_the_same_lm_eval_documents_stop_the_run(default_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(copy.deepcopy(default_config), REPO)
    write_splits("arith", tmp_path / "results" / "data" / "arith", {"test": 12}, config["seed"])
    config = _lm_eval_config(default_config, tmp_path, UNRELATED,
                             {"val": "lamdagent_arith_test", "test": "lamdagent_arith_test"})
    with pytest.raises(ContaminationError, match=r"^config: eval_tasks\[0\]: 12 of 12 rows of task 'ext', "
                                                 r"split 'test' are in its split 'val'"):
        contamination.check_deferred(config, tmp_path)
    allowed = copy.deepcopy(config)
    allowed["contamination"] = {"allow": [{"task": "ext", "splits": ["val", "test"]}]}
    assert contamination.check_deferred(allowed, tmp_path)["held_out"]["ext"]["val/test"] == 12
    # allow_same_split (which lets the config name one task for both) lets its rows through as well.
    config["eval_tasks"][0]["allow_same_split"] = True
    assert contamination.check_deferred(config, tmp_path)["held_out"]["ext"]["val/test"] == 12


def test_a_clean_embedded_config_needs_no_evaluation_job_check(default_config):
    assert contamination.check_deferred(load(copy.deepcopy(default_config), REPO)) is None


def test_snakemake_stops_before_any_job_on_a_leaked_test_row(tmp_path, tiny_model_dir):
    from e2e import run_snakemake, tiny_config

    config = tiny_config(tiny_model_dir)
    leaked = generate("arith", "test", config["data"]["test_examples"], config["seed"])[1]
    write_jsonl(tmp_path / "mine.jsonl", UNRELATED + [{"prompt": leaked["prompt"], "completion": leaked["completion"]}])
    config["datasets"]["mine"] = {"source": "local", "path": "mine.jsonl"}
    config["objects"]["sft_dataset"].append("mine")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(tmp_path, path, check=False, timeout=120)
    assert result.returncode != 0
    assert "config: datasets.mine: 1 of 6 rows of eval task 'arith', split 'test' are in this training dataset" \
        in result.stdout
    assert not (tmp_path / "results").exists()
    # Allowed knowingly, the same workflow parses (a dry run lists its first jobs).
    config["contamination"] = {"allow": [{"dataset": "mine", "task": "arith", "split": "test"}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert "prepare_dataset" in run_snakemake(tmp_path, path, "--dry-run", timeout=120).stdout


@pytest.mark.slow
def test_a_real_run_records_zero_overlaps_and_an_evaluation_job_stops_on_lm_eval_overlap(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from e2e import run_snakemake, tiny_config

    from lamdagent.store.fileio import read_json

    # The embedded tasks: the specialists' lineage says 0 shared rows with every evaluation split.
    clean = tmp_path / "clean"
    clean.mkdir()
    path = clean / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, iterations=1), sort_keys=False))
    run_snakemake(clean, path, "results/agent/iter_0/step.json", timeout=900)
    built = sorted((clean / "results" / "models").glob("sft-*"))
    assert len(built) == 2
    for model_dir in built:
        record = read_json(model_dir / "lineage.json")["datasets"]["dataset"]["contamination"]
        assert record["overlaps"] == {task: {"val": 0, "test": 0, "ood": 0} for task in ("arith", "choice")}
        shown = subprocess.run([str(Path(sys.executable).with_name("lamdagent")), "lineage", str(model_dir)],
                               capture_output=True, text=True, check=True).stdout
        assert "rows shared with eval splits: 0 over 6 splits" in shown

    # Validation and test are two lm-eval tasks of other names over the same documents (the name check
    # cannot see it): the first evaluation job stops the run, and the next parse stops before any job.
    leaky = tmp_path / "leaky"
    tasks_dir = leaky / "lm_tasks"
    tasks_dir.mkdir(parents=True)
    docs = tasks_dir / "docs.jsonl"
    docs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(6)))
    for name in ("ext_dev", "ext_final"):
        spec = task_yaml({"task": name}, "test", str(docs))
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump({**spec, "task": name}, sort_keys=False))
    config = tiny_config(tiny_model_dir, iterations=1)
    config["evaluation"] = {**config.get("evaluation", {}), "include_paths": [str(tasks_dir)]}
    config["eval_tasks"].append({"task": "ext", "lm_eval_task": {"val": "ext_dev", "test": "ext_final"}})
    path = leaky / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    message = "config: eval_tasks[2]: 6 of 6 rows of task 'ext', split 'test' are in its split 'val'"
    result = run_snakemake(leaky, path, "results/agent/iter_0/step.json", check=False, timeout=900)
    assert result.returncode != 0
    logs = sorted((leaky / "results" / "logs" / "evaluate").glob("*.log"))
    assert any(message in log.read_text() for log in logs), result.stdout[-3000:]
    assert message in result.stdout  # Snakemake shows the failed job's log
    again = run_snakemake(leaky, path, "--dry-run", check=False, timeout=120)
    assert again.returncode != 0 and message in again.stdout


def test_a_hub_dataset_is_checked_once_readable(default_config, tmp_path, monkeypatch):
    """A hub dataset (here a local directory, which `datasets.load_dataset` reads the same way) is
    not fetched at parse time: the evaluation job reads it; once prepared, parse time reads the file."""
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "hub-repo"
    leaked = _eval_prompt(default_config, "context", "test", 4)
    write_jsonl(repo / "train.jsonl", [{"q": r["prompt"], "a": r["completion"]} for r in UNRELATED]
                + [{"q": leaked, "a": "x"}])
    config = copy.deepcopy(default_config)
    config["datasets"]["web"] = {"source": "hub", "repo": str(repo), "split": "train",
                                 "fields": {"prompt": "q", "completion": "a"}}
    config["objects"]["sft_dataset"].append("web")
    config = load(config, tmp_path)
    result = guard(config, tmp_path)
    assert result["training"]["web"]["context"]["test"] is None and "web" in result["deferred"]
    with pytest.raises(ContaminationError, match=r"datasets\.web: 1 of 12 rows of eval task 'context', split 'test'"):
        contamination.check_deferred(config, tmp_path)
    (tmp_path / contamination.DEFERRED_RECORD).unlink()
    prepare(config["datasets"]["web"], tmp_path / "results" / "datasets" / "web.jsonl")
    with pytest.raises(ContaminationError, match=r"datasets\.web: 1 of 12 rows"):
        guard(config, tmp_path)
