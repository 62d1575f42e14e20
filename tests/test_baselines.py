"""Baseline recipes (content-addressed, reusing the specialists) and Table 1, without training."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lamdagent.agent.objects import Pool
from lamdagent.config import load
from lamdagent.store.recipes import RecipeStore
from lamdagent.studies.baselines import baseline_recipes, random_run_config, table1

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["baselines"]["ties"] = {"weights": [[0.5, 0.5], [0.7, 0.3]]}
    config = load(raw, REPO)
    datasets = {name: {"sha256": name[0] * 64, "rows": 40, "path": f"{name}.jsonl"}
                for name in ("arith", "choice", "context", "all", "train-all")}
    store = RecipeStore(tmp_path / "recipes")
    pool = Pool.initial(config, {k: v for k, v in datasets.items() if k != "train-all"}, store)
    return config, pool, datasets, store


def test_baselines_reuse_the_specialists_and_grid_every_pair(setup):
    config, pool, datasets, store = setup
    entries = baseline_recipes(config, pool, datasets, store)
    roles = [e["role"] for e in entries]
    assert roles == ["base"] + ["specialist"] * 3 + ["fully fine-tuned"] + ["ties grid"] * 6
    specialists = [m for m in pool.initial_models if m != "smollm2"]
    assert [e["model"] for e in entries if e["role"] == "specialist"] == specialists  # the exploration's ids
    full = next(e for e in entries if e["role"] == "fully fine-tuned")
    assert full["pipeline"] == "sft(smollm2, train-all)"
    assert store.load(full["model"])["inputs"]["dataset"]["name"] == "train-all"
    grid = [store.load(e["model"]) for e in entries if e["role"] == "ties grid"]
    assert len({e["model"] for e in entries}) == len(entries)
    assert {tuple(r["params"]["weights"]) for r in grid} == {(0.5, 0.5), (0.7, 0.3)}
    assert all(r["inputs"]["base_model"] == "smollm2" for r in grid)


def evaluation(scores: dict[str, float]) -> dict:
    return {"tasks": {f"lamdagent_{task}": {"exact_match,none": value} for task, value in scores.items()}}


def test_table1_reports_the_grid_by_its_best_validation_point(setup):
    config, pool, datasets, store = setup
    entries = baseline_recipes(config, pool, datasets, store)
    tasks = ("arith", "choice", "context")
    evals = {}
    for index, entry in enumerate(entries):
        value = index / 100
        evals[(entry["model"], "val")] = evaluation({f"{t}_val": value for t in tasks})
        evals[(entry["model"], "test")] = evaluation({f"{t}_{s}": value for t in tasks for s in ("test", "ood")})
    grid = [e for e in entries if e["role"] == "ties grid"]
    evals[(grid[2]["model"], "val")] = evaluation({f"{t}_val": 0.9 for t in tasks})  # the best on validation
    topk = pd.DataFrame([{"role": "top-1", "model": entries[1]["model"], "pipeline": "p1"},
                         {"role": "reference", "model": "smollm2", "pipeline": "smollm2"}])
    random_topk = pd.DataFrame([{"role": "top-1", "model": entries[2]["model"], "pipeline": "r1"}])
    table = table1(topk, entries, evals, config["eval_tasks"], random_topk)
    assert list(table["role"]) == ["base", "specialist", "specialist", "specialist", "fully fine-tuned",
                                   "TIES grid best of 6", "random controller top-1", "LaMDAgent top-1"]
    best = table[table["role"] == "TIES grid best of 6"].iloc[0]
    assert best["model"] == grid[2]["model"] and best["val_s_multi"] == pytest.approx(2.7)
    assert best["test_avg"] == pytest.approx((len(entries) - 4) / 100)
    assert {"test_arith_ood", "ood_avg", "avg"} <= set(table.columns)


def test_random_run_config_is_the_same_budget_with_absolute_paths(setup, tmp_path):
    config, *_ = setup
    config = copy.deepcopy(config)
    config["datasets"]["local"] = {"source": "local", "path": "data/x.jsonl"}
    out = random_run_config(config, tmp_path)
    assert out["controller"] == {"type": "random"} and out["iterations"] == config["iterations"]
    assert "scaling" not in out and "baselines" not in out
    assert out["datasets"]["local"]["path"] == str(tmp_path / "data" / "x.jsonl")
    assert config["datasets"]["local"]["path"] == "data/x.jsonl"
