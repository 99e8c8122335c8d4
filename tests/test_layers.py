"""The house's floors, read from the code's own imports (every import, function-level ones too).

Rooms are products10k's sub-packages and top-level modules. No room may import one that imports it
back, directly or through others, and no chain of imports is longer than 6 rooms; the deployed
runtime (pyproject's console scripts) imports only what the base install brings; no module outgrows
500 lines and no function 80.
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
import tomllib

import networkx as nx
import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "products10k"
MAX_LINES = 500


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "products10k" or len(parts) < 2:
        return None
    return parts[1]


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        src = _room(".".join(rel.parts)) if rel.name != "__init__" else _room(".".join(rel.parts[:-1]))
        if src is None:
            continue
        graph.add_node(src)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                dst = _room(name)
                if dst and dst != src and ((PACKAGE / dst).is_dir() or (PACKAGE / f"{dst}.py").is_file()):
                    graph.add_edge(src, dst)
    return graph


def test_no_room_imports_one_that_imports_it_back():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles between rooms: {cycles}"


#: the code held to the package's size rules: the package, the stage scripts, the benchmarks
CODE = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "stages").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


@pytest.mark.parametrize("path", [str(p.relative_to(ROOT)) for p in CODE])
def test_no_module_over_500_lines(path):
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path}: {lines} lines (split it by concern)"


MAX_FUNCTION_LINES = 80


def test_no_function_over_80_lines():
    long = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


#: a stage script is arguments -> typed settings -> the family's function (docs/pipeline.md)
MAX_STAGE_LINES = 60


def test_no_stage_script_over_60_lines():
    long = [f"{p.name} ({n} lines)" for p in (ROOT / "stages").glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES]  # fmt: skip
    assert not long, f"stage scripts over {MAX_STAGE_LINES} lines (move the work into its family): {long}"


#: where params.yaml may be read: the config package itself and the command-line entry points (the
#: stage scripts, the launcher, Table 1's runner); everything below them gets typed sections passed in
ENTRY_POINTS = {"products10k/dist/launch.py", "products10k/report/table1.py"}
READERS = {"load_yaml", "load_section"}


def test_params_are_read_at_the_entry_points_alone():
    readers = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("products10k/config/") or rel in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in READERS:
                    readers.append(f"{rel}:{node.lineno} {name}()")
    assert not readers, f"params.yaml read below the entry points (pass typed sections in): {readers}"


#: the longest import chain between rooms (export -> models -> contracts -> common is 4)
MAX_FLOORS = 6


def test_the_longest_import_chain_between_rooms_is_at_most_6():
    longest = nx.dag_longest_path(import_graph())
    assert len(longest) <= MAX_FLOORS, f"import chain of {len(longest)} rooms: {' -> '.join(longest)}"


def _module_imports(path) -> tuple[set[str], set[str]]:
    """(products10k modules, top-level third-party names) a file imports, function-level ones too."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "products10k":
                ours.add(name)
            elif name.split(".")[0] not in sys.stdlib_module_names:
                theirs.add(name.split(".")[0])
    return ours, theirs


def _closure(entry: str) -> set:
    """Every products10k source file that ``entry`` (a module) reaches through imports."""
    seen, todo = set(), [entry]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        path = ROOT.joinpath(*parts).with_suffix(".py")
        if not path.is_file():
            path = ROOT.joinpath(*parts, "__init__.py")
        if not path.is_file() or path in seen:
            continue
        seen.add(path)
        for parent in range(2, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parts[:parent]))
        todo.extend(_module_imports(path)[0])
    return seen


def _installed_with(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install: themselves and, transitively, what they require."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    found, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if norm(req.name) in found or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        found.add(norm(req.name))
        with contextlib.suppress(PackageNotFoundError):
            todo.extend(Requirement(r) for r in requires(req.name) or [])
    return found


def test_the_runtime_imports_only_what_its_install_brings():
    """Each console script of pyproject (the deployed runtime) reaches only modules whose third-party
    imports the base install brings (plus the extra named after the script, as ``serve``), read from
    pyproject's own dependency lists, not from a hand list."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist_of = {name: {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
               for name, dists in packages_distributions().items()}  # fmt: skip
    wrong = []
    for script, target in project["scripts"].items():
        extra = project["optional-dependencies"].get(script.removeprefix("products10k-"), [])
        allowed = _installed_with([*project["dependencies"], *extra])
        for path in sorted(_closure(target.split(":")[0])):
            for name in sorted(_module_imports(path)[1]):
                if not dist_of.get(name, {name}) & allowed:
                    wrong.append(f"{script}: {path.relative_to(ROOT)} imports {name}")
    assert not wrong, "the runtime imports what its install does not bring:\n" + "\n".join(wrong)
