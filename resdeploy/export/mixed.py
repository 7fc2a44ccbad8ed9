"""What accuracy-driven INT8 needs from an FP32 ONNX graph: per-channel activation ranges, the regions (residual
blocks, stem, head) whose nodes can be kept out of INT8 together, and SmoothQuant-style scaling.

* :func:`activation_ranges` runs the FP32 graph on calibration images with intermediate tensors exposed and keeps
  each tensor's per-channel min/max (the numbers that decide a per-tensor activation scale).
* :func:`regions` splits the graph into the ``stem`` (before the first residual block), one region per residual
  block (the nodes between the block's fork and its Add, both branches, the Add itself), and the ``head`` (after
  the last block: pooling + classifier). Keeping a region in float excludes exactly these nodes, so a kept
  block's Add is float and every other residual Add stays INT8 with both inputs quantized (fusable).
* :func:`smooth_activations` moves per-channel activation range into the weights, exactly in float:
  for ``Conv1 -> Relu -> Conv2`` where Conv2 (or several convs) are the only consumers, channel ``c`` of
  Conv1's output is divided by ``s_c`` (weights and bias; ReLU commutes with a positive scale) and Conv2's
  input channel ``c`` is multiplied by ``s_c``, with ``s_c = a_c**alpha / w_c**(1 - alpha)`` (SmoothQuant,
  Xiao et al. 2022), normalised so the tensor's overall range is unchanged. Per-channel INT8 weights absorb the
  scale on Conv1's side; a per-tensor activation scale then serves every channel alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from resdeploy.errors import InputError
from resdeploy.export.onnx_graph import expose_outputs, topo_nodes


# -- activation ranges --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelRange:
    """Per-channel min/max of one tensor over the calibration images (channel axis 1)."""

    tensor: str
    low: np.ndarray  # (C,)
    high: np.ndarray  # (C,)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))

    def outlier_ratio(self) -> float:
        """Largest channel range over the median channel range: how many of uint8's 255 steps a typical channel
        gets is 255 / this ratio (for a per-tensor scale)."""
        span = self.high - self.low
        med = float(np.median(span[span > 0])) if np.any(span > 0) else 0.0
        return float(span.max() / med) if med > 0 else float("inf") if span.max() > 0 else 1.0


def activation_ranges(model: onnx.ModelProto, images: np.ndarray, tensors: Sequence[str] | None = None, *,
                      batch_size: int = 32, threads: int | None = None) -> dict[str, ChannelRange]:
    """Per-channel min/max of ``tensors`` (default: every Conv/Relu/Add/Gemm output and Add input) on ``images``.

    ``model`` is an FP32 ModelProto with its weights loaded; ``images`` are normalised NCHW float32."""
    import onnxruntime as ort

    if tensors is None:
        wanted: list[str] = []
        for n in model.graph.node:
            if n.op_type in ("Conv", "Relu", "Add", "Gemm", "MaxPool", "GlobalAveragePool"):
                wanted.extend(o for o in n.output if o)
            if n.op_type == "Add":
                wanted.extend(i for i in n.input if i)
        tensors = list(dict.fromkeys(wanted))
    inits = {t.name for t in model.graph.initializer}
    tensors = [t for t in tensors if t not in inits]
    m = expose_outputs(model, tensors)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own tensors
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs() if o.name in set(tensors)]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for i in range(0, len(images), batch_size):
        outs = sess.run(names, {feed: np.ascontiguousarray(images[i:i + batch_size], np.float32)})
        for name, v in zip(names, outs):
            v = np.asarray(v)
            if v.ndim < 2:
                continue
            axes = tuple(a for a in range(v.ndim) if a != 1)
            a, b = v.min(axis=axes), v.max(axis=axes)
            lo[name] = a if name not in lo else np.minimum(lo[name], a)
            hi[name] = b if name not in hi else np.maximum(hi[name], b)
    return {n: ChannelRange(n, lo[n], hi[n]) for n in names if n in lo}


# -- regions ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """Nodes that are kept out of INT8 together: a residual block, the stem or the head."""

    name: str  # block module path (e.g. layer3.1), "stem" or "head"
    kind: str  # block | stem | head
    nodes: tuple[str, ...]  # ONNX node names, graph order
    add: str = ""  # the block's residual Add node ("" for stem/head)
    output: str = ""  # the tensor the region ends in (the Add output; the graph output for the head)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def regions(model: onnx.ModelProto) -> list[Region]:
    """Stem, residual blocks (graph order) and head of an FP32 graph; empty when it has no residual Adds."""
    from resdeploy.export.skipadd import find_residual_adds

    nodes = topo_nodes(model.graph)
    producer = {o: n for n in nodes for o in n.output}
    order = {n.name: i for i, n in enumerate(nodes)}
    adds = find_residual_adds(model)
    if not adds:
        return []

    def ancestors(tensor: str, stop: str) -> set[str]:
        seen: set[str] = set()
        todo = [tensor]
        while todo:
            t = todo.pop()
            if t == stop:
                continue
            n = producer.get(t)
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            todo.extend(i for i in n.input if i)
        return seen

    out: list[Region] = []
    taken: set[str] = set()
    for k, a in enumerate(adds):
        names = ancestors(a.output, a.fork) - taken
        # Data nodes only: constants (shape helpers) shared with other blocks stay where they are.
        names = {x for x in names if nodes[order[x]].op_type not in ("Constant", "Shape")}
        # the activation right after the Add (Add -> Relu) is the block's too: it is its output
        after = [n.name for n in nodes if n.op_type == "Relu" and a.output in n.input]
        names |= set(after) - taken
        block = a.block or f"block{k}"
        if k == 0:
            stem = ancestors(a.fork, "") - names
            out.append(Region("stem", "stem", tuple(sorted(stem, key=order.__getitem__))))
            taken |= stem
        out.append(Region(block, "block", tuple(sorted(names, key=order.__getitem__)), a.node, a.output))
        taken |= names
    rest = [n.name for n in nodes if n.name not in taken and n.op_type not in ("Constant", "Shape")]
    graph_out = model.graph.output[0].name if model.graph.output else ""
    out.append(Region("head", "head", tuple(rest), "", graph_out))
    return out


def quantizable_nodes(model: onnx.ModelProto, region: Region) -> tuple[str, ...]:
    """The nodes of ``region`` that ONNX Runtime's quantizer would quantize (what ``nodes_to_exclude`` needs)."""
    by_name = {n.name: n for n in model.graph.node}
    ops = {"Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "GlobalAveragePool", "AveragePool", "Flatten",
           "Reshape", "Concat", "Mul", "Pad", "Slice", "Resize", "Transpose", "Squeeze", "Unsqueeze"}
    return tuple(n for n in region.nodes if n in by_name and by_name[n].op_type in ops)


# -- SmoothQuant-style scaling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SmoothPair:
    producer: str  # Conv whose output channels are divided by s
    consumers: tuple[str, ...]  # Convs whose input channels are multiplied by s
    tensor: str  # the activation that gets even
    outlier_before: float  # ChannelRange.outlier_ratio before
    outlier_after: float  # the same, predicted from the scaled ranges


@dataclass(frozen=True)
class SmoothReport:
    alpha: float
    pairs: tuple[SmoothPair, ...]
    skipped: tuple[str, ...] = field(default_factory=tuple)  # why some activations could not be scaled

    def __str__(self) -> str:
        if not self.pairs:
            return f"smoothquant alpha {self.alpha:g}: nothing to scale"
        worst = max(self.pairs, key=lambda p: p.outlier_before)
        return (f"smoothquant alpha {self.alpha:g}: {len(self.pairs)} activations scaled into the next conv's weights "
                f"(worst channel-range ratio {worst.outlier_before:.1f} -> {worst.outlier_after:.1f} at {worst.tensor})")


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def smooth_activations(model: onnx.ModelProto, ranges: dict[str, ChannelRange], *, alpha: float = 0.5,
                       max_scale: float = 100.0, only: Iterable[str] | None = None) -> tuple[onnx.ModelProto, SmoothReport]:
    """A copy of ``model`` (FP32, weights loaded, each conv with its own initializers) with SmoothQuant scaling
    applied to every ``Conv -> Relu -> Conv(s)`` activation it can be applied to exactly; ``only``: just these
    activation tensors. ``ranges`` from :func:`activation_ranges` on the FP32 model."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"smoothquant alpha {alpha} must lie in [0, 1] (0.5 is SmoothQuant's default)")
    from resdeploy.export.precision import inline_constant_identities

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inline_constant_identities(out)  # each conv's own bias initializer (the exporter shares equal ones)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    graph_outputs = {o.name for o in g.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input[1:]:
            uses[i] = uses.get(i, 0) + 1
    wanted = set(only) if only is not None else None
    pairs: list[SmoothPair] = []
    skipped: list[str] = []
    for relu in list(g.node):
        if relu.op_type != "Relu":
            continue
        act = relu.output[0]
        if wanted is not None and act not in wanted:
            continue
        conv1 = producer.get(relu.input[0])
        users = consumers.get(act, [])
        if conv1 is None or conv1.op_type != "Conv" or len(consumers.get(relu.input[0], [])) != 1:
            continue  # the block output (Add -> Relu) or a shared pre-activation: not exactly scalable here
        if not users or act in graph_outputs or any(u.op_type != "Conv" or u.input[0] != act for u in users):
            continue
        r = ranges.get(act)
        w1 = _init(out, conv1.input[1])
        b1 = _init(out, conv1.input[2]) if len(conv1.input) > 2 and conv1.input[2] else None
        w2s = [_init(out, u.input[1]) for u in users]
        if len(conv1.input) > 2 and conv1.input[2] and b1 is None:
            skipped.append(f"{act}: {conv1.name}'s bias is not an initializer")
            continue
        if r is None or w1 is None or any(w is None for w in w2s):
            skipped.append(f"{act}: no range or weights not initializers")
            continue
        if uses.get(conv1.input[1], 0) > 1 or (b1 is not None and uses.get(b1.name, 0) > 1) or any(uses.get(w.name, 0) > 1 for w in w2s):
            skipped.append(f"{act}: weights shared with another node")
            continue
        if any(int(u_attr.i) != 1 for u in users for u_attr in u.attribute if u_attr.name == "group"):
            skipped.append(f"{act}: grouped conv")
            continue
        a = np.maximum(r.absmax.astype(np.float64), 1e-8)
        W2 = [numpy_helper.to_array(w).astype(np.float64) for w in w2s]
        wmax = np.maximum(np.max([np.abs(w).max(axis=(0, 2, 3)) for w in W2], axis=0), 1e-8)
        s = a ** alpha / wmax ** (1.0 - alpha)
        s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: weights and activations keep their overall size
        s = np.clip(s, 1.0 / max_scale, max_scale)
        live = r.absmax > 0
        s = np.where(live, s, 1.0)  # a dead channel (always 0 after the ReLU) stays as it is
        before = r.outlier_ratio()
        after = ChannelRange(act, r.low / s, r.high / s).outlier_ratio()
        if after >= before:
            continue
        W1 = numpy_helper.to_array(w1).astype(np.float64)
        w1.CopyFrom(numpy_helper.from_array((W1 / s.reshape(-1, 1, 1, 1)).astype(np.float32), w1.name))
        if b1 is not None:
            B1 = numpy_helper.to_array(b1).astype(np.float64)
            b1.CopyFrom(numpy_helper.from_array((B1 / s).astype(np.float32), b1.name))
        for w, arr in zip(w2s, W2):
            w.CopyFrom(numpy_helper.from_array((arr * s.reshape(1, -1, 1, 1)).astype(np.float32), w.name))
        pairs.append(SmoothPair(conv1.name, tuple(u.name for u in users), act, before, after))
    return out, SmoothReport(alpha, tuple(pairs), tuple(skipped))
