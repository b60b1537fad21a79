"""The package's shape, read from its source: no module of train/ imports, at any depth, one that imports it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "train"


def imports_of(path: Path) -> set:
    """The train modules a file imports anywhere in it (inside functions too: a deferred import is still a tie)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "train":
            names |= {node.module} if node.module != "train" else {f"train.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "train"}
    return {n for n in names if (ROOT / f"{n.split('.')[1]}.py").is_file()} if names else set()


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def test_no_import_cycle_among_the_modules():
    graph = {f"train.{p.stem}": imports_of(p) for p in ROOT.glob("*.py") if p.stem != "__init__"}
    in_cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not in_cycles, f"modules that import themselves through others: {in_cycles}"


def test_every_module_is_on_the_package_map_and_in_the_readme():
    import re

    modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "main"}
    package_map = set(re.findall(r"\w+", (ROOT / "__init__.py").read_text()))
    layout = (ROOT.parent / "README.md").read_text().split("**Layout.**")[1].split("\n\n")[0]
    in_layout = set(re.findall(r"`(?:train/)?(\w+)(?:\.py)?`", layout))
    assert not modules - package_map, f"not on train/__init__.py's map: {sorted(modules - package_map)}"
    assert not modules - in_layout, f"not in the README's layout: {sorted(modules - in_layout)}"


def test_no_function_is_longer_than_50_lines():
    long = [f"{p.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in sorted(ROOT.glob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50]
    assert not long, long
