"""Import layers: every ``bids_uad`` import points down, and no import circle exists.

The layers, lowest first (a package may import its own layer and the layers below it):

0. ``errors`` and the package itself (``bids_uad.__version__``): imported by everything.
1. ``bids`` (BIDS files in and out), ``algorithms`` (plain functions on arrays) and
   ``synthetic`` (the test-data generator, which must not share code with the pipeline it
   tests, so it imports nothing above ``errors``).
2. ``models`` (networks and the trained-model artefact inference reads).
3. ``training``, ``scoring`` and ``config`` (the run's settings: they name the models'
   threshold methods, so they sit above ``models``).
4. ``interfaces`` (thin nipype interfaces).
5. ``workflows`` (builders that only wire, and the execution of a built graph).
6. ``reports``.
7. ``cli`` and ``__main__`` (parse, run the levels, exit codes).

One module sits below its package: ``reports.figures`` holds the figure functions on arrays
(as niworkflows' ``viz``), which interfaces call to draw a figure stored as a derivative; it
imports nothing above ``bids`` and is checked at layer 1.

Every import counts, also one inside a function: a deferred import still runs the arrow.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_uad"

LAYERS: list[set[str]] = [
    {"errors", "__init__"},
    {"bids", "algorithms", "synthetic"},
    {"models"},
    {"training", "scoring", "config"},
    {"interfaces"},
    {"workflows"},
    {"reports"},
    {"cli", "__main__"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}
#: packages that import less than their layer allows
ONLY = {"synthetic": {"errors", "__init__", "synthetic"}}
#: modules placed below their package (see the module docstring)
MODULE_LEVEL = {"bids_uad.reports.figures": 1}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """Top-level part of a ``bids_uad`` module: ``bids_uad.models.io`` -> ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """``bids_uad`` modules imported anywhere in ``path``, with their line numbers."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return [(name, line) for name, line in found if name == "bids_uad" or name.startswith("bids_uad.")]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    known = all_modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def test_every_package_has_a_layer():
    parts = {part_of(m) for m in all_modules()}
    assert parts <= set(LEVEL), f"give these a layer in tests/test_layers.py: {sorted(parts - set(LEVEL))}"


def level_of(module: str) -> int:
    return MODULE_LEVEL.get(module, LEVEL[part_of(module)])


def test_imports_point_down():
    upward = []
    for module, imported in import_graph().items():
        here = part_of(module)
        for target, line in imported:
            there = part_of(target)
            allowed = ONLY.get(here)
            if level_of(target) > level_of(module) or (allowed is not None and there not in allowed):
                upward.append(f"{module}:{line} imports {target} (layer {level_of(module)} imports "
                              f"layer {level_of(target)})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    graph = {m: {t for t, _ in imported} for m, imported in import_graph().items()}
    assert cycles(graph) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"a"}}, [["a"]]),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert cycles(graph) == expected


def test_the_layer_check_sees_deferred_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from bids_uad.cli.run import main\n    return main\n")
    assert imports_of("bids_uad.workflows.mod", source, {"bids_uad.cli.run": source}) == [("bids_uad.cli.run", 2)]
