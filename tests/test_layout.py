"""The package's imports point one way: no cycles, and no layer imports one above it.

Layers, lowest first: exceptions, money, clock and friends; context, identity, windows;
config; pricing; ledger; engine; then meter and web side by side (neither imports the
other). Whatever is not listed (the framework integrations, reports, the CLI, testing
helpers) sits above them all. Imports under ``TYPE_CHECKING`` are free; an import inside
a function counts like any other, except the few :data:`LAZY_UPWARD` ones the public
contract needs. And no module is over :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import payi_guard

PACKAGE = Path(payi_guard.__file__).parent

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "payi_guard.exceptions",
        "payi_guard.money",
        "payi_guard.clock",
        "payi_guard.usage",
        "payi_guard.log",
        "payi_guard._ids",
        "payi_guard._frozen",
        "payi_guard.threads",
    ),
    ("payi_guard.context", "payi_guard.identity", "payi_guard.windows"),
    ("payi_guard.config",),
    ("payi_guard.pricing",),
    ("payi_guard.ledger",),
    ("payi_guard.engine",),
    ("payi_guard.meter", "payi_guard.web"),
)

LAZY_UPWARD = {
    # The contract puts wrap() and instrument() on Guard; the meter imports the engine.
    ("payi_guard.engine.guard", "payi_guard.meter"),
}

SIDE_BY_SIDE = ("payi_guard.meter", "payi_guard.web")

MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(module: str, name: str) -> str | None:
    """The module an import names: ``from a import b`` is ``a.b`` when that is a module."""
    if f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module if module in MODULES else None


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """Yield ``(module imported, inside a function)`` for each payi_guard import."""

    def walk(nodes: list[ast.stmt], lazy: bool) -> Iterator[tuple[str, bool]]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse, lazy)
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = _target(node.module, alias.name)
                    if target is not None:
                        yield target, lazy
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES:
                        yield alias.name, lazy
            inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "handlers", "finalbody"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from walk([n for n in block if isinstance(n, ast.stmt)], lazy or inner)
            for handler in getattr(node, "handlers", []):
                yield from walk(handler.body, lazy or inner)

    yield from walk(ast.parse(path.read_text(encoding="utf-8")).body, False)


def _layer(module: str) -> int:
    best, best_len = len(LAYERS), -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def _group(module: str) -> str | None:
    return next((g for g in SIDE_BY_SIDE if module == g or module.startswith(g + ".")), None)


def test_no_import_cycle_at_module_level() -> None:
    graph = {
        name: {target for target, lazy in _imports(path) if not lazy and target != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_no_layer_imports_one_above_it() -> None:
    wrong = []
    for name, path in sorted(MODULES.items()):
        own = _layer(name)
        if own == len(LAYERS):
            continue
        for target, lazy in _imports(path):
            upward = _layer(target) > own
            across = _group(name) is not None and _group(target) not in (None, _group(name))
            allowed = lazy and any(
                name == module and (target == top or target.startswith(top + "."))
                for module, top in LAZY_UPWARD
            )
            if (upward or across) and not allowed:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_module_is_over_the_line_limit() -> None:
    lines = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()
    }
    over = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert over == {}


def test_the_checks_see_real_imports() -> None:
    imports = dict(_imports(MODULES["payi_guard.engine.guard"]))
    assert imports["payi_guard.meter"] is True  # lazy
    assert imports["payi_guard.engine.plan"] is False
    assert _layer("payi_guard.meter.clients") > _layer("payi_guard.engine.guard")
    assert _layer("payi_guard.flask") == len(LAYERS)


FACADE_MAX_LINES = 470
"""The Guard class: one-line delegations to its parts, with their docstrings (450 until
``tier``/``atier`` joined ``usage``/``ausage`` among the readers)."""


def test_the_guard_facade_stays_thin() -> None:
    tree = ast.parse(MODULES["payi_guard.engine.guard"].read_text(encoding="utf-8"))
    (guard,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Guard"]
    assert guard.end_lineno is not None
    length = guard.end_lineno - guard.lineno + 1
    assert length < FACADE_MAX_LINES, length
