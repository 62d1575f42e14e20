"""The tree of a lineage record: its nodes parents first, the pipeline it spells, the build steps."""

from __future__ import annotations

from typing import Iterator


def walk(node: dict) -> Iterator[dict]:
    """Every model node of a tree, parents before children, each once."""
    seen: set[str] = set()

    def visit(n):
        for parent in n.get("parents", {}).values():
            yield from visit(parent)
        key = f"{n['kind']}:{n['model']}:{n.get('dir')}"
        if key not in seen:
            seen.add(key)
            yield n

    yield from visit(node)


def pipeline(node: dict) -> str:
    """``sft(ties(sft(tiny, arith), sft(tiny, choice)), all)`` from the tree."""
    from lamdagent.actions.registry import action_spec

    if node["kind"] == "base":
        return node["model"]
    spec = action_spec(node["recipe"]["action"])
    parts = []
    for slot in spec.slots:
        if slot.kind == "model":
            if slot.implied:
                continue
            parts.append(pipeline(node["parents"][slot.name]))
        elif slot.is_dataset:
            parts.append(node["recipe"]["inputs"][slot.name]["name"])
    return f"{spec.short}({', '.join(parts)})"


def base_nodes(node: dict) -> list[dict]:
    return [n for n in walk(node) if n["kind"] == "base"]


def tree_bit_reproducible(node: dict) -> bool:
    return all(n["determinism"]["bit_reproducible"] for n in walk(node) if n["kind"] == "built")


def weight_files(files: dict[str, dict]) -> dict[str, str]:
    """The weight files of a hashed file map: what a bit-identical rebuild must reproduce."""
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith((".safetensors", ".bin"))}


# ---- the build steps -----------------------------------------------------------------------------


def rebuild_plan(lineage: dict) -> list[dict]:
    """The built nodes of the tree, parents first, each once: the order to make them again."""
    seen: set[str] = set()
    steps = []
    for node in walk(lineage):
        if node["kind"] == "built" and node["model"] not in seen:
            seen.add(node["model"])
            steps.append(node)
    return steps
