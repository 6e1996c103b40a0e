"""The package's import graph has no cycles, and no module hides one behind an import inside a function.

The graph is read from the source (every ``import`` / ``from ... import`` anywhere in a module, function bodies
included), independent of the order Python happens to import things in. ``from package import name`` counts as a
dependency on the module that defines ``name`` (found at run time through ``__module__``, else by the module whose
top level assigns it), so the lazy re-exports of ``ds_orthoadam.data`` cannot hide an edge.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = "ds_orthoadam"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _top_level_names(name: str) -> set[str]:
    names = set()
    for node in TREES[name].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def _defining_module(base: str, attribute: str) -> str:
    """The module ``from base import attribute`` depends on: the submodule itself, or where the name is defined."""
    if f"{base}.{attribute}" in MODULES:
        return f"{base}.{attribute}"
    if not _is_package(base) or attribute in _top_level_names(base):
        return base
    owner = getattr(getattr(importlib.import_module(base), attribute, None), "__module__", None)
    if owner in MODULES:
        return owner
    candidates = [name for name in MODULES if name.startswith(base + ".") and attribute in _top_level_names(name)]
    return candidates[0] if len(candidates) == 1 else base


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _dependencies(module: str) -> set[str]:
    found = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base in MODULES:
                found |= {_defining_module(base, alias.name) for alias in node.names}
    return found - {module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_import_graph_has_no_cycles():
    graph = {module: _dependencies(module) for module in MODULES}
    assert graph[f"{PACKAGE}.train"], "the graph reader found no dependency of train.py"
    assert _cycles(graph) == []


def test_package_modules_are_imported_at_the_top_of_each_file():
    """An import of a package module inside a function is how a cycle gets hidden; every such import is at the top."""
    nested = []
    for module, tree in TREES.items():
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = ([_absolute(module, node)] if isinstance(node, ast.ImportFrom)
                         else [alias.name for alias in node.names])
                if any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in names):
                    nested.append(f"{module}:{node.lineno}")
    assert nested == []
