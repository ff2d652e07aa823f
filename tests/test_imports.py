"""The packages' import graph: no cycles, and the two halves never import each other.

`convert/` and `runtime/` are siblings over `manifests/` (the bundle contract): neither imports
the other, and `manifests/` imports neither. Inside each, no module imports one that imports it
back, directly or through others: every import counts, also one inside a function or under
`if TYPE_CHECKING:`, since a cycle that only holds at type-checking time or on a rarely taken
path is still two modules that cannot be read, or moved, one without the other.

The graph is read from the source with `ast` (nothing is imported), so the test sees exactly
what is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("convert", "runtime", "manifests")
# What each package may import of the others.
ALLOWED = {"convert": {"manifests"}, "runtime": {"manifests"}, "manifests": set()}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports (`from a import b` is a.b where b is a
    module, else a), anywhere in its source."""
    files = {module_name(root, f): f for p in packages for f in sorted((root / p).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the current package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a module a.b: a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    graph = import_graph(ROOT)
    assert len(graph) > 30  # every module was read
    assert cycles(graph) == []


def test_convert_and_runtime_never_import_each_other():
    crossing = sorted(f"{src} imports {dst}" for src, dsts in import_graph(ROOT).items() for dst in dsts
                      if dst.split(".")[0] != src.split(".")[0] and dst.split(".")[0] not in ALLOWED[src.split(".")[0]])
    assert crossing == []


@pytest.mark.parametrize("imports,cycle", [
    # function-level and TYPE_CHECKING imports count; a package's __init__ is a module of its own
    ({"a": "def f():\n    from pkg.b import x\n", "b": "from pkg import a\n"}, ["pkg.a", "pkg.b"]),
    ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n",
      "b": "import pkg.c\n", "c": "from .a import y\n"}, ["pkg.a", "pkg.b", "pkg.c"]),
    ({"__init__": "from pkg.a import f\n", "a": "from pkg import g\n"}, ["pkg", "pkg.a"]),
    ({"a": "from pkg.b import x\n", "b": "import os\n"}, None),
])
def test_the_check_finds_cycles_written_any_way(tmp_path, imports, cycle):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for name, text in imports.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(text)
    assert cycles(import_graph(tmp_path, ("pkg",))) == ([cycle] if cycle else [])
