"""The import graph of `snapserve.*`: a DAG inside each package, and the arrows DESIGN.md draws.

Read from the source with `ast` (nothing is imported, so torch need not be installed). Every
import statement counts, including those inside functions: a lazy import that closes a cycle is
still a cycle, only deferred. Imports under `if TYPE_CHECKING:` do not run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proto", "server", "client", "trainer")

Graph = dict[str, set[str]]


def module_files() -> dict[str, Path]:
    """snapserve module name -> source file, for every .py under the four package folders."""
    modules = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(["snapserve", *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The snapserve modules `name` imports. `from pkg import x` means pkg.x when that is a module."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph() -> Graph:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def find_cycle(graph: Graph, nodes: set[str]) -> list[str] | None:
    """One cycle among `nodes` (edges leaving `nodes` are ignored), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(nodes):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


GRAPH = import_graph()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    prefix = f"snapserve.{package}"
    members = {m for m in GRAPH if m == prefix or m.startswith(prefix + ".")}
    assert len(members) > 1, f"found no modules for {prefix}"
    cycle = find_cycle(GRAPH, members)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Who may import whom across packages (DESIGN.md "One picture"): the model repository on disk is
# the trainer/server contract; proto is the leaf both sides share.
ALLOWED = {
    "proto": set(),
    "server": {"proto"},
    "client": {"proto"},
    "trainer": {"proto"},
}


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_design_allows(package: str) -> None:
    prefix = f"snapserve.{package}"
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items() if source == prefix or source.startswith(prefix + ".")
        for target in targets
        if (other := target.split(".")[1]) != package and other not in ALLOWED[package]
    )
    assert not wrong, "\n".join(wrong)


def test_the_graph_reader_sees_a_cycle() -> None:
    """The checker itself: a two-module cycle and a self-contained chain."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph, set(graph)) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None
    assert GRAPH["snapserve.server.process.cli"], "the reader found no imports in server/process/cli.py"


# Inside the server, the wings point one way: api -> models -> engine (DESIGN.md "Layout").
WINGS_BELOW = {"api": {"models", "engine"}, "models": {"engine"}, "engine": set()}


@pytest.mark.parametrize("wing", sorted(WINGS_BELOW))
def test_server_wings_import_only_downwards(wing: str) -> None:
    prefix = f"snapserve.server.{wing}"
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items() if source.startswith(prefix + ".")
        for target in targets
        if target.startswith("snapserve.server.") and (other := target.split(".")[2]) in WINGS_BELOW
        and other != wing and other not in WINGS_BELOW[wing]
    )
    assert not wrong, "\n".join(wrong)


HEAVY = ("grpc", "aiohttp", "onnxruntime", "torch")


@pytest.mark.parametrize("module", ["snapserve.server.engine.batcher", "snapserve.proto.scores",
                                    "snapserve.server.errors"])
def test_light_parts_import_without_the_heavy_dependencies(module: str) -> None:
    """Importing the batcher or the scores (package __init__ files included) never loads
    grpc, aiohttp, ONNX Runtime or torch: a fresh interpreter says which it loaded."""
    probe = (f"import sys, {module}; "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"


def test_the_server_package_still_exports_its_public_names() -> None:
    import snapserve.server as server

    for name in server.__all__:
        assert getattr(server, name) is not None
