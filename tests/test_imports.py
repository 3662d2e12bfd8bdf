"""The package's dependencies run one way: no module imports, even lazily, a module that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "examplegpt"


def module_name(path: Path, root: Path = REPO) -> str:
    """'examplegpt.model' for examplegpt/model.py, 'examplegpt' for examplegpt/__init__.py."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = REPO) -> dict[str, int]:
    """The package's modules that `path` imports anywhere in it (top level or inside a function): name -> line."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from . import x` and `from .pkg import x` may name submodules as well as attributes
            targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules] or [base]
        for target in targets:
            while target and target not in modules:  # `import examplegpt.model.x` depends on examplegpt.model
                target = target.rpartition(".")[0]
            if target and target != this:
                found.setdefault(target, node.lineno)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {module it imports: the line of the first such import}, for every module of the package."""
    root = package.parent
    files = sorted(package.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imported_modules(p, modules, root) for p in files}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The shortest cycle (a path a -> ... -> a) through each module that is on one, each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles, seen = [], set()
    for group in groups:
        for start in group:
            cycle = shortest_cycle(graph, start, set(group))
            edges = frozenset(zip(cycle, cycle[1:]))
            if edges not in seen:
                seen.add(edges)
                cycles.append(cycle)
    return cycles


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """The shortest path from `start` back to itself through `members` (modules that import each other)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in members and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    edges = [f"  {a} imports {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(edges)


def test_the_walker_sees_lazy_relative_and_absolute_imports(tmp_path):
    folder = tmp_path / "examplegpt"
    folder.mkdir()
    (folder / "__init__.py").write_text("from .a import f\n")
    (folder / "a.py").write_text("import os\n\ndef f():\n    from . import b\n")
    (folder / "b.py").write_text("import examplegpt.c\n")
    (folder / "c.py").write_text("from examplegpt.a import f\n")
    graph = import_graph(folder)
    assert graph["examplegpt"] == {"examplegpt.a": 1}
    assert graph["examplegpt.a"] == {"examplegpt.b": 4}  # the lazy one, inside f
    assert find_cycles(graph) == [["examplegpt.a", "examplegpt.b", "examplegpt.c", "examplegpt.a"]]


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    assert "examplegpt.config" in graph and graph["examplegpt.weights"]  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in examplegpt/:\n" + "\n".join(describe(graph, c) for c in cycles)


@pytest.mark.slow  # a fresh interpreter
def test_the_public_api_imports_in_a_fresh_interpreter_without_side_effects():
    code = (
        "import sys, examplegpt\n"
        "from examplegpt import GPT, GPTConfig, generate, load_model\n"
        "assert callable(generate) and callable(load_model) and GPT.__name__ == 'GPT'\n"
        "from examplegpt.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m.startswith('examplegpt')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no warnings, no progress bars, nothing printed at import
    assert "examplegpt.train" not in proc.stdout  # the API imports only what it needs
    assert "examplegpt.evaluate" not in proc.stdout  # and the parser no more than the configs
