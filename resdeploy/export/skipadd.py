"""The skip-add check: are the residual adds of an ONNX graph the ones the PyTorch model performs?

Three layers, each usable alone:

* :func:`find_residual_adds` - the residual Adds of an ONNX graph with fork, shortcut kind and shape
  (the rule is in :mod:`resdeploy.export.graph`; it sees through Identity/Cast/Q/DQ and no-op reshapes).
* :func:`trace_residual_adds` - the same facts from the PyTorch model via ``torch.export``.
* :func:`check_skip_adds` - validates each Add; with a reference, aligns ONNX adds to the model's adds in
  topological order (count, order, kinds, shapes, fork positions); with a sample as well, exposes each
  Add's output in a temporary copy of the graph, runs it in ONNX Runtime (CPU, no graph optimisation) and
  compares it with the PyTorch add on the same input, reporting the first block that diverges.

Alignment: an edit-distance alignment of the two ordered lists, where a pair costs 0 when every structural
fact agrees and 1 otherwise, and a missing or extra add costs 1. Ties go to pairing (so a removed skip is
reported at its own block, and the next block is reported as forking from the wrong place).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resdeploy.artifact import check_external_data, load_onnx  # the one loader, with its external-data policy
from resdeploy.errors import CheckFailed, InputError
from resdeploy.export import onnx_graph
from resdeploy.export.graph import Merge, analyse
from resdeploy.export.torch_structure import TorchResidualAdd, TorchTrace, _trace, record_outputs, trace_residual_adds

__all__ = ["Defect", "ResidualAdd", "SkipAddReport", "SkipAddRow", "check_skip_adds", "find_residual_adds",
           "check_external_data", "load_onnx", "trace_residual_adds"]

ADD_OPS = ("Add", "Sum", "QLinearAdd")
FLOAT_RTOL = 1e-3  # max |onnx - torch| / max |torch| per add; FP32 kernels differ by ~1e-6
QUANT_MIN_COSINE = 0.9  # Q/DQ graphs round every tensor; a real defect drops far below this


@dataclass(frozen=True)
class ResidualAdd:
    """One residual merge of an ONNX graph."""

    node: str  # ONNX node name
    output: str  # the Add's output tensor
    branch_input: str  # operand coming through the conv branch
    shortcut_input: str  # operand coming through the shortcut
    fork: str  # the block input: latest tensor both operands start from
    kind: str  # identity | projection | option_a | unknown
    shape: tuple[object, ...] | None  # (C, H, W) of the output (batch left out); None if unknown
    block: str = ""  # module path: from the reference when given, else the exporter's scope hint ("" if none)
    op: str = "Add"  # the ONNX op (a Sub/Mul in an add's place is reported, never accepted)
    branch_convs: int = 0
    shortcut_convs: int = 0
    fork_after: str = "input"  # ONNX node of the residual merge the fork follows, or "input"
    convs_before_fork: int = 0  # convs between that merge (or the input) and the fork
    problems: tuple[str, ...] = ()

    @property
    def well_formed(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        return f"{self.node}: {self.kind} {_shape(self.shape)} fork {self.fork}" + (f" [{self.block}]" if self.block else "")


@dataclass(frozen=True)
class Defect:
    block: str  # module path ("" when no reference is given and the exporter left no scope)
    node: str  # ONNX node ("" when the ONNX graph lacks it)
    message: str

    def __str__(self) -> str:
        return f"block {self.block or '?'} (ONNX node {self.node or '-'}): {self.message}"


@dataclass(frozen=True)
class SkipAddRow:
    block: str
    node: str
    kind: str
    shape: str
    fork: str
    status: str  # ok | defect | missing | extra | diverged
    max_abs_err: float | None = None
    rel_err: float | None = None
    cosine: float | None = None


@dataclass(frozen=True)
class SkipAddReport:
    model: str
    rows: tuple[SkipAddRow, ...]
    defects: tuple[Defect, ...]
    adds: tuple[ResidualAdd, ...]
    reference: bool  # a PyTorch reference was compared
    numeric: bool  # add outputs were compared on real input
    first_divergent: str | None = None  # block whose Add output first differs numerically
    quantized: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return not self.defects

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "passed": bool(self), "reference": self.reference, "numeric": self.numeric,
            "quantized": self.quantized, "residual_adds": sum(1 for a in self.adds if a.op in ADD_OPS),
            "first_divergent": self.first_divergent,
            "rows": [dict(r.__dict__) for r in self.rows],
            "defects": [{"block": d.block, "node": d.node, "message": d.message} for d in self.defects],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        head = (f"{'#':>3}  {'block':<14} {'ONNX node':<22} {'shortcut':<10} {'shape':<13} {'fork':<18} "
                f"{'status':<9} {'max abs':>9} {'rel':>9}")
        lines = [f"skip-add check of {self.model}: {sum(1 for a in self.adds if a.op in ADD_OPS)} residual adds"
                 + (" vs PyTorch reference" if self.reference else " (no reference: well-formedness only)")
                 + (" + numeric localisation" if self.numeric else ""), head]
        for i, r in enumerate(self.rows):
            err = f"{r.max_abs_err:9.2e} {r.rel_err:9.2e}" if r.max_abs_err is not None and r.rel_err is not None else f"{'-':>9} {'-':>9}"
            lines.append(f"{i:>3}  {r.block[:14]:<14} {r.node[:22]:<22} {r.kind:<10} {r.shape:<13} {r.fork[:18]:<18} "
                         f"{r.status:<9} {err}")
        lines += [f"note: {n}" for n in self.notes]
        if self.first_divergent:
            lines.append(f"first block whose Add output diverges numerically: {self.first_divergent}")
        lines.append("PASSED" if self else f"FAILED: {len(self.defects)} defect(s)")
        lines += [f"  - {d}" for d in self.defects]
        return "\n".join(lines)


def _shape(s: tuple[object, ...] | None) -> str:
    return "x".join("?" if d is None else str(d) for d in s) if s else "?"


def _analyse_onnx(model: onnx.ModelProto) -> tuple[list[Merge], list[ResidualAdd]]:
    merges, adds, _, _ = _analyse_onnx_graph(model)
    return merges, adds


def _analyse_onnx_graph(model: onnx.ModelProto) -> tuple[list[Merge], list[ResidualAdd], set[str], dict[str, str]]:
    """Also returns the tensors fed only to ReLUs, and per merge output the tensor its consumers read (the
    DequantizeLinear after it in a Q/DQ graph, where the quantizer may have folded the ReLU into the Q)."""
    from resdeploy.export.shortpath import other_short_path_nodes  # imported here: shortpath builds on this module

    dg, _ = onnx_graph.to_datagraph(model)
    merges = analyse(dg, other_short_path_nodes(dg))
    names = {n.outputs[0]: n for n in dg.nodes}
    adds = []
    for m in merges:
        dn = names[m.output]
        anchor = names[merges[m.position[0]].output].name if m.position[0] >= 0 else "input"
        adds.append(ResidualAdd(dn.name, m.output, m.branch, m.shortcut, m.fork, m.kind, m.shape, dn.scope,
                                dn.raw_op, m.branch_convs, m.shortcut_convs, anchor, m.position[1], m.problems))
    seen_as: dict[str, str] = {}
    for t, (canonical, op) in dg.aliases.items():
        if op == "DequantizeLinear":
            seen_as[canonical] = t
    return merges, adds, dg.relu_fed(), seen_as


def find_residual_adds(model: onnx.ModelProto, *, include_other_merges: bool = False) -> list[ResidualAdd]:
    """The residual Adds of ``model`` in topological order. ``include_other_merges`` also returns Sub/Mul/...
    nodes that merge a branch with its skip (defects, never valid residuals)."""
    _, adds = _analyse_onnx(model)
    return [a for a in adds if include_other_merges or a.op in ADD_OPS]


def _key(op: str, kind: str, bc: int, sc: int, conv_pos: int, ok: bool) -> tuple:
    return (op, kind, bc, sc, conv_pos, ok)


def _shape_matches(onnx_shape: tuple[object, ...] | None, torch_shape: tuple[int, ...]) -> bool:
    """ONNX dims the file leaves unknown (None) match anything; named dims cannot occur past the batch axis."""
    if onnx_shape is None:
        return True
    return len(onnx_shape) == len(torch_shape) and all(d is None or d == t for d, t in zip(onnx_shape, torch_shape))


def _align(o_keys: list[tuple], t_keys: list[tuple], o_shapes: list, t_shapes: list) -> list[tuple[int | None, int | None]]:
    def cost(i: int, j: int) -> int:
        return 0 if o_keys[i] == t_keys[j] and _shape_matches(o_shapes[i], t_shapes[j]) else 1

    return align_by(cost, len(o_keys), len(t_keys))


def align_by(cost: Any, n: int, m: int) -> list[tuple[int | None, int | None]]:
    """Edit-distance alignment of two ordered lists of lengths ``n`` and ``m``: ``cost(i, j)`` for pairing (0 when
    every structural fact agrees), 1 for a missing or extra item; ties go to pairing (module docstring)."""
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        d[i][0] = i
    for j in range(1, m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j - 1] + cost(i - 1, j - 1), d[i - 1][j] + 1, d[i][j - 1] + 1)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i][j] == d[i - 1][j - 1] + cost(i - 1, j - 1):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif j > 0 and d[i][j] == d[i][j - 1] + 1:
            pairs.append((None, j - 1))
            j -= 1
        else:
            pairs.append((i - 1, None))
            i -= 1
    return pairs[::-1]


def _is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "QLinearConv", "QLinearAdd", "ConvInteger", "DynamicQuantizeLinear")
               for n in model.graph.node)


def _onnx_values(model: onnx.ModelProto, path: Path | None, outputs: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Run a temporary copy of ``model`` with ``outputs`` exposed as graph outputs; ORT graph optimisation off so
    the values are those of the graph as written."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        if path is not None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
            # External weights are resolved relative to the model's folder: write the copy beside it.
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=".onnx", dir=path.parent, delete=True) as tmp:
                onnx.save(m, tmp.name)
                sess = ort.InferenceSession(tmp.name, so, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot load the model for numeric localisation ({exc}); check it with "
                         "`onnx.checker` or drop --reference sample data") from None
    feed_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    want = [n for n in names if n in set(outputs)]
    vals: dict[str, list[np.ndarray]] = {n: [] for n in want}
    static_batch = isinstance(sess.get_inputs()[0].shape[0], int)
    batches = [x[i:i + 1] for i in range(len(x))] if static_batch else [x]
    for xb in batches:
        try:
            res = sess.run(want, {feed_name: xb.astype(np.float32)})
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"ONNX Runtime cannot run the model on the sample images of shape {xb.shape} ({exc}); "
                             "give images shaped and normalised as the model's input") from None
        for n, v in zip(want, res):
            vals[n].append(v)
    return {n: np.concatenate(v) for n, v in vals.items()}


# Where each QOperator-format op (com.microsoft) takes its output scale and zero point: its output is integers.
QLINEAR_OUTPUT_SCALE = {"QLinearAdd": 6, "QLinearMul": 6, "QLinearConv": 6, "QLinearMatMul": 6, "QLinearConcat": 0,
                        "QLinearSigmoid": 3, "QLinearLeakyRelu": 3, "QLinearAveragePool": 3,
                        "QLinearGlobalAveragePool": 3}


def _dequantize_qlinear_output(model: onnx.ModelProto, output: str, q: np.ndarray) -> np.ndarray:
    """A QLinear op writes integers; its output scale/zero point (see QLINEAR_OUTPUT_SCALE) give them back as floats."""
    from onnx import numpy_helper

    node = next(n for n in model.graph.node if output in n.output)
    k = QLINEAR_OUTPUT_SCALE.get(node.op_type)
    if k is None:
        raise InputError(f"node {node.name or node.op_type!r} ({node.op_type}) writes quantized integers with no known "
                         "output scale; add the op to resdeploy.export.skipadd.QLINEAR_OUTPUT_SCALE")
    inits = {t.name: t for t in model.graph.initializer}
    scale = numpy_helper.to_array(inits[node.input[k]]).astype(np.float32) if node.input[k] in inits else np.float32(1)
    zp = (numpy_helper.to_array(inits[node.input[k + 1]]).astype(np.float32)
          if len(node.input) > k + 1 and node.input[k + 1] in inits else 0)
    return (q.astype(np.float32) - zp) * scale


def _errors(o: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    o, t = o.astype(np.float64).ravel(), t.astype(np.float64).ravel()
    diff = float(np.abs(o - t).max()) if o.size else 0.0
    rel = diff / max(float(np.abs(t).max()), 1e-12)
    cos = float(o @ t / max(np.linalg.norm(o) * np.linalg.norm(t), 1e-30))
    return diff, rel, cos


def check_skip_adds(
    model: onnx.ModelProto | str | Path,
    reference: Any | None = None,
    sample: np.ndarray | None = None,
    *,
    max_images: int = 4,
) -> SkipAddReport:
    """Check the residual adds of ``model``; against ``reference`` (an nn.Module) when given, numerically on
    ``sample`` (N,C,H,W float32, already normalised) when both are given. Never raises for defects: read the
    report (``bool(report)`` is pass/fail); raises InputError for unreadable input."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    proto = load_onnx(path) if path is not None else model
    label = str(path) if path is not None else (proto.graph.name or "<ModelProto>")
    merges, adds, onnx_relu_fed, seen_as = _analyse_onnx_graph(proto)
    quantized = _is_quantized(proto)
    defects: list[Defect] = []
    rows: list[SkipAddRow] = []
    notes: list[str] = []
    if reference is None:
        for a in adds:
            for p in a.problems:
                defects.append(Defect(a.block, a.node, p))
            rows.append(SkipAddRow(a.block, a.node, a.kind, _shape(a.shape), a.fork, "ok" if a.well_formed else "defect"))
        if not adds:
            notes.append("no residual adds found (a plain network, or every skip is missing)")
        return SkipAddReport(label, tuple(rows), tuple(defects), tuple(adds), False, False, None, quantized, tuple(notes))

    import torch

    in_shape = _input_shape(proto)
    if sample is not None:
        sample = np.asarray(sample, np.float32)[:max_images]
        if sample.ndim != 4:
            raise InputError(f"sample has shape {sample.shape}; give (N, C, H, W) images normalised as the model expects")
        example = torch.from_numpy(sample[:1].copy())
    else:
        if in_shape is None:
            raise InputError("the ONNX input has no static (C, H, W); give sample images to trace the reference with")
        example = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *in_shape)).astype(np.float32))
    trace: TorchTrace = _trace(reference, example)
    tadds = trace.adds
    for p in trace.declared_problems:
        block = p.split()[1] if p.startswith("block ") else ""
        defects.append(Defect(block, "", f"reference model: {p}"))

    o_keys = [_key("Add" if a.op in ("Sum", "QLinearAdd") else a.op, a.kind, a.branch_convs, a.shortcut_convs, a.convs_before_fork, a.well_formed) for a in adds]
    t_keys = [_key("Add" if t.op == "add" else t.op.capitalize(), t.kind, t.branch_convs, t.shortcut_convs, t.position[1], not t.problems) for t in tadds]
    pairs = _align(o_keys, t_keys, [a.shape for a in adds], [t.shape for t in tadds])
    o2t = {i: j for i, j in pairs if i is not None and j is not None}
    tblocks = [t.block for t in tadds]

    status: dict[int, str] = {}
    for k, (i, j) in enumerate(pairs):
        if i is None:
            t = tadds[j]
            prev_node, next_node = matched_neighbours(pairs, k, [a.node for a in adds])
            defects.append(Defect(t.block, "", f"no residual Add in the ONNX graph for this block: expected a {t.kind} "
                                  f"skip adding {_shape(t.shape)} after {prev_node} and before {next_node}; found none "
                                  "(skip removed, or the Add replaced by another op)"))
            status[k] = "missing"
            continue
        a = adds[i]
        if j is None:
            blk = block_near(pairs, k, tblocks)
            defects.append(Defect(blk, a.node, f"extra {a.op} (fork {a.fork}, {a.kind} shortcut, {_shape(a.shape)}) that the "
                                  f"reference does not have, in or next to block {blk or '?'}"))
            status[k] = "extra"
            continue
        t = tadds[j]
        found: list[str] = []
        if a.op not in ADD_OPS:
            found.append(f"the residual merge is a {a.op}; expected an Add")
        if a.kind != t.kind:
            found.append(f"shortcut kind is {a.kind}; expected {t.kind}")
        if not _shape_matches(a.shape, t.shape):
            found.append(f"output shape is {_shape(a.shape)}; expected {_shape(t.shape)}")
        if a.branch_convs != t.branch_convs:
            found.append(f"branch holds {a.branch_convs} convs; expected {t.branch_convs}")
        if a.shortcut_convs != t.shortcut_convs:
            found.append(f"shortcut holds {a.shortcut_convs} convs; expected {t.shortcut_convs}")
        o_anchor = merges[i].position[0]
        mapped = -1 if o_anchor < 0 else o2t.get(o_anchor, -2)
        if mapped != t.position[0] or a.convs_before_fork != t.position[1]:
            found.append(f"skip taken from {a.fork} ({_where(a.convs_before_fork, mapped, tadds, a.fork_after)}); "
                         f"expected the block input ({_where(t.position[1], t.position[0], tadds, None)})")
        for p in a.problems:
            if not any(p.split(";")[0] in f for f in found):
                found.append(p)
        for f in found:
            defects.append(Defect(t.block, a.node, f))
        status[k] = "defect" if found else "ok"

    first_div: str | None = None
    errs: dict[int, tuple[float, float, float]] = {}
    if sample is not None:
        matched = [(k, i, j) for k, (i, j) in enumerate(pairs) if i is not None and j is not None]
        exposed = {adds[i].output: seen_as.get(adds[i].output, adds[i].output) for _, i, _ in matched}
        ovals = _onnx_values(proto, path, [v for v in exposed.values() if onnx_graph.FUSED_MARK not in v], sample)
        ovals = {k: ovals[v] for k, v in exposed.items() if v in ovals}
        tvals = record_outputs(trace.program, torch.from_numpy(sample.copy()), {tadds[j].node for _, _, j in matched})
        for k, i, j in matched:
            o, t = ovals.get(adds[i].output), tvals.get(tadds[j].node)
            if o is not None and adds[i].op in QLINEAR_OUTPUT_SCALE:
                o = _dequantize_qlinear_output(proto, adds[i].output, o)
            if t is not None and tadds[j].node in trace.relu_fed and adds[i].output not in onnx_relu_fed:
                # The ReLU after the add was fused into it (e.g. a quantizer's QLinearAdd clamps at its zero
                # point): compare with the ReLU'd reference.
                t = np.maximum(t, 0)
            if o is None or t is None or o.shape != t.shape:
                continue
            errs[k] = _errors(o, t)
            diff, rel, cos = errs[k]
            bad = cos < QUANT_MIN_COSINE if quantized else rel > FLOAT_RTOL
            if bad and status[k] == "ok" and first_div is not None:
                status[k] = "diverged"  # downstream of the first divergence: a consequence, not a new defect
            if bad and first_div is None:
                first_div = tadds[j].block
                if status[k] == "ok":
                    status[k] = "diverged"
                    crit = f"cosine {cos:.4f} < {QUANT_MIN_COSINE}" if quantized else f"rel err {rel:.2e} > {FLOAT_RTOL:.0e}"
                    defects.append(Defect(tadds[j].block, adds[i].node,
                                          f"Add output differs from PyTorch on real input: max abs err {diff:.3g}, {crit} "
                                          "(first diverging block; the structure matches, so look at this block's "
                                          "weights or shortcut operands)"))
        if quantized:
            notes.append(f"Q/DQ graph: numeric divergence judged by cosine similarity >= {QUANT_MIN_COSINE}")
    for k, (i, j) in enumerate(pairs):
        a = adds[i] if i is not None else None
        t = tadds[j] if j is not None else None
        e = errs.get(k)
        rows.append(SkipAddRow(t.block if t else block_near(pairs, k, tblocks), a.node if a else "-", (a or t).kind,
                               _shape(a.shape if a else t.shape), a.fork if a else "-", status[k],
                               e[0] if e else None, e[1] if e else None, e[2] if e else None))
    # Order defects by where they sit in the network so the first one is the first broken block.
    order = {t.block: n for n, t in enumerate(tadds)}
    defects.sort(key=lambda d: order.get(d.block, -1 if d.message.startswith("reference model") else len(order)))
    return SkipAddReport(label, tuple(rows), tuple(defects), tuple(adds), True, sample is not None, first_div,
                         quantized, tuple(notes))


def block_near(pairs: Sequence[tuple[int | None, int | None]], k: int, blocks: Sequence[str]) -> str:
    """The reference block an unmatched ONNX item (pair ``k``) sits in: the next matched one's, else the previous."""
    for _, j in pairs[k:]:
        if j is not None:
            return blocks[j]
    for _, j in reversed(pairs[:k]):
        if j is not None:
            return blocks[j]
    return ""


def matched_neighbours(pairs: Sequence[tuple[int | None, int | None]], k: int, nodes: Sequence[str]) -> tuple[str, str]:
    """The ONNX nodes matched before and after pair ``k``: where a missing item should have been."""
    prev = next((nodes[a] for a, _ in reversed(pairs[:k]) if a is not None), "the input")
    nxt = next((nodes[a] for a, _ in pairs[k + 1:] if a is not None), "the output")
    return prev, nxt


def _where(convs: int, anchor: int, tadds: list[TorchResidualAdd], onnx_anchor: str | None) -> str:
    if anchor == -1:
        base = "the graph input"
    elif anchor == -2:
        base = f"an extra merge {onnx_anchor}"
    else:
        base = f"the output of block {tadds[anchor].block}'s add"
    return base + (f" + {convs} conv(s)" if convs else "")


def _input_shape(model: onnx.ModelProto) -> tuple[int, int, int] | None:
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return (dims[1], dims[2], dims[3])
    return None


def require_pass(report: SkipAddReport) -> SkipAddReport:
    """Raise CheckFailed (exit 1) naming the first defect when the report failed."""
    if not report:
        raise CheckFailed(f"skip-add check of {report.model} failed: {report.defects[0]}"
                          + (f" (+{len(report.defects) - 1} more)" if len(report.defects) > 1 else ""))
    return report
