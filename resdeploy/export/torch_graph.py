"""PyTorch front-end of the short-path engine: what a module's forward really computes, as a DataGraph.

The module is captured with ``torch.export`` (non-strict, eval mode), so the structure comes from what ``forward``
computes, not from a hand-written list; each node's module path comes from the exporter's ``nn_module_stack``.
:func:`record_values` replays the captured program on real input to read the values of chosen tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from resdeploy.errors import InputError
from resdeploy.export.graph import DataGraph, DNode

CONV_OPS = {"conv2d", "convolution", "_convolution", "conv1d", "conv3d", "cudnn_convolution"}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm"}
SEE_THROUGH = {"alias", "clone", "contiguous", "detach", "_to_copy", "to", "dropout", "identity", "lift_fresh_copy",
               "_assert_tensor_metadata", "feature_dropout", "alpha_dropout"}
RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze"}
OP_CLASS = {"add": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "div": "div", "maximum": "max", "minimum": "min",
            "slice": "slice", "pad": "pad", "constant_pad_nd": "pad", "cat": "concat", "concat": "concat", "relu": "relu",
            "_native_batch_norm_legit_no_training": "bn", "batch_norm": "bn", "batch_norm_no_update": "bn",
            "avg_pool2d": "pool", "max_pool2d": "pool", "max_pool2d_with_indices": "pool", "avg_pool1d": "pool",
            "max_pool1d": "pool", "avg_pool3d": "pool", "max_pool3d": "pool",
            "mean": "gpool", "amax": "gpool", "amin": "gpool", "sum": "gpool", "var": "gpool", "std": "gpool",
            "expand": "expand", "repeat": "expand", "upsample_nearest2d": "expand", "upsample_bilinear2d": "expand",
            "interpolate": "expand"}
ADAPTIVE_POOLS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool1d"}


def aten_name(target: Any) -> str:
    """``aten.add_.Tensor`` -> ``add``: the op's base name, in-place variants folded into their functional form."""
    name = getattr(target, "__name__", str(target)).split(".")[0]  # e.g. "conv2d.default" -> "conv2d"
    return name[:-1] if name.endswith("_") and not name.endswith("__") and len(name) > 1 else name


def capture(module: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` of ``module`` in eval mode on ``example``; InputError naming the cause when it cannot."""
    try:
        return torch.export.export(module.eval(), (example,), strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure is an unusable reference
        raise InputError(f"could not trace the reference model with torch.export ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); give a model whose forward torch.export "
                         "can capture (no data-dependent Python control flow)") from None


def _op_class(name: str, out_shape: tuple[object, ...] | None) -> str:
    if name in CONV_OPS:
        return "conv"
    if name in LINEAR_OPS:
        return "linear"
    if name in ADAPTIVE_POOLS:
        # Global when every pooled axis comes out as 1 (an SE squeeze); a fixed-size adaptive pool is a pool.
        return "gpool" if out_shape is not None and all(d == 1 for d in out_shape[2:]) else "pool"
    return OP_CLASS.get(name, "other")


def to_datagraph(program: Any) -> DataGraph:
    """Reduce an ExportedProgram's graph to a DataGraph (parameters and buffers are not data)."""
    user_inputs = set(program.graph_signature.user_inputs)
    alias: dict[str, str] = {}
    aliases: dict[str, tuple[str, str]] = {}
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
        data = [a.name for a in n.all_input_nodes if a.name not in const]
        if n.op != "call_function" or not data:
            const.add(n.name)
            continue
        name = aten_name(n.target)
        if name == "getitem" and n.args[1] != 0:
            const.add(n.name)  # batch-norm's saved statistics, max-pool's indices: not the data output
            continue
        if name == "getitem" or name in SEE_THROUGH or (name in RESHAPES and shapes.get(n.name) == shapes.get(data[0])):
            alias[n.name] = resolve(data[0])
            aliases[n.name] = (alias[n.name], name)
            continue
        stack = n.meta.get("nn_module_stack") or {}
        scope = str(list(stack.values())[-1][0]) if stack else ""
        consts = tuple((k, float(a)) for k, a in enumerate(n.args[:2])
                       if isinstance(a, (int, float)) and not isinstance(a, bool))
        nodes.append(DNode(n.name, _op_class(name, shapes.get(n.name)), [resolve(d) for d in data], [n.name], False,
                           scope, name, consts))
    return DataGraph(nodes, inputs, shapes, aliases)


class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule and keeps a copy of the first tensor value seen for each wanted name."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: dict[str, str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        key = self.wanted.get(n.name)
        if key is not None and key not in self.values and isinstance(out, torch.Tensor):
            self.values[key] = out.detach().cpu().numpy().copy()
        return out


def record_values(program: Any, graph: DataGraph, x: torch.Tensor, tensors: set[str]) -> dict[str, np.ndarray]:
    """Run the captured program on ``x`` image by image (the capture is specialised to batch 1) and return the
    values of the DataGraph tensors in ``tensors`` (read under an alias when the node itself makes a tuple)."""
    wanted = {name: t for t in tensors for name in reversed(graph.readable_as(t))}
    gm = program.module()
    per_image: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    with torch.no_grad():
        for i in range(len(x)):
            rec = _Recorder(gm, wanted)
            rec.run(x[i:i + 1])
            for t, v in rec.values.items():
                per_image[t].append(v)
    return {t: np.concatenate(v) for t, v in per_image.items() if len(v) == len(x)}
