import copy
from pathlib import Path

import pytest
import yaml

from lamdagent.config import load
from lamdagent.errors import ConfigError

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
    ("training.save_dtype", "float16", "training.save_dtype"),
    ("evaluation.backend", "vllm", "evaluation.backend: 'vllm' is not supported"),
    ("generated_models_join", ["sft_dataset"], "generated_models_join[0]"),
    ("keep_top_k", 0, "keep_top_k"),
    ("keep_top_k", "two", "keep_top_k"),
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
    from lamdagent.data.datasets import prepare
    from lamdagent.store.fileio import read_jsonl, write_jsonl

    files = []
    for task in ("a", "b"):
        path = tmp_path / f"{task}.jsonl"
        write_jsonl(path, [{"prompt": f"{task}{i}", "completion": "x"} for i in range(3)])
        files.append(path)
    entry = prepare({"source": "embedded", "tasks": ["a", "b"], "max_examples": 4}, tmp_path / "mix.jsonl",
                    task_train_files=files)
    assert [r["prompt"] for r in read_jsonl(tmp_path / "mix.jsonl")] == ["a0", "b0", "a1", "b1"]
    assert entry["rows"] == 4


# ---- the wide action space (config/examples/wide-actions.yaml) ----------------------------------


@pytest.fixture(scope="module")
def wide_config() -> dict:
    return yaml.safe_load((REPO / "config" / "examples" / "wide-actions.yaml").read_text())


def test_wide_actions_example_is_valid(wide_config):
    config = load(copy.deepcopy(wide_config), REPO)
    assert set(config["action_types"]) == {"sft", "sft_lora", "dpo", "ties_merging", "dare_ties", "task_arithmetic",
                                           "linear", "slerp"}
    assert config["resources"]["dpo"]["gpu"] == 1 and config["resources"]["slerp"]["gpu"] == 0


BAD_WIDE = [
    # A dpo slot must get preference data, and an SFT slot must not.
    ("action_types.dpo", ["models", "sft_dataset", "dpo_lr", "dpo_beta"], "action_types.dpo[1]"),
    ("action_types.sft", ["models", "pref_dataset", "sft_lr"], "action_types.sft[1]"),
    ("objects.pref_dataset", ["arith-pref", "arith"], "action_types.dpo[1]"),
    ("models.specialist-choice", {"recipe": {"action": "dpo", "objects": ["smollm2", "arith", 1e-6, 0.1]}},
     "models.specialist-choice.recipe.objects[1]"),
    ("objects.density", [0.5, 1.5], "objects.density[1]"),
    ("objects.slerp_t", [2], "objects.slerp_t[0]"),
    ("objects.lora_rank", [8, 4.5], "objects.lora_rank[1]"),
    ("objects.epochs", [0], "objects.epochs[0]"),
    ("action_types.sft_lora", ["models", "sft_dataset", "lora_lr", "lora_rank"], "action_types.sft_lora"),
    ("action_types.slerp", ["models", "models", "slerp_t", "epochs"], "action_types.slerp"),
    ("forced_actions", ["dpo", "rlhf"], "forced_actions[1]"),
    ("datasets.arith-pref", {"source": "embedded", "kind": "preference", "tasks": ["context"]},
     "datasets.arith-pref.tasks[0]"),
    ("datasets.arith-pref", {"source": "local", "kind": "preference", "path": "x.jsonl",
                             "fields": {"prompt": "q", "completion": "a"}}, "datasets.arith-pref.fields"),
    ("datasets.arith-pref", {"source": "embedded", "kind": "pairs", "tasks": ["arith"]}, "datasets.arith-pref.kind"),
    ("models.specialist-choice", {"recipe": {"action": "slerp", "objects": ["smollm2", "smollm2", 0.5]}},
     "models.specialist-choice.recipe.objects"),
]


@pytest.mark.parametrize("path,value,key", BAD_WIDE, ids=[f"{p}={v}" for p, v, _ in BAD_WIDE])
def test_bad_wide_config_names_the_key(wide_config, path, value, key):
    with pytest.raises(ConfigError) as err:
        load(_break(wide_config, path, value), REPO)
    message = str(err.value)
    assert "\n" not in message
    assert key in message, message


def test_local_preference_dataset_with_field_mapping(wide_config, tmp_path):
    from lamdagent.data.datasets import prepare
    from lamdagent.store.fileio import read_jsonl

    data = tmp_path / "prefs.jsonl"
    data.write_text('{"q": "1+1?", "good": "2", "bad": "3", "extra": 1}\n')
    spec = {"source": "local", "kind": "preference", "path": str(data),
            "fields": {"prompt": "q", "chosen": "good", "rejected": "bad"}}
    load(_break(wide_config, "datasets.arith-pref", spec), REPO)
    entry = prepare(spec, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}]
    assert entry["rows"] == 1 and len(entry["sha256"]) == 64
    data.write_text('{"q": "1+1?", "good": "2"}\n')
    with pytest.raises(ConfigError, match=r"prefs\.jsonl:1: no field 'bad'"):
        load(_break(wide_config, "datasets.arith-pref", spec), REPO)


def test_embedded_preference_dataset_is_deterministic(tmp_path):
    from lamdagent.data.datasets import prepare
    from lamdagent.data.tasks import write_splits
    from lamdagent.store.fileio import read_jsonl

    spec = {"source": "embedded", "kind": "preference", "tasks": ["arith", "choice"]}
    entries = []
    for run in ("a", "b"):
        files = [write_splits(task, tmp_path / run / task, {"train": 6}, seed=3)["train"] for task in ("arith", "choice")]
        entries.append(prepare(spec, tmp_path / run / "pref.jsonl", task_train_files=files))
    assert entries[0]["sha256"] == entries[1]["sha256"] and entries[0]["rows"] == 12
    rows = read_jsonl(tmp_path / "a" / "pref.jsonl")
    arith, choice = rows[0], rows[1]
    assert arith["chosen"] != arith["rejected"] and arith["rejected"].startswith(arith["chosen"].split(" = ")[0])
    wrong = int(arith["rejected"].rsplit(" ", 1)[1].rstrip("."))
    right = int(arith["chosen"].rsplit(" ", 1)[1].rstrip("."))
    assert 0 < abs(wrong - right) <= 3
    assert choice["chosen"] != choice["rejected"] and choice["rejected"][:2] == "[[" and choice["rejected"][2] in "ABCD"


def test_defaults_filled_in_still_satisfy_the_schema_without_a_ties_action(default_config):
    """Snakemake validates the config after lamdagent.config.load filled in the defaults: a config
    whose agent has no ties_merging action must not get an empty (invalid) TIES grid."""
    import jsonschema

    config = copy.deepcopy(default_config)
    del config["action_types"]["ties_merging"]
    for key in ("base_models", "ties_weights", "ties_density"):
        del config["objects"][key]
    loaded = load(config, REPO)
    assert "weights" not in loaded["baselines"]["ties"]
    schema = yaml.safe_load((REPO / "lamdagent" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(loaded, schema)
    jsonschema.validate(load(copy.deepcopy(default_config), REPO), schema)


def test_zero_iterations_is_valid_after_defaults(default_config):
    """`iterations: 0` (only the initial pool) gives the random baseline the same budget, 0, which the
    schema that the Snakefile validates the completed config against must accept."""
    import jsonschema

    config = load(_break(default_config, "iterations", 0), REPO)
    assert config["baselines"]["random"]["iterations"] == 0
    schema = yaml.safe_load((REPO / "lamdagent" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(config, schema)


# ---- secrets and syntax errors in messages ------------------------------------------------------

PASTED_KEYS = ["sk-proj-7Hq2Xw9LmB4vR8tN1cY6pK3s", "hf_QmZ8tR2vX5nL9wK4cB7yP1sD6", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
               "Zq9XbT2mLw8RkV4sNp7YcH3jAe5"]


@pytest.mark.parametrize("key", PASTED_KEYS)
def test_an_api_key_pasted_as_api_key_env_is_never_echoed(default_config, key):
    config = copy.deepcopy(default_config)
    config["controller"] = {"type": "openai", "model": "gpt-4o", "api_key_env": key}
    with pytest.raises(ConfigError) as err:
        load(config, REPO)
    message = str(err.value)
    assert message.startswith("config: controller.api_key_env: give the NAME of the environment variable"), message
    assert key not in message and key[:8] not in message
    # The judge's key variable too.
    config = copy.deepcopy(default_config)
    config["evaluation"] = {"judge": {"model": "gpt-4o", "api_key_env": key}}
    with pytest.raises(ConfigError) as err:
        load(config, REPO)
    assert str(err.value).startswith("config: evaluation.judge.api_key_env: give the NAME") and key not in str(err.value)


def _config_paths(node, path=()):
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _config_paths(child, path + (key,))


def _schema_paths(node, path=()):
    for name, child in (node.get("properties") or {}).items():
        yield path + (name,)
        yield from _schema_paths(child, path + (name,))


def test_no_config_error_anywhere_echoes_a_pasted_key(default_config):
    """A key in place of any value of the default config or any key the schema knows, or as a name."""
    from lamdagent.config import schema

    key = PASTED_KEYS[0]
    paths = set(_config_paths(default_config)) | set(_schema_paths(schema()))
    errors = 0
    for path in sorted(paths, key=str):
        if not path:
            continue
        config = copy.deepcopy(default_config)
        node = config
        for part in path[:-1]:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        node[path[-1]] = key
        try:
            load(config, REPO)
        except Exception as error:  # noqa: BLE001 - whatever stops the run must not show the key
            errors += 1
            assert key not in str(error) and key not in repr(error), (path, str(error))
    for section in ("models", "datasets", "objects", "action_types"):  # the key as a name
        config = copy.deepcopy(default_config)
        config[section][key] = next(iter(config[section].values()))
        try:
            load(config, REPO)  # a model may be called so; an object type no action uses may not
        except ConfigError as error:
            errors += 1
            assert key not in str(error), (section, str(error))
    assert errors > 100  # most places reject a key: the check above ran on real messages


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from lamdagent.config import read_config_file

    broken = tmp_path / "study.yaml"
    broken.write_text("iterations: 3\ncontroller:\n  type: random\n   model: x\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(broken)
    assert str(err.value) == f"config: {broken}:4:9: YAML syntax error: mapping values are not allowed here"
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("iterations: 3\nobjects:\n  sft_lr: [1.0e-5, 2.0e-5\nseed: 1\n")
    with pytest.raises(ConfigError, match=rf"^config: {unclosed}:\d+:\d+: YAML syntax error: while parsing a flow "):
        read_config_file(unclosed)


def test_the_workflow_and_check_config_name_the_broken_file_and_line(tmp_path, default_config):
    """Before any job: the workflow's own config/config.yaml when Snakemake parses the Snakefile, and
    `lamdagent check-config` for a --configfile (Snakemake reads those itself, naming neither)."""
    import subprocess
    import sys

    from e2e import SNAKEMAKE, subprocess_env

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("iterations: 3\ncontroller:\n  type: random\n   model: x\n")
    dry = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "-n"], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode != 0
    assert "config: config/config.yaml:4:9: YAML syntax error: mapping values are not allowed here" in dry.stderr + dry.stdout

    lamdagent = [sys.executable, "-m", "lamdagent.cli", "check-config"]
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(default_config, sort_keys=False) + "controller:\n\ttype: random\n")
    checked = subprocess.run([*lamdagent, str(study), "--directory", str(REPO)], capture_output=True, text=True,
                             env=subprocess_env(), timeout=120)
    line = len(study.read_text().splitlines())
    assert checked.returncode == 1 and checked.stderr.startswith(f"config: {study}:{line}:1: YAML syntax error"), \
        checked.stderr
    # A readable file gets the full check, the key masked as in the workflow.
    study.write_text(yaml.safe_dump({**default_config, "controller": {"type": "openai", "model": "gpt-4o",
                                                                      "api_key_env": PASTED_KEYS[0]}}))
    checked = subprocess.run([*lamdagent, str(study), "--directory", str(REPO)], capture_output=True, text=True,
                             env=subprocess_env(), timeout=120)
    assert checked.returncode == 1 and checked.stderr.startswith("config: controller.api_key_env: give the NAME")
    assert PASTED_KEYS[0] not in checked.stderr
    study.write_text(yaml.safe_dump(default_config))
    checked = subprocess.run([*lamdagent, str(study), "--directory", str(REPO)], capture_output=True, text=True,
                             env=subprocess_env(), timeout=120)
    assert checked.returncode == 0 and checked.stdout.startswith("config OK"), checked.stderr
