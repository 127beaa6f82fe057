"""The code's floors hold (docs/design.md, "Layers"): no module imports from a floor above its own
(import-linter's contract in setup.cfg), no two modules import each other, even through others
(an import circle), and every command runs through the dispatch table without loading TensorFlow
before its CPU settings. Reads the source only: fast."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "launcher")


def test_lint_imports_keeps_the_floors():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def import_circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every group of modules that import one another, directly or through each other (the strongly
    connected components of more than one module, Tarjan's algorithm), each named by one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                circles.append(_one_circle(graph, sorted(group)))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def _one_circle(graph: grimp.ImportGraph, group: list[str]) -> list[str]:
    """first -> ... -> first through the group's modules (a path back exists: they form one group)."""
    first = group[0]
    second = next(m for m in sorted(graph.find_modules_directly_imported_by(first)) if m in group)
    return [first, *graph.find_shortest_chain(importer=second, imported=first)]


def test_no_module_imports_itself_through_others():
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    circles = import_circles(grimp.build_graph(*PACKAGES, cache_dir=None))  # no cache folder left behind
    assert circles == [], "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_every_command_has_a_handler_and_none_loads_tensorflow_on_import():
    code = ("import sys; from trainer.commands.args import build_parser; "
            "from trainer.commands.dispatch import HANDLERS, handler; "
            "sub = next(a for a in build_parser()._actions if a.dest == 'command'); "
            "assert set(sub.choices) == set(HANDLERS), sorted(set(sub.choices) ^ set(HANDLERS)); "
            "assert all(callable(handler(name)) for name in HANDLERS); "
            "sys.exit('tensorflow loaded by a command module' if 'tensorflow' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
