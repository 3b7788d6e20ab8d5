"""The package's shape, as ARCHITECTURE.md states it: imports run one way, parts stay small.

The import graph is built with ``ast`` from every ``import`` in the package's source,
``TYPE_CHECKING`` blocks and imports inside functions included, so a cycle hidden
behind either still fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "celery_stepped"
MAX_FUNCTION_LINES = 40
MAX_MODULE_LINES = 400
#: Modules the core (everything but these) must never import.
EDGE_MODULES = {
    "celery_stepped.testing",
    "celery_stepped.pytest_plugin",
    "celery_stepped.cli",
    "celery_stepped.rendering",
    "celery_stepped.views",
    "celery_stepped.diagnosis",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        yield module_name(path), path, ast.parse(path.read_text("utf-8"))


def imported(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    parsed = list(sources())
    known = {name for name, _, _ in parsed}
    edges = {name: imported(name, path, tree, known) for name, path, tree in parsed}
    # ``from . import sibling`` names the enclosing package first: its __init__ is the
    # package's interface (re-exports), not a layer, so edges to an ancestor don't count.
    return {
        name: {m for m in targets if not name.startswith(m + ".")}
        for name, targets in edges.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    assert len(edges) > 20  # the graph was really built
    assert "celery_stepped.engine" in edges["celery_stepped.extension"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def is_edge(name: str) -> bool:
    """Edges: the testing helpers, the CLI and read model, and ``contrib`` integrations."""
    return name in EDGE_MODULES or name.startswith("celery_stepped.contrib")


def test_the_core_never_imports_testing_or_the_edges() -> None:
    edges = graph()
    core = {name for name in edges if not is_edge(name) and name != "celery_stepped"}
    leaks = {name: sorted(m for m in edges[name] if is_edge(m)) for name in core}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_no_function_is_longer_than_40_lines() -> None:
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for _, path, tree in sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_no_module_is_longer_than_400_lines() -> None:
    sizes = {path.name: len(path.read_text("utf-8").splitlines()) for _, path, _ in sources()}
    assert len(sizes) > 20
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
