"""The package's shape, checked from its source (ast), beside the import contracts in pyproject.toml
([tool.importlinter], run by `make lint`: the floors, serve -> engines only, no import circle). Here: what
import-linter cannot say. No private name imported across modules; no function over 120 lines and no class over
350; one module reads ONNX files (the artifact contract); `import resdeploy` pulls in no heavy backend; and in
serve/, thin transport adapters that import the core and never each other. A change that breaks one fails here,
naming the module and the line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resdeploy"
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 350
SERVE_ADAPTERS = {"serve.rest", "serve.fastpath", "serve.grpc_native", "serve.grpc_aio", "serve.workers"}


def modules() -> dict[str, ast.Module]:
    """Module name inside resdeploy ("" for the package root, "serve.core", ...) -> its syntax tree."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix("__init__").rstrip(".")] = ast.parse(path.read_text(), str(path))
    return out


def imports(mod: str, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module inside resdeploy, imported names, line) for every import of ``mod``, nested ones too; relative
    imports resolved."""
    package = mod.split(".") if (PACKAGE / mod.replace(".", "/") / "__init__.py").is_file() else mod.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package[:len(package) - node.level + 1]
                base = ".".join(["resdeploy", *parts, *([base] if base else [])])
            if base == "resdeploy" or base.startswith("resdeploy."):
                found.append((base.removeprefix("resdeploy").lstrip("."), [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("resdeploy."), [], node.lineno) for a in node.names
                      if a.name.startswith("resdeploy.")]
    return found


def test_no_private_name_is_imported_across_modules():
    bad = [f"resdeploy.{mod}:{line} imports {name} from resdeploy.{target}" for mod, tree in modules().items()
           for target, names, line in imports(mod, tree) for name in names
           if name.startswith("_") and not name.startswith("__") and target != mod]
    assert not bad, bad


def test_functions_and_classes_stay_small():
    long = []
    for mod, tree in modules().items():
        for node in ast.walk(tree):
            n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION_LINES:
                long.append(f"resdeploy.{mod}.{node.name}:{node.lineno}: function of {n} lines (max {MAX_FUNCTION_LINES})")
            elif isinstance(node, ast.ClassDef) and n > MAX_CLASS_LINES:
                long.append(f"resdeploy.{mod}.{node.name}:{node.lineno}: class of {n} lines (max {MAX_CLASS_LINES})")
    assert not long, long


def test_only_the_artifact_contract_reads_onnx_files():
    """External data is untrusted input: one module (resdeploy/artifact.py) applies the policy when loading."""
    readers = {f"resdeploy.{mod}:{node.lineno}" for mod, tree in modules().items() if mod != "artifact"
               for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in ("load", "load_model", "load_from_string")
               and isinstance(node.func.value, ast.Name) and node.func.value.id == "onnx"}
    assert not readers, f"onnx.load outside resdeploy/artifact.py: {sorted(readers)}; use artifact.load_onnx"


def test_importing_resdeploy_pulls_in_no_heavy_backend():
    heavy = ("torch", "onnxruntime", "openvino", "tensorrt", "cuda", "pycuda")
    code = f"import sys, resdeploy; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import resdeploy` imports {out}: import optional backends inside the functions that use them"


def test_serve_adapters_import_the_core_and_never_each_other():
    graph = {mod: {t for t, _, _ in imports(mod, tree) if t and t != mod} for mod, tree in modules().items()}
    crossing = [f"resdeploy.{a} imports resdeploy.{b}" for a in SERVE_ADAPTERS for b in graph[a] if b in SERVE_ADAPTERS]
    assert not crossing, crossing
    assert all("serve.core" in graph[a] or a == "serve.workers" for a in SERVE_ADAPTERS), {a: graph[a] for a in SERVE_ADAPTERS}
