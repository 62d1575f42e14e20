"""The package layout: imports go one way between the subpackages, and no modules import each other in a circle.

Every import counts, those inside functions too (a lazy import is still a dependency). A subpackage
may import its own modules and those of lower layers only; the order is the one README's "Package
layout" gives and each subpackage's docstring repeats.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lamdagent"

# Lowest first. One layer may hold several subpackages: they must not import each other.
LAYERS = [
    {"redact"},
    {"errors"},
    {"store"},
    {"data"},
    {"actions"},
    {"agent"},
    {"evaluation"},
    {"lineage"},
    {"report"},
    {"studies"},
    {"config"},
    {"workflow"},
    {"cli"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("lamdagent", *parts)).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lamdagent modules ``name`` imports (``from lamdagent.x import y`` counts module x.y when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lamdagent")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lamdagent"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def part(module: str) -> str:
    """The top-level part a module belongs to: a subpackage or a top-level module."""
    return module.split(".")[1] if "." in module else ""


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_part_has_a_layer():
    assert {part(name) for name in GRAPH if part(name)} == set(RANK)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_go_down(name):
    upward = sorted(target for target in GRAPH[name]
                    if part(target) and part(target) != part(name) and RANK[part(target)] >= RANK[part(name)])
    assert not upward, f"{name} ({part(name)}) imports a layer at or above its own: {upward}"


def test_no_import_cycles():
    """Between modules, inside a subpackage too (Tarjan's strongly connected components)."""
    graph = {name: {target for target in targets if target in GRAPH} for name, targets in GRAPH.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


@pytest.mark.parametrize("name", sorted(name for name, path in modules().items() if path.name == "__init__.py"
                                        and name != "lamdagent"))
def test_subpackage_says_what_it_owns_and_may_import(name):
    doc = ast.get_docstring(ast.parse(modules()[name].read_text(encoding="utf-8"))) or ""
    assert len(doc.splitlines()) >= 2 and "import" in doc, f"{name}/__init__.py: a docstring saying what it owns " \
                                                           "and what it may import"


@pytest.mark.parametrize("name", sorted(modules()))
def test_long_modules_say_why(name):
    path = modules()[name]
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) > 400:
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        assert "Over 400 lines" in doc, f"{path}: {len(lines)} lines and no reason at its top for not splitting it"


def test_each_rules_file_has_its_module_of_rule_bodies():
    """``rules/<name>.smk`` runs ``scripts/<rule>.py``, which calls ``lamdagent.workflow.<name>.<rule>``."""
    import re

    repo = PACKAGE.parent
    smk_names = {path.stem for path in (repo / "rules").glob("*.smk")}
    assert smk_names == {path.stem for path in (PACKAGE / "workflow").glob("*.py")} - {"__init__"}
    for smk in sorted((repo / "rules").glob("*.smk")):
        for script in re.findall(r'"\.\./scripts/(\w+)\.py"', smk.read_text(encoding="utf-8")):
            text = (repo / "scripts" / f"{script}.py").read_text(encoding="utf-8")
            called = re.findall(r"^from lamdagent\.workflow import (\w+)", text, re.M)
            assert called == [smk.stem], f"scripts/{script}.py (a rule of {smk.name}) calls lamdagent.workflow.{called}"
