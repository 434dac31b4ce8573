"""Every module under src/mira keeps to the layer table of docs/design.md ("Package layout"),
and the import map has no cycle. Imports are read with ``ast``, all of them: at the top of a
module, inside functions (the lazy ones) and under ``TYPE_CHECKING``. Milliseconds."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src"
TESTS = ROOT / "tests"
DESIGN = ROOT / "docs" / "design.md"
FOUNDATION = {"config", "errors"}
"""What every folder may import (the table's row for them says so)."""
EXCEPTIONS = {
    ("mira.results.rundir", "torch"): "output.tensorboard: torch's SummaryWriter, imported "
    "only when a run asks for TensorBoard events (docs/design.md says so under the table)",
}
"""(module, package) imports the table forbids that docs/design.md names as exceptions."""


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SOURCE / "mira").rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    """``mira.results.rundir`` -> ``results``; ``mira.cli`` -> ``cli``; ``mira`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports (dotted, absolute), wherever the statement is."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


@cache
def import_map() -> dict[str, set[str]]:
    """module -> the modules of the package it imports (``from mira.results import stats``
    counts as importing ``mira.results.stats``)."""
    known = modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    edges = {}
    for module, path in known.items():
        targets = {resolve(n) for n in imports(module, path) if n.split(".")[0] == "mira"}
        edges[module] = {t for t in targets if t is not None and t != module}
    return edges


@cache
def layer_table() -> dict[str, tuple[set[str], set[str]]]:
    """docs/design.md's "Package layout" table: layer -> (mira layers it may import,
    packages it must never import). ``everything`` allows every layer."""
    text = DESIGN.read_text()
    section = text.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `mira/")]
    names = set()
    parsed = []
    for row in rows:
        owners_cell, _, allowed_cell = (c.strip() for c in row.strip("|").split("|"))
        owners = [
            re.sub(r"\.py$", "", path.strip("/"))
            for path in re.findall(r"`mira/([^`]+)`", owners_cell)
        ]
        owners = ["__init__" if o == "__init__" else o for o in owners]
        names.update(owners)
        parsed.append((owners, allowed_cell))
    table = {}
    for owners, cell in parsed:
        allowed, never = set(), set()
        for part in (p.strip() for p in cell.split(";")):
            if part.startswith("never "):
                never.update(w for w in re.split(r",|\bor\b", part[len("never ") :]) if w.strip())
                continue
            words = {w.strip() for w in part.split(",") if w.strip()}
            allowed |= names if "everything" in words else words & names
        for owner in owners:
            table[owner] = (allowed | FOUNDATION | {owner}, {w.strip() for w in never})
    return table


def test_the_table_names_every_layer_of_the_package() -> None:
    table = layer_table()
    layers = {layer_of(m) for m in modules()}
    assert layers <= set(table), f"not in docs/design.md's table: {sorted(layers - set(table))}"
    assert set(table) <= layers, f"in the table but not in src/mira: {sorted(set(table) - layers)}"
    assert table["results"][1] == {"torch", "flwr"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_imports_only_what_its_layer_may(module: str) -> None:
    table = layer_table()
    allowed, never = table[layer_of(module)]
    edges = import_map()
    wrong = sorted(t for t in edges[module] if layer_of(t) not in allowed)
    assert not wrong, f"{module} ({layer_of(module)}) may import {sorted(allowed)}, not {wrong}"
    packages = {name.split(".")[0] for name in imports(module, modules()[module])}
    banned = sorted(p for p in packages & never if (module, p) not in EXCEPTIONS)
    assert not banned, f"{module} imports {banned}, which its layer never may"


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_the_import_map_has_no_cycle() -> None:
    edges = import_map()
    assert strongly_connected(edges) == []
    folders: dict[str, set[str]] = defaultdict(set)
    for module, targets in edges.items():
        folders[layer_of(module)] |= {layer_of(t) for t in targets} - {layer_of(module)}
    assert strongly_connected(folders) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_unit_tests_mirror_the_package_under_unique_file_names() -> None:
    """tests/unit/<folder> is a folder of src/mira, or app for its top-level modules
    (tests/README.md); test modules import each other by file name, and `make unit` keeps a
    module's tests together by it, so no two files under tests/ share one."""
    package = {p.name for p in (SOURCE / "mira").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in (TESTS / "unit").iterdir() if p.is_dir() and p.name[0] != "_"}
    assert folders - package <= {"app"}, f"not a folder of src/mira: {sorted(folders - package)}"
    names = [p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
