"""Replays (same recipe tree, resized datasets or another base), sizes, resizing, tables, config."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lamdagent import config as config_mod
from lamdagent.actions.recipe import make_recipe
from lamdagent.data.datasets import DatasetError, dataset_entry, per_task_examples, prepare, resize
from lamdagent.data.tasks import generate
from lamdagent.store.fileio import read_jsonl
from lamdagent.store.recipes import RecipeStore
from lamdagent.studies.scaling import (kendall_table, ranked_models, replay, resized_name, resized_rows, sizes,
                                       train_rows, tree_datasets)

REPO = Path(__file__).resolve().parent.parent

TRAINING = {"epochs": 1, "batch_size": 8}
MERGING = {"dtype": "float32", "normalize": True}
DATASETS = {"arith": {"sha256": "a" * 64, "rows": 40}, "choice": {"sha256": "c" * 64, "rows": 40}}


def recipe(action, values):
    return make_recipe(action, values, datasets=DATASETS, training=TRAINING, merging=MERGING, seed=0)


@pytest.fixture
def store(tmp_path):
    return RecipeStore(tmp_path / "recipes")


def test_replay_changes_only_subtrees_under_a_dataset(store):
    merged = store.save(recipe("ties_merging", ["base", "local-a", "local-b", [0.5, 0.5], 0.5]))  # no dataset
    tuned = store.save(recipe("sft", [merged, "arith", 1e-4]))
    top = store.save(recipe("sft", [tuned, "choice", 1e-4]))
    bigger = {"arith": {"name": resized_name("arith", 80), "sha256": "b" * 64, "rows": 80}}

    new_top = replay(top, store, datasets=bigger)
    new = store.load(new_top)
    assert new_top != top and new["inputs"]["dataset"] == store.load(top)["inputs"]["dataset"]  # choice kept
    new_tuned = store.load(new["inputs"]["model"])
    assert new_tuned["inputs"]["model"] == merged  # the merge of named models is reused
    assert new_tuned["inputs"]["dataset"] == {"name": "resized/arith.n80", "sha256": "b" * 64, "rows": 80}
    assert new_tuned["params"] == store.load(tuned)["params"]
    assert replay(top, store) == top  # nothing swapped: the same id
    assert tree_datasets(top, store) == {"arith": 40, "choice": 40}
    assert (train_rows(top, store), train_rows(new_top, store)) == (80, 120)


def test_replay_on_another_base_model_swaps_every_leaf(store):
    spec_a = store.save(recipe("sft", ["base", "arith", 1e-4]))
    spec_b = store.save(recipe("sft", ["base", "choice", 1e-4]))
    merged = store.save(recipe("ties_merging", ["base", spec_a, spec_b, [0.5, 0.5], 0.5]))
    new = store.load(replay(merged, store, models={"base": "wide"}))
    assert new["inputs"]["base_model"] == "wide"
    assert store.load(new["inputs"]["model_a"])["inputs"]["model"] == "wide"
    assert replay("base", store, models={"base": "wide"}) == "wide"


def test_sizes_and_rows():
    assert [s["label"] for s in sizes({"factors": [1, 2, 4, 6]})] == ["x1", "x2", "x4", "x6"]
    assert [s["label"] for s in sizes({"factors": [0.5, 2]})] == ["x1", "x0.5", "x2"]
    assert [s["label"] for s in sizes({"examples": [100, 200]})] == ["x1", "n100", "n200"]
    assert resized_rows(60, sizes({"factors": [2]})[1]) == 120
    assert resized_rows(60, sizes({"examples": [100]})[1]) == 100


def test_ranked_models_skips_ranks_past_the_leaderboard():
    board = pd.DataFrame({"model": [f"m{i}" for i in range(1, 6)]})
    assert ranked_models(board, 2, [1, 4, 50]) == [(1, "m1"), (2, "m2"), (4, "m4")]


def test_resized_embedded_dataset_extends_the_exploration_one(tmp_path):
    """Generated train sets are prefixes of longer ones: x1 is the exploration's file, x2 adds rows."""
    spec = {"source": "embedded", "tasks": ["arith", "choice"], "max_examples": 30}
    files = {}
    for n in (20, 40):
        for task in spec["tasks"]:
            from lamdagent.store.fileio import write_jsonl

            files[(task, n)] = tmp_path / f"{task}.n{n}.jsonl"
            write_jsonl(files[(task, n)], generate(task, "train", n, 0))
    original = prepare(spec, tmp_path / "orig.jsonl", task_train_files=[files[(t, 20)] for t in spec["tasks"]])
    assert per_task_examples(spec, 30) == 15 and per_task_examples(spec, 60) == 30
    same = resize(spec, 30, tmp_path / "x1.jsonl", task_train_files=[files[(t, 40)] for t in spec["tasks"]])
    assert same["sha256"] == original["sha256"]
    bigger = resize(spec, 60, tmp_path / "x2.jsonl", task_train_files=[files[(t, 40)] for t in spec["tasks"]])
    assert bigger["rows"] == 60 and read_jsonl(tmp_path / "x2.jsonl")[:30] == read_jsonl(tmp_path / "orig.jsonl")
    train = {r["prompt"] for t in spec["tasks"] for r in generate(t, "train", 40, 0)}
    assert not train & {r["prompt"] for t in spec["tasks"] for r in generate(t, "val", 20, 0)}
    assert dataset_entry(tmp_path / "x2.jsonl")["sha256"] != original["sha256"]


def test_resize_refuses_a_source_that_is_too_small(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text("".join(f'{{"q": "q{i}", "a": "a{i}"}}\n' for i in range(5)))
    spec = {"source": "local", "path": str(source), "fields": {"prompt": "q", "completion": "a"}}
    assert resize(spec, 4, tmp_path / "r.jsonl")["rows"] == 4
    with pytest.raises(DatasetError, match="5 rows, fewer than the 10"):
        resize(spec, 10, tmp_path / "r10.jsonl")


def test_kendall_tau_per_size():
    rows = []
    for source, scores in {"a": (0.9, 0.8, 0.1), "b": (0.5, 0.6, 0.5), "c": (0.1, 0.2, 0.9)}.items():
        for size, value in zip(("x1", "x2", "x4"), scores):
            rows.append({"source": source, "size": size, "val_s_multi": value, "test_avg": value})
    table = kendall_table(pd.DataFrame(rows)).set_index("size")
    assert table.loc["x2", "tau_val"] == pytest.approx(1.0)
    assert table.loc["x4", "tau_test"] == pytest.approx(-1.0)
    assert table.loc["x4", "pipelines"] == 3


@pytest.fixture(scope="module")
def base_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def load(config):
    return config_mod.load(copy.deepcopy(config), REPO)


def test_study_defaults_come_from_the_exploration(base_config):
    config = {k: v for k, v in base_config.items() if k not in ("scaling", "baselines")}
    loaded = load(config)
    assert loaded["scaling"]["factors"] == [1, 2, 4, 6]
    assert loaded["scaling"]["top_k"] == loaded["report"]["top_k"]
    baselines = loaded["baselines"]
    assert baselines["random"]["iterations"] == loaded["iterations"]
    assert baselines["ties"]["weights"] == loaded["objects"]["ties_weights"]
    assert baselines["base"] == "smollm2" and "full_sft" not in baselines
    assert baselines["specialists"] == ["specialist-arith", "specialist-choice", "specialist-context"]


@pytest.mark.parametrize("section, value, message", [
    ("scaling", {"factors": [2], "examples": [100]}, "config: scaling.examples: give either"),
    ("scaling", {"factors": [0]}, "config: scaling.factors[0]:"),
    ("scaling", {"model": {"base": "nope"}}, "config: scaling.model.base: 'nope' is not a base model"),
    ("baselines", {"full_sft": {"dataset": "nope"}}, "config: baselines.full_sft.dataset: 'nope' is not a dataset"),
    ("baselines", {"specialists": ["smollm2"]}, "config: baselines.specialists[0]: 'smollm2' is not a recipe"),
    ("baselines", {"random": True}, "config: baselines.random:"),
])
def test_bad_study_config_names_the_key(base_config, section, value, message):
    config = copy.deepcopy(base_config)
    config[section] = value
    with pytest.raises(config_mod.ConfigError) as err:
        load(config)
    assert str(err.value).startswith(message), str(err.value)


def test_embedded_default_has_a_full_sft_dataset(base_config):
    loaded = load(base_config)
    assert loaded["baselines"]["full_sft"]["dataset"] in loaded["datasets"]
