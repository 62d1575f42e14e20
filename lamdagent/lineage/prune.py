"""``keep_top_k``: drop the weights of models outside the top-k; rebuild them from their recipes on demand.

A 2B model is ~5 GB: 100 iterations must not need 500 GB. After each step is scored, the weight
files of built models outside the top-k by validation ``s_multi`` are removed, unless a step still
to run needs them (its parents and their ancestors). The directory itself stays, with config,
tokenizer, ``recipe.json``, ``lineage.json``, the model card and Snakemake's ``.snakemake_timestamp``:
Snakemake dates a directory output by that file, so pruning (and restoring in place) changes
nothing Snakemake sees and no downstream job reruns. Named models imported or read in place are
never pruned.

A job that needs the weights of a pruned model (the agent picked it as a parent, the report
evaluates it, or the user asks for it) depends on ``results/restored/<model>/<consumer>.json``
(rule ``restore_model``), which rebuilds the weights in place from the recipe, pruned ancestors
first, and checks their sha256 against the lineage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lamdagent.actions.registry import is_built_id
from lamdagent.agent.plan import step_entries
from lamdagent.lineage.rebuild import build_step, recorded_save_dtype
from lamdagent.lineage.records import LINEAGE_FILE
from lamdagent.lineage.tree import weight_files
from lamdagent.store.fileio import atomic_write_json, read_json, sha256_file
from lamdagent.store.recipes import RecipeStore


def recorded_weights(model_dir: str | os.PathLike) -> dict[str, str]:
    """The weight files (name -> sha256) a built model's lineage lists; {} without a lineage."""
    lineage = Path(model_dir) / LINEAGE_FILE
    return weight_files(read_json(lineage)["files"]) if lineage.is_file() else {}


def is_pruned(model_dir: str | os.PathLike) -> bool:
    """A built model whose directory is there but lacks weight files its lineage lists."""
    model_dir = Path(model_dir)
    weights = recorded_weights(model_dir)
    return bool(weights) and any(not (model_dir / name).is_file() for name in weights)


def ancestors(models: set[str], recipes: RecipeStore) -> set[str]:
    """``models`` and every built model their recipes are made from."""
    seen: set[str] = set()
    todo = [m for m in models if is_built_id(m)]
    while todo:
        model = todo.pop()
        if model in seen or not recipes.path(model).is_file():
            continue
        seen.add(model)
        for value in recipes.load(model)["inputs"].values():
            if isinstance(value, str) and is_built_id(value):
                todo.append(value)
    return seen | set(models)


def pending_models(agent_dir: str | os.PathLike, recipes: RecipeStore, done_iteration: int) -> set[str]:
    """Models a step still to run needs: the proposals without a finished step, and their ancestors."""
    pending = set()
    for proposal in Path(agent_dir).glob("iter_*/proposal.json"):
        iteration = int(proposal.parent.name.split("_")[1])
        if iteration != done_iteration and not (proposal.parent / "step.json").exists():
            pending.update(entry["model"] for entry in step_entries(read_json(proposal)))
    return ancestors(pending, recipes)


def to_prune(entries: list[dict], keep_top_k: int, protected: set[str]) -> list[str]:
    """Built models of ``entries`` (scored plan records) outside the top ``keep_top_k`` by s_multi."""
    scored = [e for e in entries if e.get("score") and e.get("model")]
    # The leaderboard's order: s_multi, then the earlier iteration first.
    ranked = sorted(scored, key=lambda e: (-e["score"]["s_multi"], e.get("iteration", 0)))
    keep: list[str] = []
    for entry in ranked:
        if entry["model"] not in keep:
            keep.append(entry["model"])
    top = set(keep[:keep_top_k])
    return [m for m in keep if is_built_id(m) and m not in top and m not in protected]


def prune(models_dir: str | os.PathLike, entries: list[dict], keep_top_k: int, protected: set[str]) -> list[str]:
    """Remove the weight files of the models to prune; returns those pruned now."""
    pruned = []
    for model in to_prune(entries, keep_top_k, protected):
        model_dir = Path(models_dir) / model
        present = [name for name in recorded_weights(model_dir) if (model_dir / name).is_file()]
        for name in present:
            (model_dir / name).unlink()
        if present:
            pruned.append(model)
    return pruned


def prune_after_step(config: dict, results: str | os.PathLike, entries: list[dict], iteration: int) -> list[str]:
    """What a step's job does once the step is scored (a no-op unless ``keep_top_k`` is set)."""
    keep_top_k = config.get("keep_top_k")
    if not keep_top_k:
        return []
    results = Path(results)
    recipes = RecipeStore(results / "recipes")
    protected = pending_models(results / "agent", recipes, iteration)
    pruned = prune(results / "models", entries, keep_top_k, protected)
    if pruned:
        print(f"keep_top_k={keep_top_k}: removed the weights of {', '.join(pruned)}")
    return pruned


# ---- restoring ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One restorer of a model at a time; the kernel drops the lock when a killed job dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def restore(model: str, *, results: str | os.PathLike, config: dict, model_dirs: dict[str, str]) -> dict:
    """Rebuild the weights of ``model`` (and of its pruned ancestors, first) in place.

    ``model_dirs`` maps named models read in place (``source: local``) to their directories.
    Returns, per model rebuilt, whether the new weights have the sha256 the lineage records; a
    mismatch of a build recorded as bit-reproducible is an error.
    """
    results = Path(results)
    recipes = RecipeStore(results / "recipes")

    def directory(name: str) -> Path:
        return Path(model_dirs.get(name, results / "models" / name))

    order: list[str] = []

    def visit(name: str) -> None:  # parents first
        if name in order or not is_built_id(name) or not is_pruned(directory(name)):
            return
        for value in recipes.load(name)["inputs"].values():
            if isinstance(value, str):
                visit(value)
        order.append(name)

    report = {}
    with _locked(results / "restored" / f".{model}.lock"):
        visit(model)
        for name in order:
            report[name] = _rebuild_weights(name, directory, recipes, results, config)
    return report


def _rebuild_weights(name: str, directory, recipes: RecipeStore, results: Path, config: dict) -> dict:
    from lamdagent.actions.registry import action_spec

    target = directory(name)
    recipe = recipes.load(name)
    lineage = read_json(target / LINEAGE_FILE)
    slots = action_spec(recipe["action"]).slots
    parents = {s.name: str(directory(recipe["inputs"][s.name])) for s in slots if s.kind == "model"}
    datasets = {s.name: str(results / "datasets" / f"{recipe['inputs'][s.name]['name']}.jsonl")
                for s in slots if s.is_dataset}
    for stale in target.parent.glob(f".{name}.restore.*"):  # a killed restore's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.restore."))
    try:
        build_step(recipe, parents, datasets, scratch / "model", config, recorded_save_dtype(lineage))
        expected = weight_files(lineage["files"])
        got = {file: sha256_file(scratch / "model" / file) for file in expected}
        identical = got == expected
        if not identical and lineage.get("determinism", {}).get("bit_reproducible"):
            raise RuntimeError(f"{name}: the rebuilt weights differ from those the lineage records, although the "
                               f"build was recorded as bit-reproducible ({lineage['determinism']['reason']})")
        # File by file into the kept directory: until the last one lands the model still reads as pruned.
        for file in expected:
            os.replace(scratch / "model" / file, target / file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"restored {name}: weights {'bit-identical to' if identical else 'differ from'} the recorded ones")
    return {"identical": identical, "weights": got}


def write_restored(path: str | os.PathLike, model: str, rebuilt: dict) -> None:
    atomic_write_json(path, {"model": model, "rebuilt": rebuilt})
