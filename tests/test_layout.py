"""The package's import structure: no import circle between secateurs modules, and a format layer that stands
on its own (torch, safetensors and secateurs.errors only)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import secateurs

PACKAGE = Path(secateurs.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_names(name: str, source: str | None = None) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement of module ``name``, module-level and in functions
    (those under ``if TYPE_CHECKING:`` never run and are left out)."""
    path = MODULES.get(name)
    tree = ast.parse(path.read_text() if source is None else source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, node.lineno))
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {secateurs module it makes Python import: line}. Importing ``a.b.c`` also runs the package
    ``a.b``, which counts unless the importer lives inside it (then it is already being imported)."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name in MODULES:
        mine = {*_ancestors(name), name}
        for target, line in imported_names(name):
            for t in [*_ancestors(target), target]:
                if t in MODULES and t not in mine:
                    graph[name].setdefault(t, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    source = """
from typing import TYPE_CHECKING
from . import bits
from ..runtime import kernels
import secateurs.models as m
def later():
    from secateurs.checkpoint import load_pruned
if TYPE_CHECKING:
    from secateurs.api import prune
"""
    assert [t for t, _ in imported_names("secateurs.format.example", source)] == [
        "typing",
        "secateurs.format.bits",
        "secateurs.runtime.kernels",
        "secateurs.models",
        "secateurs.checkpoint",
    ]
    graph = import_graph()
    assert "secateurs.format.bits" in graph["secateurs.runtime.kernels"]  # module level
    assert "secateurs.runtime.linear" in graph["secateurs.runtime"]  # a package's own __init__
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Import circles that share no module, found one after the other until none is left."""
    found, seen = [], set()
    while cycle := find_cycle(
        {a: {b: n for b, n in e.items() if b not in seen} for a, e in graph.items() if a not in seen}
    ):
        found.append(cycle)
        seen.update(cycle)
    return found


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return (
        " -> ".join(cycle)
        + "\n    "
        + "\n    ".join(
            f"{MODULES[a].relative_to(PACKAGE.parent)}:{graph[a][b]} imports {b}"
            for a, b in zip(cycle, cycle[1:], strict=False)
        )
    )


def test_no_import_circle():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles:\n  " + "\n  ".join(describe(graph, c) for c in found)


def test_format_layer_stands_alone():
    allowed_roots = {"torch", "safetensors", "secateurs", "__future__", *sys.stdlib_module_names}
    for name in [m for m in MODULES if m == "secateurs.format" or m.startswith("secateurs.format.")]:
        for target, line in imported_names(name):
            where = f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
            assert target.split(".")[0] in allowed_roots, where
            if target.startswith("secateurs"):
                assert target == "secateurs.errors" or target.startswith("secateurs.format"), where
                assert not target.startswith(("secateurs.models", "secateurs.runtime", "secateurs.oneshot")), where
