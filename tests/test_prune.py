"""keep_top_k: weights outside the top-k are removed, and rebuilt bit-identically when asked for again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from e2e import run_snakemake

from lamdagent.lineage.prune import is_pruned, pending_models, prune, to_prune
from lamdagent.lineage.tree import weight_files
from lamdagent.store.fileio import atomic_write_json, sha256_file
from lamdagent.store.recipes import RecipeStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from kill_test import final_target, kill_config, model_problems, plan_problems  # noqa: E402


def entry(model, s, iteration=1):
    return {"model": model, "iteration": iteration, "score": {"s_multi": s}, "status": "done"}


def fake_model(models: Path, name: str) -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(name.encode())
    (folder / "config.json").write_text("{}")
    (folder / ".snakemake_timestamp").write_text("")
    files = {"model.safetensors": {"sha256": sha256_file(folder / "model.safetensors"), "bytes": len(name)},
             "config.json": {"sha256": sha256_file(folder / "config.json"), "bytes": 2}}
    atomic_write_json(folder / "lineage.json", {"files": files})
    return folder


def test_top_k_by_score_is_kept_and_named_and_protected_models_are_never_pruned():
    entries = [entry("tiny", 0.9, 0), entry("sft-" + "a" * 16, 0.5), entry("sft-" + "b" * 16, 0.7, 2),
               entry("ties_merging-" + "c" * 16, 0.1, 3), entry("sft-" + "d" * 16, 0.2, 4)]
    # tiny (named) and sft-b are the top-2; sft-d is an input of a step still to run.
    assert to_prune(entries, 2, protected={"sft-" + "d" * 16}) == ["sft-" + "a" * 16, "ties_merging-" + "c" * 16]
    # A tie goes to the earlier iteration, as on the leaderboard.
    assert to_prune([entry("sft-" + "a" * 16, 0.5, 2), entry("sft-" + "b" * 16, 0.5, 1)], 1, set()) == [
        "sft-" + "a" * 16]


def test_prune_removes_only_the_weights_and_keeps_snakemakes_timestamp(tmp_path):
    kept, dropped = "sft-" + "a" * 16, "sft-" + "b" * 16
    for name in (kept, dropped):
        fake_model(tmp_path, name)
    assert prune(tmp_path, [entry(kept, 0.9), entry(dropped, 0.1)], 1, set()) == [dropped]
    assert not (tmp_path / dropped / "model.safetensors").exists() and is_pruned(tmp_path / dropped)
    assert sorted(p.name for p in (tmp_path / dropped).iterdir()) == [".snakemake_timestamp", "config.json",
                                                                      "lineage.json"]
    assert (tmp_path / kept / "model.safetensors").exists() and not is_pruned(tmp_path / kept)
    assert prune(tmp_path, [entry(kept, 0.9), entry(dropped, 0.1)], 1, set()) == []  # idempotent


def test_inputs_of_a_pending_proposal_and_their_ancestors_are_protected(tmp_path):
    store = RecipeStore(tmp_path / "recipes")
    parent = store.save({"action": "sft", "inputs": {"model": "tiny", "dataset": {"name": "a"}}, "params": {},
                         "seed": 0})
    child = store.save({"action": "sft", "inputs": {"model": parent, "dataset": {"name": "a"}}, "params": {},
                        "seed": 0})
    for iteration, model, done in ((1, parent, True), (2, child, False)):
        folder = tmp_path / "agent" / f"iter_{iteration}"
        folder.mkdir(parents=True)
        (folder / "proposal.json").write_text(json.dumps({"model": model}))
        if done:
            (folder / "step.json").write_text("{}")
    assert pending_models(tmp_path / "agent", store, done_iteration=1) == {child, parent}
    assert pending_models(tmp_path / "agent", store, done_iteration=2) == set()


def weights_with_files(results: Path) -> set[str]:
    return {p.name for p in (results / "models").iterdir()
            if not p.name.startswith(".") and not is_pruned(p) and "-" in p.name}


@pytest.mark.slow
def test_keep_top_k_prunes_rebuilds_a_picked_parent_bit_identically_and_reruns_nothing(tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # The tiny random model scores 0 everywhere, so the top-1 is the named base (never pruned) and
    # every built model loses its weights once scored: with seed 0 both steps pick a pruned parent.
    config = kill_config(tiny_model_dir, iterations=2)
    config["keep_top_k"] = 1
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    results = workdir / "results"
    target = final_target(2)  # the exploration; the report is not what this test is about
    run_snakemake(workdir, config_path, target, timeout=1200)

    local = {"tiny": tiny_model_dir}
    assert model_problems(results, local) == []
    assert plan_problems(results, 2, local) == []
    steps = [json.loads((results / "agent" / f"iter_{i}" / "step.json").read_text()) for i in range(3)]
    entries = steps[0]["initial"] + steps[1:]
    ranked = sorted(entries, key=lambda e: (-e["score"]["s_multi"], e.get("iteration", 0)))
    top = {ranked[0]["model"]}
    built = {e["model"] for e in entries if "-" in e["model"]}
    # Only the top model keeps its weights (nothing is pending once the exploration is over).
    assert weights_with_files(results) <= top
    assert built - top and all(is_pruned(results / "models" / m) for m in built - top)
    assert any(step.get("pruned") for step in steps)

    # A later step picked a pruned model as a parent: it was rebuilt, bit-identical to its lineage.
    flags = sorted((results / "restored").glob("*/*.json"))
    assert flags, "no step picked a pruned model (change the seed so that one does)"
    for flag in flags:
        rebuilt = json.loads(flag.read_text())["rebuilt"]
        assert rebuilt and all(r["identical"] for r in rebuilt.values()), rebuilt
        for model, record in rebuilt.items():
            lineage = json.loads((results / "models" / model / "lineage.json").read_text())
            assert record["weights"] == weight_files(lineage["files"])

    # Nothing to do on a rerun: pruning changed nothing Snakemake dates its outputs by.
    again = run_snakemake(workdir, config_path, target, "--dry-run", timeout=300)
    assert "Nothing to be done" in again.stdout, again.stdout[-4000:]

    # The user asks for a pruned model: its weights come back with the recorded sha256.
    pruned = sorted(built - top)[0]
    run_snakemake(workdir, config_path, f"results/restored/{pruned}/user.json", timeout=600)
    lineage = json.loads((results / "models" / pruned / "lineage.json").read_text())
    assert {f: sha256_file(results / "models" / pruned / f) for f in weight_files(lineage["files"])} == \
        weight_files(lineage["files"])
    again = run_snakemake(workdir, config_path, target, "--dry-run", timeout=300)
    assert "Nothing to be done" in again.stdout, again.stdout[-4000:]
