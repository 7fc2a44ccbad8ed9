"""Exact rewrite of option-A shortcuts (strided Slice + channel zero-Pad) as one fixed strided 1x1 Conv.

The CIFAR ResNets' option-A shortcut subsamples the block input (``x[:, :, ::s, ::s]``) and zero-pads the
channels. ONNX Runtime's NCHWc transformer cannot absorb an Add whose operand comes out of Slice/Pad, and the
NCHW Add it leaves behind also keeps the next blocks' Adds out (measured: 6 of resnet20's 9 Adds standalone).
A 1x1 conv with stride s and a 0/1 weight (``W[front + c, c] = 1``) computes exactly the same values: each
output is one input times 1 plus exact zeros, so no rounding happens in any summation order. The skip-add check
classifies such a conv as an ``option_a`` shortcut (a fixed selection), so the rewritten graph still passes.

Only a chain the rewrite can prove is handled: Slices with constant starts 0, open ends and positive steps on
the spatial axes, then a constant-mode Pad with constant pads on the channel axis only (value 0). The result is
checked numerically (bit-exact) before it is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from resdeploy.errors import CheckFailed
from resdeploy.export.onnx_graph import replace_repeated

_BIG = 2**31 - 1  # Slice ends at or beyond this (INT64_MAX in exports) mean "to the end"


@dataclass(frozen=True)
class RewriteReport:
    rewritten: tuple[str, ...]  # Pad nodes replaced by a selection conv
    skipped: tuple[str, ...]  # "node: reason" for Pad nodes left as they were
    max_abs_diff: float | None  # rewritten vs original on a random batch (must be 0)

    def __bool__(self) -> bool:
        return self.max_abs_diff in (None, 0.0)

    def __str__(self) -> str:
        s = f"option-A rewrite: {len(self.rewritten)} shortcut(s) -> strided 1x1 selection conv"
        if self.max_abs_diff is not None:
            s += f", max |diff| vs original {self.max_abs_diff:g} (exact)" if self.max_abs_diff == 0 else \
                 f", max |diff| vs original {self.max_abs_diff:g} (NOT exact)"
        return s + "".join(f"\n  skipped {r}" for r in self.skipped)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self._cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of ``name`` when it is computed from constants only (small shape subgraphs are evaluated)."""
        if not name:
            return None
        if name in self._cache:
            return self._cache[name]
        value: np.ndarray | None = None
        if name in self.inits:
            value = numpy_helper.to_array(self.inits[name])
        elif name in self.producer and depth < 16:
            n = self.producer[name]
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        value = numpy_helper.to_array(a.t)
            elif n.op_type in ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Unsqueeze", "Squeeze"):
                ins = [self.const(i, depth + 1) if i else None for i in n.input]
                if all(v is not None or not i for v, i in zip(ins, n.input)):
                    value = _evaluate(n, ins, self.model)
        self._cache[name] = value
        return value


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], model: onnx.ModelProto) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    try:
        feeds = {i: v for i, v in zip(node.input, inputs) if i}
        ins = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for i, v in feeds.items()]
        out = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)
        g = helper.make_graph([node], "const", ins, [out])
        m = helper.make_model(g, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")])
        return np.asarray(ReferenceEvaluator(m).run(None, feeds)[0])
    except Exception:  # noqa: BLE001 - anything unexpected: not a constant we can prove
        return None


def _match(gr: _Graph, pad: onnx.NodeProto, rank_of: dict[str, int]) -> tuple[str, list[int], int, int, list[onnx.NodeProto]] | str:
    """(source tensor, strides [sh, sw], front, back, chain nodes) or the reason it does not match."""
    mode = next((onnx.helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant"):
        return f"Pad mode {mode!r} is not constant"
    if len(pad.input) > 2 and pad.input[2]:
        v = gr.const(pad.input[2])
        if v is None or np.any(v != 0):
            return "Pad value is not a constant 0"
    pads_attr = next((list(onnx.helper.get_attribute_value(a)) for a in pad.attribute if a.name == "pads"), None)
    pads = np.asarray(pads_attr) if pads_attr is not None else (gr.const(pad.input[1]) if len(pad.input) > 1 else None)
    if pads is None:
        return "pads are not constant"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = rank_of.get(pad.input[0], 4)
    if len(pad.input) > 3 and pad.input[3]:
        axes = gr.const(pad.input[3])
        if axes is None:
            return "Pad axes are not constant"
        full = [0] * (2 * rank)
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        for k, a in enumerate(axes):
            full[a], full[a + rank] = pads[k], pads[k + len(axes)]
        pads = full
    if rank != 4 or len(pads) != 8:
        return f"rank {rank} input; the rewrite handles NCHW only"
    if any(p != 0 for k, p in enumerate(pads) if k not in (1, 5)) or pads[1] < 0 or pads[5] < 0:
        return f"pads {pads} touch axes other than channels"
    front, back = pads[1], pads[5]
    strides = [1, 1]
    chain = [pad]
    t = pad.input[0]
    while t in gr.producer and gr.producer[t].op_type == "Slice":
        s = gr.producer[t]
        starts, ends = gr.const(s.input[1]), gr.const(s.input[2])
        axes = gr.const(s.input[3]) if len(s.input) > 3 and s.input[3] else np.arange(len(np.asarray(starts).reshape(-1)))
        steps = gr.const(s.input[4]) if len(s.input) > 4 and s.input[4] else np.ones_like(np.asarray(starts))
        if starts is None or ends is None or axes is None or steps is None:
            return f"Slice {s.name} has non-constant parameters"
        for st, en, ax, sp in zip(*(np.asarray(v).reshape(-1).tolist() for v in (starts, ends, axes, steps))):
            ax = int(ax) % 4
            if ax not in (2, 3) or st != 0 or sp <= 0 or en < _BIG:
                return f"Slice {s.name} is not a subsample from 0 to the end on H/W (axis {ax}, {st}:{en}:{sp})"
            strides[ax - 2] *= int(sp)
        if len(gr.consumers.get(t, [])) != 1 or t in gr.outputs:
            return f"Slice {s.name}'s output is used elsewhere"
        chain.append(s)
        t = s.input[0]
    return t, strides, front, back, chain


def rewrite_option_a(model: onnx.ModelProto, *, verify: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """A copy of ``model`` with every provable option-A shortcut as a strided 1x1 selection Conv.

    ``verify`` runs both graphs in ONNX Runtime (no optimisation) on a seeded random batch and raises
    CheckFailed unless the outputs are bit-identical.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception:  # noqa: BLE001
        inferred = out
    infos = {vi.name: vi for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    rank_of = {k: len(v.type.tensor_type.shape.dim) for k, v in infos.items() if v.type.tensor_type.HasField("shape")}
    gr = _Graph(out)
    done, skipped, remove = [], [], []
    replacements: dict[int, onnx.NodeProto] = {}
    for pad in [n for n in out.graph.node if n.op_type == "Pad"]:
        m = _match(gr, pad, rank_of)
        if isinstance(m, str):
            skipped.append(f"{pad.name}: {m}")
            continue
        src, strides, front, back, chain = m
        vi = infos.get(src)
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim] if vi else []
        elem = vi.type.tensor_type.elem_type if vi else onnx.TensorProto.FLOAT
        if len(dims) != 4 or not dims[1] or elem != onnx.TensorProto.FLOAT:
            skipped.append(f"{pad.name}: {src!r} is not a float32 NCHW tensor of known channels (rewrite the FP32 "
                           "export, then derive the FP16/INT8 variants from it)")
            continue
        cin = dims[1]
        w = np.zeros((front + cin + back, cin, 1, 1), np.float32)
        w[np.arange(cin) + front, np.arange(cin), 0, 0] = 1
        wname = f"{pad.name}/option_a_select"
        out.graph.initializer.append(numpy_helper.from_array(w, wname))
        conv = helper.make_node("Conv", [src, wname], [pad.output[0]], name=f"{pad.name}/option_a_conv",
                                kernel_shape=[1, 1], strides=strides, pads=[0, 0, 0, 0])
        replacements[id(pad)] = conv
        remove.extend(n for n in chain if n is not pad)
        done.append(pad.name)
    if not done:
        return out, RewriteReport((), tuple(skipped), None)
    removed = {id(n) for n in remove}
    nodes = []
    for n in out.graph.node:
        if id(n) in removed:
            continue
        nodes.append(replacements.get(id(n), n))
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del out.graph.node[:]
    out.graph.node.extend(copies)
    _drop_dead(out)
    diff = _verify(model, out) if verify else None
    report = RewriteReport(tuple(done), tuple(skipped), diff)
    if not report:
        raise CheckFailed(f"the option-A rewrite changed the output (max |diff| {diff:g}); it must be exact. "
                          "Build without --rewrite-option-a and report the graph")
    return out, report


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers no longer reachable from the graph outputs (the old pads' shape math)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    if len(keep) != len(g.node):
        replace_repeated(g.node, keep)
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        replace_repeated(g.initializer, inits)


def _verify(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    import onnxruntime as ort

    inits = {t.name for t in a.graph.initializer}
    inp = next(i for i in a.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else 2 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ya = ort.InferenceSession(a.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {inp.name: x})
    yb = ort.InferenceSession(b.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {inp.name: x})
    return max(float(np.max(np.abs(p.astype(np.float64) - q.astype(np.float64)))) for p, q in zip(ya, yb))
