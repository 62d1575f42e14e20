"""Verifying a lineage record: re-hash every file it lists, the parents' and the datasets' too."""

from __future__ import annotations

import os
from pathlib import Path

from lamdagent.lineage.cards import short_sha
from lamdagent.lineage.records import load_lineage
from lamdagent.store.fileio import sha256_file


def _resolve_dir(node: dict, near: Path | None) -> Path | None:
    """A parent's directory: a sibling of the child (a copied results tree) first, else where it was."""
    if near is not None and (near.parent / node["model"]).is_dir():
        return near.parent / node["model"]
    recorded = Path(node["dir"])
    return recorded if recorded.is_dir() else None


def _check_files(directory: Path, files: dict[str, dict], what: str, problems: list[str]) -> int:
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{what}: {path}: missing (recorded sha256 {short_sha(entry['sha256'])})")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"{what}: {path}: sha256 {short_sha(actual)} != recorded {short_sha(entry['sha256'])}")
    for path in directory.glob("*.safetensors"):
        if path.name not in files:
            problems.append(f"{what}: {path}: weight file not in the lineage record")
    return len(files)


def verify(model_dir: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Re-hash every file the record lists: the model's, its parents' and the datasets' (those still
    reachable). Returns one line per mismatch; ``notes`` collects what was checked or skipped."""
    from lamdagent.store.recipes import model_id

    notes = notes if notes is not None else []
    problems: list[str] = []
    root = Path(model_dir)
    lineage = load_lineage(root)

    def visit(node: dict, directory: Path | None, label: str):
        if directory is None:
            notes.append(f"{label} {node['model']}: directory {node['dir']} not reachable, not checked")
        else:
            count = _check_files(directory, node["files"], f"{label} {node['model']}", problems)
            notes.append(f"{label} {node['model']}: {count} files checked in {directory}")
        if node["kind"] != "built":
            return
        if model_id(node["recipe"]) != node["model"]:
            problems.append(f"{label} {node['model']}: recipe hashes to {model_id(node['recipe'])}")
        for slot, data in node["datasets"].items():
            if data["sha256"] != node["recipe"]["inputs"][slot]["sha256"]:
                problems.append(f"{label} {node['model']}: dataset {data['name']} hash differs from the recipe's")
            path = Path(data["path"])
            if not path.is_file():
                notes.append(f"dataset {data['name']}: {path} not reachable, not checked")
            elif sha256_file(path) != data["sha256"]:
                problems.append(f"dataset {data['name']}: {path}: sha256 {short_sha(sha256_file(path))} "
                                f"!= recorded {short_sha(data['sha256'])}")
            else:
                notes.append(f"dataset {data['name']}: {path} checked")
        for slot, parent in node["parents"].items():
            visit(parent, _resolve_dir(parent, directory), f"{slot}")

    visit(lineage, root, "model")
    return problems
