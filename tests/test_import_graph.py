"""No import cycles inside upop: every import (also those inside functions, which would only hide
a cycle) points down a layered graph, with no module exempt (the package face ``upop/__init__.py``
imports its names lazily, and the registries ``arch/`` and ``tasks/`` are imported by their
members' users, never by their members)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "upop"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if not base.startswith("upop"):
        return []
    # "from . import x" names submodules; "from .m import name" names the module m
    return [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]


def import_graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("upop")]
            for t in targets:
                while t and t not in files:  # "upop.tasks.retrieval.X" -> the module that defines X
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


ROOTS: set[str] = set()  # no module is exempt: the package face and the registries included


def test_no_import_cycles():
    graph = import_graph()
    # the registries import their members; nothing may import a registry back to form a cycle
    inner = {m: {n for n in deps if n not in ROOTS} for m, deps in graph.items() if m not in ROOTS}
    assert _cycle(inner) is None, " -> ".join(_cycle(inner))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_upop_is_light():
    """``import upop`` loads no model code: the names come on first use (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, upop; heavy = [m for m in sys.modules if m.startswith(('torch', 'transformers'))]; "
            "print(len(heavy)); upop.UPopConfig; print(int('upop.config' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "1"], out


def test_the_package_face_names_exist():
    import upop

    for name in upop.__all__:
        assert getattr(upop, name) is not None, name


def test_no_public_name_is_spelled_like_a_subpackage():
    """``upop.prune`` is the function and ``upop.pruning`` the package: a public name that were also a
    module of the package would be replaced by the module once something imported it."""
    import pkgutil

    import upop

    modules = {m.name for m in pkgutil.iter_modules(upop.__path__)}
    assert not modules & set(upop.__all__), modules & set(upop.__all__)


def test_a_public_name_stays_itself_after_its_module_is_imported():
    import subprocess
    import sys

    code = ("import upop.pruning.prune, upop.search.mask_search, upop; "
            "print(type(upop.prune).__name__, type(upop.UPopSearch).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["function", "type"], out
