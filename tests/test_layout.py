"""The architecture as a test: which room may import which, over the whole import graph
(imports inside functions included, since they hide upward dependencies just as well).

Rooms, lowest first; a module may import its own room and the rooms below it, never one above:

- ``losses`` (torch only) < ``engine`` < ``experiments``;
- inside ``engine``: ``runtime`` < ``data`` < ``model`` < ``generation`` < ``task`` < the training
  core (the top-level modules) < the commands (``train``, ``evaluate``, ``sample_pairs``,
  ``iterate``) and ``engine.verifiers`` (the documented import of every registered verifier).

A lower room that needs a higher one's part gets it through a registry (the embedded task
registers its verifier and data source), never through an import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("losses", "engine", "experiments")

#: engine's rooms, lowest first
ENGINE_ROOMS = ("runtime", "data", "model", "generation", "task", "core", "commands")
COMMANDS = {"train", "evaluate", "sample_pairs", "iterate", "verifiers"}
#: top-level folders of a package (more modules side by side than this hide the architecture)
MAX_MODULES_PER_FOLDER = 15


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every project module ``path`` imports (top level or inside functions), with its line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from engine.data import loading`` imports engine.data.loading
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES:
                yield node.lineno, name


def room(module: str) -> tuple[int, int]:
    """(package rank, room rank) of a module: the order imports must respect."""
    parts = module.split(".")
    package = PACKAGES.index(parts[0])
    if parts[0] != "engine" or len(parts) == 1:
        return package, 0
    if len(parts) > 2 or (REPO / "engine" / parts[1]).is_dir():
        return package, ENGINE_ROOMS.index(parts[1])
    return package, ENGINE_ROOMS.index("commands" if parts[1] in COMMANDS else "core")


def test_the_rooms_are_the_ones_listed() -> None:
    """A new subpackage of engine/ takes its place in ENGINE_ROOMS (and this docstring)."""
    folders = {p.name for p in (REPO / "engine").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(ENGINE_ROOMS) - {"core", "commands"}


def test_no_module_imports_a_room_above_its_own() -> None:
    upward = []
    for name, path in MODULES.items():
        for line, target in _imports(path):
            if room(target) > room(name):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import() -> None:
    """The rule above is not vacuous: the task sits above generation, the core above the task."""
    assert room("engine.generation.verifiers") < room("engine.task.register")
    assert room("engine.task.pipeline") < room("engine.loop") < room("engine.train")
    assert (
        room("engine.runtime.fileio") < room("engine.data.loading") < room("engine.model.loading")
    )
    assert room("losses.core") < room("engine.runtime.fileio") < room("experiments.reproduce")


def test_no_import_cycles() -> None:
    edges = {name: {t for _, t in _imports(path) if t != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if node.startswith(target + "."):
                continue  # a module naming its own package (``from engine.runtime import ...``)
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_folder_is_a_crowd(package: str) -> None:
    for folder in [REPO / package, *(p for p in (REPO / package).rglob("*") if p.is_dir())]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_FOLDER, (
            f"{folder.relative_to(REPO)} has {len(modules)} modules side by side: group them"
        )
