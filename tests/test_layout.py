"""The layering the design promises, read from the code itself: stage modules never import one
another, tasks/ and schemas/ never import Prefect, Ray or flows/, and no module imports itself
back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

STAGE_MODULES = {
    "tasks.ingest",
    "tasks.dedup",
    "tasks.semantic",
    "tasks.pairs",
    "tasks.generate",
    "tasks.write_passages",
    "tasks.embed",
    "tasks.query_dedup",
    "tasks.mine",
    "tasks.assemble",
}


def imports_of(path: Path) -> set[str]:
    """Modules a file imports (top level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules() -> dict[str, Path]:
    found = {}
    for folder in ("schemas", "tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def project_imports() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(path) if m in mods} for name, path in mods.items()}


def test_every_stage_module_declares_a_stage():
    import importlib

    from tasks.stage import Stage

    for name in STAGE_MODULES:
        module = importlib.import_module(name)
        stages = [
            v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Stage) and v is not Stage
        ]  # fmt: skip
        assert stages, f"{name} declares no Stage"


def test_stage_modules_do_not_import_each_other():
    graph = project_imports()
    for name in STAGE_MODULES:
        assert not graph[name] & (STAGE_MODULES - {name}), (name, graph[name] & STAGE_MODULES)


def test_lower_layers_know_nothing_of_orchestration():
    mods = modules()
    for name, path in mods.items():
        if name.startswith(("tasks", "schemas")):
            bad = {
                m
                for m in imports_of(path)
                if m.split(".")[0] in ("prefect", "prefect_ray", "ray", "flows")
            }
            assert not bad, (name, bad)
        if name.startswith("schemas"):
            assert not {m for m in imports_of(path) if m.startswith("tasks")}, name


def test_no_import_cycles():
    graph = project_imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_flow_reads_like_the_diagram():
    lines = (ROOT / "flows" / "build.py").read_text().splitlines()
    assert len(lines) < 150
