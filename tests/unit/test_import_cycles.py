"""No import cycle anywhere in the house, deferred imports included: every
``import`` is read, at module level, inside functions and under
``TYPE_CHECKING`` alike, so a cycle cannot hide behind a late import. And the
site's rooms (``client/``'s sub-packages) import only the rooms below them."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.house import PACKAGES, ROOT

# client/'s rooms, lowest first: a room imports only rooms before it (and itself)
CLIENT_ROOMS = ("problem", "data", "privacy", "checks", "training", "scoring", "node")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for name in names:
        while name and name not in modules:  # `from pkg.mod import attr` -> pkg.mod
            name = name.rpartition(".")[0]
        if name and modules[name].name != "__init__.py":
            out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(p, modules) - {m} for m, p in modules.items()}


def test_no_import_cycle_even_through_deferred_imports() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]
    ]


def test_client_rooms_import_only_rooms_below() -> None:
    def room(module: str) -> str:
        return module.split(".")[1]

    bad = sorted(
        f"{m} -> {n}"
        for m, imports in _graph().items()
        if m.startswith("client.") and m != "client"
        for n in imports
        if n.startswith("client.")
        and CLIENT_ROOMS.index(room(n)) > CLIENT_ROOMS.index(room(m))
    )
    assert not bad, bad


def test_every_client_module_lives_in_a_room() -> None:
    loose = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "client").glob("*.py")
        if p.stem not in ("__init__", *CLIENT_ROOMS)
    )
    assert not loose, loose
