"""PyTorch front-end of the residual analysis: the residual adds a module's forward really performs.

The module is captured with ``torch.export`` (so the structure comes from what ``forward`` computes, not from
a hand-written list), reduced to the same :class:`~resdeploy.export.graph.DataGraph` as the ONNX side, and
analysed by the same rule. When the module declares its blocks (``residual_blocks()``, as every resdeploy
model does), the traced adds are cross-checked against the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resdeploy.errors import InputError
from resdeploy.export.graph import DataGraph, DNode, Merge, analyse

_CONV = {"conv2d", "convolution", "_convolution", "conv1d", "conv3d", "cudnn_convolution"}
_LINEAR = {"linear", "addmm", "mm", "matmul"}
_SEE_THROUGH = {"alias", "clone", "contiguous", "detach", "_to_copy", "to", "dropout", "identity", "lift_fresh_copy",
                "_assert_tensor_metadata"}
_CLASS = {"add": "add", "add_": "add", "sub": "sub", "mul": "mul", "div": "div", "maximum": "max", "minimum": "min",
          "slice": "slice", "pad": "pad", "constant_pad_nd": "pad", "cat": "concat", "relu": "relu", "relu_": "relu",
          "_native_batch_norm_legit_no_training": "bn", "batch_norm": "bn", "batch_norm_no_update": "bn"}


@dataclass(frozen=True)
class TorchResidualAdd:
    """One residual add of the PyTorch model, as its forward computes it."""

    block: str  # module path of the module whose forward does the add, e.g. "layer2.0"
    node: str  # FX node name of the add
    kind: str  # identity | projection | option_a | unknown
    shape: tuple[int, ...]  # (C, H, W) of the add's output
    fork: str  # FX node name of the block input (the tensor both operands start from)
    branch_input: str  # FX node name of the branch operand
    shortcut_input: str  # FX node name of the shortcut operand
    op: str = "add"
    branch_convs: int = 0
    shortcut_convs: int = 0
    position: tuple[int, int] = (-1, 0)  # (index of the residual add the fork follows, -1 = input; convs since)
    problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.block}: {self.kind} {'x'.join(map(str, self.shape))} (fork {self.fork}, node {self.node})"


@dataclass(frozen=True)
class TorchTrace:
    """What tracing a reference found: its residual merges, and how to replay it for numeric comparison."""

    adds: list[TorchResidualAdd]
    declared_problems: tuple[str, ...]  # disagreements between the trace and module.residual_blocks()
    program: Any  # torch.export.ExportedProgram
    relu_fed: frozenset[str] = frozenset()  # add nodes whose output only feeds a ReLU


def _aten_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))  # e.g. "conv2d.default"
    return name.split(".")[0]


def _capture(module: nn.Module, example: torch.Tensor) -> Any:
    try:
        return torch.export.export(module.eval(), (example,), strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure is an unusable reference
        raise InputError(f"could not trace the reference model with torch.export ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); give a model whose forward torch.export "
                         "can capture (no data-dependent Python control flow)") from None


def to_datagraph(program: Any) -> DataGraph:
    """Reduce an ExportedProgram's graph to a DataGraph (parameters and buffers are not data)."""
    sig = program.graph_signature
    user_inputs = set(sig.user_inputs)
    alias: dict[str, str] = {}
    const: set[str] = set()
    nodes: list[DNode] = []
    shapes: dict[str, tuple[object, ...] | None] = {}
    inputs: list[str] = []

    def resolve(t: str) -> str:
        while t in alias:
            t = alias[t]
        return t

    for n in program.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            shapes[n.name] = tuple(int(d) if isinstance(d, int) else str(d) for d in val.shape)
        if n.op == "placeholder":
            (inputs.append(n.name) if n.name in user_inputs else const.add(n.name))
            continue
        if n.op != "call_function":
            const.add(n.name)
            continue
        data = [a.name for a in n.all_input_nodes if a.name not in const]
        if not data:
            const.add(n.name)
            continue
        name = _aten_name(n.target)
        if name == "getitem" or name in _SEE_THROUGH or (
                name in ("view", "reshape", "_unsafe_view", "flatten") and shapes.get(n.name) == shapes.get(data[0])):
            if name == "getitem" and n.args[1] != 0:
                const.add(n.name)  # batch-norm's saved statistics, not the normalised tensor
                continue
            alias[n.name] = resolve(data[0])
            continue
        if name in _CONV:
            op = "conv"
        elif name in _LINEAR:
            op = "linear"
        else:
            op = _CLASS.get(name, "other")
        stack = n.meta.get("nn_module_stack") or {}
        scope = str(list(stack.values())[-1][0]) if stack else ""
        consts = tuple((k, float(a)) for k, a in enumerate(n.args[:2])
                       if isinstance(a, (int, float)) and not isinstance(a, bool))
        nodes.append(DNode(n.name, op, [resolve(d) for d in data], [n.name], False, scope, name, consts))
    return DataGraph(nodes, inputs, shapes)


def _trace(module: nn.Module, example: torch.Tensor) -> TorchTrace:
    program = _capture(module, example)
    graph = to_datagraph(program)
    scopes = {n.outputs[0]: n.scope for n in graph.nodes}
    from resdeploy.export.shortpath import other_short_path_nodes  # shortpath imports this module

    merges: list[Merge] = analyse(graph, other_short_path_nodes(graph))
    adds = [TorchResidualAdd(block=scopes.get(m.output, ""), node=m.output, kind=m.kind,
                             shape=tuple(int(d) for d in m.shape) if m.shape else (), fork=m.fork,
                             branch_input=m.branch, shortcut_input=m.shortcut, op=m.op, branch_convs=m.branch_convs,
                             shortcut_convs=m.shortcut_convs, position=m.position, problems=m.problems) for m in merges]
    problems: list[str] = []
    declared = getattr(module, "residual_blocks", None)
    if callable(declared):
        blocks = declared()
        traced = {a.block: a for a in adds if a.op == "add"}
        for b in blocks:
            got = traced.get(b.path)
            if got is None:
                problems.append(f"block {b.path} declares a {b.kind} shortcut, but its forward performs no residual add "
                                "(the `+ x` is missing); fix the block's forward")
            elif got.kind != b.kind:
                problems.append(f"block {b.path} declares a {b.kind} shortcut, but its forward adds a {got.kind} one "
                                f"(node {got.node}); fix the block or its shortcut_kind")
        names = {b.path for b in blocks}
        for a in adds:
            if a.block not in names:
                problems.append(f"module {a.block or '<root>'} performs a residual {a.op} (node {a.node}) that "
                                "residual_blocks() does not declare")
    return TorchTrace(adds, tuple(problems), program, frozenset(graph.relu_fed()))


def trace_residual_adds(module: nn.Module, example: torch.Tensor) -> list[TorchResidualAdd]:
    """The residual adds (and other residual merges) that ``module``'s forward performs on ``example``, in order."""
    return _trace(module, example).adds


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().cpu().numpy().copy()
        return out


def record_outputs(program: Any, x: torch.Tensor, names: set[str]) -> dict[str, Any]:
    """Run the traced program on ``x``; return the values of the FX nodes in ``names`` (numpy)."""
    gm = program.module()
    per_image: dict[str, list[Any]] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(len(x)):  # the trace is specialised to batch 1
            rec = _Recorder(gm, names)
            rec.run(x[i:i + 1])
            for n, v in rec.values.items():
                per_image[n].append(v)
    import numpy as np

    return {n: np.concatenate(v) for n, v in per_image.items() if v}
