"""End to end on the tiny model: `snakemake scaling` and `snakemake baselines` after an exploration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from e2e import run_snakemake, write_tiny_config

from lamdagent.actions.registry import action_spec, is_built_id
from lamdagent.store.recipes import RecipeStore
from lamdagent.studies.scaling import tree_datasets

pytestmark = pytest.mark.slow
TIMEOUT = 1500  # a few minutes on 2 idle cores; the bound is for a busy machine


@pytest.fixture(scope="module")
def explored(tmp_path_factory, tiny_model_dir, smollm2_tokenizer_dir):
    """A finished 1-iteration exploration (copied by each test) and a second, wider tiny base model."""
    from lamdagent.actions.models import build_tiny_llama

    root = tmp_path_factory.mktemp("studies")
    wider = build_tiny_llama(root / "tiny-wide", tokenizer_source=smollm2_tokenizer_dir, hidden_size=48)
    workdir = root / "explore"
    config = write_tiny_config(workdir, tiny_model_dir, iterations=1)
    data = yaml.safe_load(config.read_text())
    data["models"]["tiny-wide"] = {"source": "local", "path": str(wider)}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run_snakemake(workdir, config, "results/leaderboard.tsv", timeout=TIMEOUT)
    return workdir


def copy_run(source: Path, dest: Path, **changes) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    config = dest / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data.update(changes)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def built_jobs(workdir: Path) -> set[str]:
    """Model ids whose build ran (one benchmark file per sft / ties_merging job)."""
    return {f"{rule}-{tsv.stem}" for rule in ("sft", "ties_merging")
            for tsv in (workdir / "results" / "benchmarks" / rule).glob("*.tsv")}


def weights(workdir: Path) -> dict[str, tuple[int, int]]:
    return {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (workdir / "results" / "models").glob("*/model.safetensors")}


def with_dataset(model: str, store: RecipeStore) -> set[str]:
    """The built nodes of a tree that train on a dataset somewhere below them: what a resize changes."""
    if not is_built_id(model):
        return set()
    recipe = store.load(model)
    below, own = set(), False
    for slot in action_spec(recipe["action"]).slots:
        if slot.kind == "model":
            below |= with_dataset(recipe["inputs"][slot.name], store)
        elif slot.kind == "dataset":
            own = True
    parents = [recipe["inputs"][s.name] for s in action_spec(recipe["action"]).slots if s.kind == "model"]
    return below | ({model} if own or any(p in below for p in parents) else set())


def all_built(model: str, store: RecipeStore) -> set[str]:
    if not is_built_id(model):
        return set()
    recipe = store.load(model)
    return {model}.union(*(all_built(recipe["inputs"][s.name], store)
                           for s in action_spec(recipe["action"]).slots if s.kind == "model"))


def test_scaling_rebuilds_only_the_replayed_pipelines(explored, tmp_path):
    workdir = tmp_path / "run"
    config = copy_run(explored, workdir, scaling={"top_k": 2, "factors": [1, 2]})
    store = RecipeStore(workdir / "results" / "recipes")
    board = pd.read_csv(workdir / "results" / "leaderboard.tsv", sep="\t")
    top = list(board["model"].head(2))
    before, jobs_before = weights(workdir), built_jobs(workdir)

    run_snakemake(workdir, config, "scaling", timeout=TIMEOUT)

    # Only the subtrees with a dataset below them were built again, at x2; nothing of the exploration.
    replays = json.loads((workdir / "results" / "scaling" / "data_replays.json").read_text())
    changed = set().union(*(with_dataset(m, store) for m in top))
    assert changed, "the top-2 train on no dataset: nothing to replay"
    replayed = set().union(*(all_built(e["model"], store) for e in replays if e["size"] == "x2"))
    assert built_jobs(workdir) - jobs_before == replayed - jobs_before
    assert len(built_jobs(workdir) - jobs_before) == len(changed)
    assert {m: weights(workdir)[m] for m in before} == before, "an exploration model was rebuilt"
    assert [e["model"] for e in replays if e["size"] == "x1"] == top  # factor 1: the exploration's ids
    for entry in (e for e in replays if e["size"] == "x2"):
        assert (entry["model"] == entry["source"]) == (entry["source"] not in changed)
        assert entry["train_rows"] == 2 * next(e["train_rows"] for e in replays
                                               if e["source"] == entry["source"] and e["size"] == "x1")
        if not is_built_id(entry["source"]):
            continue  # a base model: nothing to replay
        new, old = store.load(entry["model"]), store.load(entry["source"])
        assert (new["action"], new["params"], new["seed"]) == (old["action"], old["params"], old["seed"])
        for name in tree_datasets(entry["model"], store):
            assert name.startswith("resized/") and (workdir / "results" / "datasets" / f"{name}.jsonl").is_file()

    data = pd.read_csv(workdir / "results" / "scaling" / "data.tsv", sep="\t")
    assert len(data) == 4 and list(data["size"]) == ["x1", "x2", "x1", "x2"]
    assert {"val_s_multi", "test_avg", "ood_avg", "train_rows"} <= set(data.columns)
    kendall = pd.read_csv(workdir / "results" / "scaling" / "kendall.tsv", sep="\t")
    assert list(kendall["size"]) == ["x2"] and kendall["pipelines"].iloc[0] == 2
    assert (workdir / "results" / "scaling" / "data.png").stat().st_size > 0
    assert (workdir / "results" / "scaling" / "data.svg").stat().st_size > 0
    # Asked again, nothing is left to do.
    assert "Nothing to be done" in run_snakemake(workdir, config, "scaling", "-n", timeout=TIMEOUT).stdout


def test_model_transfer_side_by_side(explored, tmp_path):
    workdir = tmp_path / "run"
    config = copy_run(explored, workdir, scaling={"top_k": 1, "model": {"base": "tiny-wide", "ranks": [2, 99]}})
    store = RecipeStore(workdir / "results" / "recipes")
    board = pd.read_csv(workdir / "results" / "leaderboard.tsv", sep="\t")
    jobs_before = built_jobs(workdir)

    run_snakemake(workdir, config, "results/scaling/model.tsv", timeout=TIMEOUT)

    replays = json.loads((workdir / "results" / "scaling" / "model_replays.json").read_text())
    assert [e["rank"] for e in replays] == [1, 2]  # rank 99 is past the leaderboard
    transferred = set().union(*(all_built(m, store) for m in board["model"].head(2)))
    assert len(built_jobs(workdir) - jobs_before) == len(transferred)  # every step sits on the new base
    model = pd.read_csv(workdir / "results" / "scaling" / "model.tsv", sep="\t")
    assert list(model["source"]) == list(board["model"].head(2)) and set(model["base"]) == {"tiny-wide"}
    assert {"source_val_s_multi", "target_val_s_multi", "source_test_avg", "target_test_avg"} <= set(model.columns)
    assert list(model["source_val_s_multi"]) == pytest.approx(list(board["s_multi"].head(2)), abs=1e-6)


def test_baselines_table1(explored, tmp_path):
    workdir = tmp_path / "run"
    config = copy_run(explored, workdir, baselines={"full_sft": {"dataset": "all"},
                                                    "ties": {"weights": [[0.5, 0.5], [0.7, 0.3]]},
                                                    "random": {"iterations": 1}})
    run_snakemake(workdir, config, "baselines", timeout=TIMEOUT)

    table = pd.read_csv(workdir / "results" / "report" / "table1.tsv", sep="\t")
    roles = list(table["role"])
    assert roles[:3] == ["base", "specialist", "specialist"]
    assert {"fully fine-tuned", "TIES grid best of 2", "random controller top-1", "LaMDAgent top-1",
            "LaMDAgent top-2"} <= set(roles)
    assert {"test_arith", "test_choice", "test_avg", "test_arith_ood", "ood_avg", "avg"} <= set(table.columns)
    full = table[table["role"] == "fully fine-tuned"].iloc[0]
    assert full["pipeline"] == "sft(tiny, all)"
    # The random run shares the content-addressed models: its initial models were not built again.
    random_dir = workdir / "results" / "baselines" / "random"
    assert (random_dir / "results" / "models").is_symlink()
    specialists = {m for m, label in json.loads((workdir / "results" / "agent" / "pool.json").read_text())["labels"].items()
                   if label.startswith("specialist")}
    assert not specialists & built_jobs(random_dir)
    assert yaml.safe_load((random_dir / "config.yaml").read_text())["controller"] == {"type": "random"}
