"""The package's shape: the layer contract (`.importlinter`, run by import-linter), no import cycle, no module that
imports another module's private name, and no module over 400 lines."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import ia3_trainer


PACKAGE = Path(ia3_trainer.__file__).resolve().parent
CONFIG = PACKAGE.parent / ".importlinter"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_the_layer_contract_holds(tmp_path):
    assert CONFIG.is_file(), f"{CONFIG} is missing: it holds the layer contract"
    # In a process of its own: import-linter configures logging (dictConfig disables the loggers that exist), and
    # without --no-cache it writes a cache into the current folder.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--config", str(CONFIG), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout  # it did check some


def test_no_import_cycles():
    """Imports inside functions count too. The package's own `__init__` is left out: it is the facade that
    re-exports every layer (lazily), and a module may read `__version__` from it."""
    graph = grimp.build_graph(PACKAGE.name, include_external_packages=False)
    root = PACKAGE.name
    edges = {module: graph.find_modules_directly_imported_by(module) - {root} for module in graph.modules - {root}}
    assert len(edges) > 10, edges  # the graph holds the package's modules
    cycles = [sorted(group) for group in strongly_connected(edges) if len(group) > 1]
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(group) for group in cycles)


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a graph given as `{node: nodes it points to}`."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_a_private_name_of_another():
    known = modules()
    found = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE.name:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {alias.name} from {source}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_no_module_is_over_400_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    long = [f"{name}: {count} lines" for name, count in sorted(lengths.items()) if count > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(long)


def test_the_public_api_is_all_of_it_and_every_name_resolves():
    assert dir(ia3_trainer) == sorted(ia3_trainer.__all__)
    assert all(getattr(ia3_trainer, name) is not None for name in ia3_trainer.__all__)
    assert (PACKAGE / "py.typed").is_file()
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        ia3_trainer.trainer  # noqa: B018 - modules are reached by their subpackage path, not from the top
