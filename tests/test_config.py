import copy
from pathlib import Path

import pytest
import yaml

from lamdagent.config import ConfigError, load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(default_config):
    config = load(copy.deepcopy(default_config), REPO)
    assert config["training"]["batch_size"] == default_config["training"]["batch_size"]
    assert config["controller"]["retries"] == 1
    assert config["eval_tasks"][0]["weight"] == "auto"
    assert config["proposals_per_iteration"] == 1  # the paper
    assert load(_break(default_config, "proposals_per_iteration", 22), REPO)["proposals_per_iteration"] == 22


def _break(config: dict, path: str, value=None, delete: bool = False) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    last = int(last) if last.isdigit() else last
    if delete:
        del node[last]
    else:
        node[last] = value
    return config


BAD = [
    # (path, value or DELETE, expected key in the message)
    ("iterations", "DELETE", "iterations"),
    ("iterations", "five", "iterations"),
    ("iterations", -1, "iterations"),
    ("seed", 1.5, "seed"),
    ("controller.type", "gpt", "controller.type"),
    ("controller.type", "openai", "controller.api_key_env"),
    ("controller.model", "no-such-model", "controller.model"),
    ("objects.sft_lr", [], "objects.sft_lr"),
    ("objects.sft_lr", [-1.0e-5], "objects.sft_lr[0]"),
    ("objects.sft_lr", ["fast"], "objects.sft_lr[0]"),
    ("objects.sft_dataset", ["arith", "arith"], "objects.sft_dataset[1]"),
    ("objects.sft_dataset", ["nope"], "objects.sft_dataset[0]"),
    ("objects.models", ["smollm2", "ghost"], "objects.models[1]"),
    ("objects.ties_weights", [[0.5]], "objects.ties_weights[0]"),
    ("action_types.sft", ["models", "sft_dataset"], "action_types.sft"),
    ("action_types.sft", ["models", "unknown_type", "sft_lr"], "action_types.sft[1]"),
    ("action_types.sft", ["models", "sft_lr", "sft_lr"], "action_types.sft[1]"),
    ("action_types.dpo", ["models"], "action_types.dpo"),
    ("eval_tasks", [{"task": "gsm9k"}], "eval_tasks[0].task"),
    ("eval_tasks", [{"task": "arith"}, {"task": "arith"}], "eval_tasks[1].task"),
    ("eval_tasks", [{"task": "arith", "metric": "perplexity"}], "eval_tasks[0].weight"),
    ("eval_tasks", [{"task": "arith", "weight": -2}], "eval_tasks[0].weight"),
    ("models.smollm2", {"source": "local"}, "models.smollm2.path"),
    ("models.smollm2", {"source": "local", "path": "/no/such/dir"}, "models.smollm2.path"),
    ("models.smollm2", {"source": "hub"}, "models.smollm2.repo"),
    ("models.smollm2", {}, "models.smollm2"),
    ("models.specialist-arith", {"recipe": {"action": "sft", "objects": ["smollm2", "arith"]}},
     "models.specialist-arith.recipe.objects"),
    ("models.specialist-arith", {"recipe": {"action": "sft", "objects": ["specialist-arith", "arith", 1e-4]}},
     "models.specialist-arith.recipe"),
    ("models.specialist-arith", {"recipe": {"action": "sft", "objects": ["nobody", "arith", 1e-4]}},
     "models.specialist-arith.recipe.objects[0]"),
    ("models.sft-abc", {"source": "embedded"}, "models.sft-abc"),
    ("datasets.arith", {"source": "embedded", "tasks": ["poetry"]}, "datasets.arith.tasks[0]"),
    ("datasets.arith", {"source": "local"}, "datasets.arith.path"),
    ("datasets.arith", {"source": "local", "path": "/no/such/file.jsonl"}, "datasets.arith.path"),
    ("datasets.arith", {"source": "hub", "repo": "openai/gsm8k"}, "datasets.arith.fields"),
    ("data.train_examples", 0, "data.train_examples"),
    ("data", "DELETE", "data"),
    ("training.precision", "int4", "training.precision"),
    ("generated_models_join", ["sft_dataset"], "generated_models_join[0]"),
    ("unknown_top_level", 1, "unknown key"),
    ("proposals_per_iteration", 0, "proposals_per_iteration"),
    ("proposals_per_iteration", 2.5, "proposals_per_iteration"),
    ("proposals_per_iteration", 23, "proposals_per_iteration"),  # the default objects allow 22 actions
]


@pytest.mark.parametrize("path,value,key", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_config_names_the_key(default_config, path, value, key):
    broken = _break(default_config, path, delete=True) if value == "DELETE" else _break(default_config, path, value)
    with pytest.raises(ConfigError) as err:
        load(broken, REPO)
    message = str(err.value)
    assert "\n" not in message
    assert key in message, message


def test_malformed_local_dataset_rows_are_reported_with_file_and_line(default_config, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"q": "1+1?", "a": "2"}\n{"q": "2+2?"\n')
    config = _break(default_config, "datasets.arith",
                    {"source": "local", "path": str(data), "fields": {"prompt": "q", "completion": "a"}})
    with pytest.raises(ConfigError, match=r"mine\.jsonl:2: not valid JSON"):
        load(config, REPO)
    data.write_text('{"q": "1+1?", "a": "2"}\n{"question": "2+2?", "a": "4"}\n')
    with pytest.raises(ConfigError, match=r"mine\.jsonl:2: no field 'q'"):
        load(config, REPO)


def test_local_dataset_with_field_mapping_is_accepted(default_config, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"q": "1+1?", "a": "2"}\n')
    config = _break(default_config, "datasets.arith",
                    {"source": "local", "path": str(data), "fields": {"prompt": "q", "completion": "a"}})
    assert load(config, REPO)["datasets"]["arith"]["source"] == "local"


def test_embedded_multi_task_dataset_interleaves_tasks(tmp_path):
    from lamdagent.datasets import prepare
    from lamdagent.fileio import read_jsonl, write_jsonl

    files = []
    for task in ("a", "b"):
        path = tmp_path / f"{task}.jsonl"
        write_jsonl(path, [{"prompt": f"{task}{i}", "completion": "x"} for i in range(3)])
        files.append(path)
    entry = prepare({"source": "embedded", "tasks": ["a", "b"], "max_examples": 4}, tmp_path / "mix.jsonl",
                    task_train_files=files)
    assert [r["prompt"] for r in read_jsonl(tmp_path / "mix.jsonl")] == ["a0", "b0", "a1", "b1"]
    assert entry["rows"] == 4
