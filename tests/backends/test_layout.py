"""Imports run one way: functional -> _validation, functional -> backends -> ops.

Read from the source (every ``import``, also those inside functions), so a lazy import
that closes a cycle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import crossent

SRC = Path(crossent.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Dict[str, Set[str]]:
    """module -> the crossent modules (or module attributes) it imports."""
    graph: Dict[str, Set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("crossent"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("crossent"):
                    continue
                if node.module is None:  # from . import a, b: the submodules a, b
                    found.update(f"{target}.{a.name}" for a in node.names)
                else:
                    found.add(target)
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_module_walk_sees_the_package():
    graph = _imports()
    assert "crossent.backends._registry" in graph
    assert "crossent.backends.linear.plan" in graph
    assert "crossent.functional._multiclass" in graph
    assert "crossent.backends" in graph["crossent.functional._multiclass"]  # the walk finds imports


def test_backends_import_no_meaning_layer():
    """backends own speed: nothing in them imports functional, nn, _validation or the
    layers above (only the leaf modules errors, _config, _dtypes, _capture)."""
    above = ("crossent.functional", "crossent.nn", "crossent._validation", "crossent.distributed", "crossent.tracking")
    bad = sorted(
        (m, t)
        for m, targets in _imports().items()
        if _within(m, "crossent.backends")
        for t in targets
        if any(_within(t, a) for a in above)
    )
    assert bad == []


def test_the_plain_linear_package_never_imports_triton():
    """The Triton linear path builds on ``backends.linear`` (its blocks and ops), never the
    other way round."""
    bad = sorted(
        (m, t)
        for m, targets in _imports().items()
        if _within(m, "crossent.backends.linear")
        for t in targets
        if _within(t, "crossent.backends.triton")
    )
    assert bad == []


def test_no_import_cycle_between_backend_modules():
    graph = {m: t for m, t in _imports().items() if _within(m, "crossent.backends")}

    def reachable(start: str) -> Set[str]:
        seen: Set[str] = set()
        todo = [start]
        while todo:
            for t in graph.get(todo.pop(), ()):
                # a package and its own submodules import each other by construction
                if t not in seen and t in graph:
                    seen.add(t)
                    todo.append(t)
        return seen

    cycles = sorted(
        (a, b)
        for a in graph
        for b in graph[a]
        if b in graph and not (_within(a, b) or _within(b, a)) and a in reachable(b)
    )
    assert cycles == []
