"""The serving package's shape, checked from its source (ast): one core, thin adapters that import it and never
each other, no import circle, no private name imported across modules, no function over 120 lines, and the core
class within 350 lines. A change that breaks one of these fails here, naming the module and the line."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[2] / "resdeploy" / "serve"
ADAPTERS = {"rest", "fastpath", "grpc_native", "grpc_aio", "workers"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SERVE.rglob("*.py")):
        name = ".".join(path.relative_to(SERVE).with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = ast.parse(path.read_text(), str(path))
    return out


def imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module inside resdeploy.serve, imported names, line) for every import in the tree, nested ones too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resdeploy.serve"):
            found.append((node.module.removeprefix("resdeploy.serve").lstrip("."), [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("resdeploy.serve."):
                    found.append((a.name.removeprefix("resdeploy.serve."), [], node.lineno))
    return found


def test_no_private_name_is_imported_across_modules():
    bad = [f"{mod}:{line} imports {name} from {target}" for mod, tree in modules().items()
           for target, names, line in imports(tree) for name in names if name.startswith("_") and target != mod]
    assert not bad, bad


def test_no_import_circle_and_adapters_import_no_other_adapter():
    graph = {mod: {t for t, _, _ in imports(tree) if t and t != mod} for mod, tree in modules().items()}
    crossing = [f"{a} imports {b}" for a, deps in graph.items() if a in ADAPTERS for b in deps if b in ADAPTERS]
    assert not crossing, crossing
    assert all("core" in graph[a] or a == "workers" for a in ADAPTERS), {a: graph[a] for a in ADAPTERS}

    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for mod in sorted(graph):
        if mod not in state:
            cycle = visit(mod, [mod])
            assert cycle is None, " -> ".join(cycle)


def test_functions_and_the_core_stay_small():
    long = []
    for mod, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert not long, long
    core = next(n for n in modules()["core"].body if isinstance(n, ast.ClassDef) and n.name == "DataPlane")
    assert core.end_lineno - core.lineno + 1 <= 350
