"""The package's shape: its imports, read with ast (function-level and TYPE_CHECKING imports
included), form no circle between modules or between folders, and each folder imports only
from the folders below it (the order in wandacli/__init__.py's docstring)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import wandacli

PACKAGE_DIR = Path(wandacli.__file__).parent

# Bottom to top: a folder may import from itself and from those before it, never after.
LAYERS = (
    "datasets",  # package data only: the shipped files
    "core",
    "config",
    "store",
    "data",
    "models",
    "methods",
    "scoring",
    "removal",
    "evaluation",
    "training",
    "search",
    "analysis",
    "reporting",
    "legacy",
    "pipeline",
    "cli",
    "__main__",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the wandacli modules it imports, wherever in the file the import stands."""
    modules = all_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from wandacli.x import y` imports the module x.y when there is one
                targets = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                    for a in node.names
                ]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_circle_between_folders():
    folders: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        for target in targets:
            if folder_of(module) != folder_of(target):
                folders[folder_of(module)].add(folder_of(target))
    folders.pop("__init__", None)
    assert cycles(folders) == []


def test_each_folder_imports_only_from_those_below():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            a, b = folder_of(module), folder_of(target)
            if b == "__init__":  # the package face (its version) is below everything
                continue
            assert a in rank and b in rank, f"{module} or {target} is in no layer of LAYERS"
            if rank[b] > rank[a]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layers_name_every_folder():
    on_disk = {folder_of(m) for m in all_modules()} - {"__init__"}
    assert on_disk <= set(LAYERS), on_disk - set(LAYERS)
