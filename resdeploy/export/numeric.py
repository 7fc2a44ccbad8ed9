"""Step 4 of the short-path engine: compare numbers block by block, on the same input, in ONNX Runtime and PyTorch.

For every aligned pair the short path's output *and each of its operands* are compared with the reference's. The
operands matter: a skip wired to another tensor of the same shape (a pre-activation block whose skip reads
``relu(bn(x))`` instead of ``x``) has the right structure, and only its shortcut operand's value shows it. Each
ONNX operand is compared with the reference operand in the same role (branch, shortcut; H, T, carry; the i-th
input) and, when that differs, with the others of the same shape, so operands written in the other order pass.

A float graph passes when ``max |onnx - torch| / max |torch| <= FLOAT_RTOL`` (an operand's error is taken relative
to the larger of its own and the output's magnitude; a float16 graph's tensors get ``LOW_PRECISION_RTOL``);
a quantized one when the cosine similarity is at least ``QUANT_MIN_COSINE``. The first pair that fails is the first
divergent block; later ones are its consequences and are marked ``diverged`` without a defect of their own.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from resdeploy.errors import InputError
from resdeploy.export.check_report import Defect
from resdeploy.export.discover import ADD_KINDS, ShortPath
from resdeploy.export.graph import DataGraph
from resdeploy.export.onnx_graph import expose_outputs

FLOAT_RTOL = 1e-3  # max |onnx - torch| / max |torch| per tensor; FP32 kernels differ by ~1e-6
QUANT_MIN_COSINE = 0.9  # Q/DQ graphs round every tensor; a real defect drops far below this
# A float16 graph's tensors (outputs and operands): float16 rounds at 5e-4 per op, and a deep net's adds drift past
# 1e-3 of their magnitude (a trained resnet18's layer4.0 read 1.1e-3); a skip wired to another tensor is off by 1e-1
# and more.
LOW_PRECISION_RTOL = 1e-2
QUANTIZED_OPS = ("QuantizeLinear", "QLinearConv", "QLinearAdd", "ConvInteger", "DynamicQuantizeLinear")
# Where each QOperator-format op (com.microsoft) takes its output scale and zero point: its output is integers.
QLINEAR_OUTPUT_SCALE = {"QLinearAdd": 6, "QLinearMul": 6, "QLinearConv": 6, "QLinearMatMul": 6, "QLinearConcat": 0,
                        "QLinearSigmoid": 3, "QLinearLeakyRelu": 3, "QLinearAveragePool": 3,
                        "QLinearGlobalAveragePool": 3}
ROLES = {"add": ("branch", "shortcut"), "scaled_add": ("branch", "shortcut"), "gated_add": ("transform H", "gate T", "carry")}


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def is_full_precision(model: onnx.ModelProto) -> bool:
    """No quantization and no float16/bfloat16 weight: a graph whose numbers should match FP32 PyTorch closely."""
    low = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return not is_quantized(model) and not any(t.data_type in low for t in model.graph.initializer)


def errors(o: np.ndarray, t: np.ndarray, scale: float | None = None) -> tuple[float, float, float]:
    """(max abs error, that over ``scale`` (default max |t|), cosine similarity)."""
    o, t = o.astype(np.float64).ravel(), t.astype(np.float64).ravel()
    diff = float(np.abs(o - t).max()) if o.size else 0.0
    rel = diff / max(scale if scale is not None else (float(np.abs(t).max()) if t.size else 0.0), 1e-12)
    cos = float(o @ t / max(np.linalg.norm(o) * np.linalg.norm(t), 1e-30))
    return diff, rel, cos


def onnx_values(model: onnx.ModelProto, path: Path | None, outputs: Sequence[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Run a temporary copy of ``model`` with ``outputs`` exposed as graph outputs; ORT graph optimisation off so
    the values are those of the graph as written."""
    import onnxruntime as ort

    m = expose_outputs(model, list(outputs))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a graph that cannot run becomes one InputError below, not an ORT log line too
    try:
        if path is not None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
            # External weights are resolved relative to the model's folder: write the copy beside it.
            with tempfile.NamedTemporaryFile(suffix=".onnx", dir=path.parent, delete=True) as tmp:
                onnx.save(m, tmp.name)
                sess = ort.InferenceSession(tmp.name, so, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot load the model for numeric localisation ({exc}); check it with "
                         "`onnx.checker` or drop --reference sample data") from None
    feed = sess.get_inputs()[0]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    want = [o.name for o in sess.get_outputs() if o.name in set(outputs)]
    vals: dict[str, list[np.ndarray]] = {n: [] for n in want}
    batches = [x[i:i + 1] for i in range(len(x))] if isinstance(feed.shape[0], int) else [x]
    for xb in batches:
        try:
            res = sess.run(want, {feed.name: xb.astype(np.float32)}, quiet)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"ONNX Runtime cannot run the model on the sample images of shape {xb.shape} ({exc}); "
                             "give images shaped and normalised as the model's input") from None
        for n, v in zip(want, res):
            vals[n].append(v)
    return {n: np.concatenate(v) for n, v in vals.items()}


def dequantize(model: onnx.ModelProto, producers: dict[str, onnx.NodeProto], tensor: str, q: np.ndarray) -> np.ndarray | None:
    """Floats from a QLinear op's integer output (its output scale/zero point, see QLINEAR_OUTPUT_SCALE); the value
    itself when it is already float; None when the integers' scale is unknown."""
    if np.issubdtype(q.dtype, np.floating):
        return q
    node = producers.get(tensor)
    k = QLINEAR_OUTPUT_SCALE.get(node.op_type) if node is not None else None
    if k is None:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    scale = numpy_helper.to_array(inits[node.input[k]]).astype(np.float32) if node.input[k] in inits else np.float32(1)
    zp = (numpy_helper.to_array(inits[node.input[k + 1]]).astype(np.float32)
          if len(node.input) > k + 1 and node.input[k + 1] in inits else 0)
    return (q.astype(np.float32) - zp) * scale


@dataclass
class Numbers:
    """What the numeric comparison found, per pair index."""

    output: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # (max abs, rel, cosine)
    operand: dict[int, float] = field(default_factory=dict)  # worst operand rel err (1 - cosine when quantized)
    first_divergent: str | None = None
    defects: list[tuple[int, Defect]] = field(default_factory=list)  # (pair index, defect)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its short paths, its DataGraph, and its tensor values by DataGraph name."""

    paths: Sequence[ShortPath]
    graph: DataGraph
    values: dict[str, np.ndarray]


def exposable(graph: DataGraph, paths: Sequence[ShortPath]) -> dict[str, str]:
    """DataGraph tensor -> the ONNX tensor to expose for it, for every output and operand of ``paths`` that has a
    readable value (not a graph input, not fused away, not in a blocked layout). A DequantizeLinear alias is
    preferred: it is what the consumers of a Q/DQ graph read."""
    dq = {c: t for t, (c, op) in graph.aliases.items() if op == "DequantizeLinear"}
    inputs = set(graph.inputs)
    out: dict[str, str] = {}
    for p in paths:
        for t in (p.output, *p.operands):
            name = dq.get(t, t)
            if t not in inputs and t not in graph.opaque and name not in graph.opaque:
                out[t] = name
    return out


def _bad(err: tuple[float, float, float], quantized: bool, rtol: float = FLOAT_RTOL) -> bool:
    return err[2] < QUANT_MIN_COSINE if quantized else err[1] > rtol


def operand_error(p: ShortPath, t: ShortPath, onnx_side: Side, torch_side: Side, quantized: bool) -> tuple[float, str] | None:
    """(worst operand error, the role of that operand) of an aligned pair; None when no operand could be compared.
    The error is relative to the larger of the operand's and the output's magnitude (1 - cosine when quantized)."""
    if len(p.operands) != len(t.operands):
        return None
    tout = torch_side.values.get(t.output)
    worst: tuple[float, str] | None = None
    for k, o_name in enumerate(p.operands):
        o = onnx_side.values.get(o_name)
        if o is None:
            continue
        best = None
        for m in [k, *(m for m in range(len(t.operands)) if m != k)]:
            ref = torch_side.values.get(t.operands[m])
            if ref is None or ref.shape != o.shape:
                continue
            scale = max(float(np.abs(ref).max()), float(np.abs(tout).max()) if tout is not None else 0.0)
            d, rel, cos = errors(o, ref, scale)
            score = 1 - cos if quantized else rel
            best = score if best is None else min(best, score)
            if not _bad((d, rel, cos), quantized):
                break
        if best is not None and (worst is None or best > worst[0]):
            roles = ROLES.get(p.kind)
            worst = (best, roles[k] if roles and k < len(roles) else f"input {k}")
    return worst


def fused_relu(onnx_output: str, reference_output: str, onnx_relu_fed: Collection[str],
               reference_relu_fed: Collection[str]) -> bool:
    """Whether the ONNX graph fused the ReLU after a merge into it (quantizers do: a uint8 Q/DQ pair clamps at 0), so
    its value is the reference's after the ReLU: every consumer of the reference's merge is a ReLU, none of the
    ONNX one's is."""
    return reference_output in reference_relu_fed and onnx_output not in onnx_relu_fed


def compare(pairs: Sequence[tuple[int, int, int]], onnx_side: Side, torch_side: Side, status: dict[int, str], *,
            quantized: bool, relu_fed: tuple[set[str], frozenset[str]], inputs: str,
            rtol: float = FLOAT_RTOL) -> Numbers:
    """Compare each aligned (pair index, onnx index, torch index) in order; update ``status`` (ok -> diverged) and
    name the first divergent block with a defect when its structure matched."""
    res = Numbers()
    onnx_relu_fed, torch_relu_fed = relu_fed
    for k, i, j in pairs:
        p, t = onnx_side.paths[i], torch_side.paths[j]
        o, r = onnx_side.values.get(p.output), torch_side.values.get(t.output)
        if r is not None and fused_relu(p.output, t.output, onnx_relu_fed, torch_relu_fed):
            r = np.maximum(r, 0)
        out_bad = False
        if o is not None and r is not None and o.shape == r.shape:
            res.output[k] = errors(o, r)
            out_bad = _bad(res.output[k], quantized, rtol)
        opnd = operand_error(p, t, onnx_side, torch_side, quantized)
        opnd_bad = False
        if opnd is not None:
            res.operand[k] = opnd[0]
            opnd_bad = opnd[0] > (1 - QUANT_MIN_COSINE if quantized else rtol)
        if not (out_bad or opnd_bad):
            continue
        if res.first_divergent is not None:
            status[k] = "diverged" if status[k] == "ok" else status[k]  # downstream of the first: a consequence
            continue
        res.first_divergent = t.block or t.node
        if status[k] == "ok":
            status[k] = "diverged"
            res.defects.append((k, Defect(t.block, p.node, _divergence_message(t, res.output.get(k),
                                                                              opnd if opnd_bad else None,
                                                                              quantized, inputs, rtol))))
    if quantized:
        res.notes.append(f"Q/DQ graph: numeric divergence judged by cosine similarity >= {QUANT_MIN_COSINE}")
    return res


def _divergence_message(t: ShortPath, out: tuple[float, float, float] | None, bad_operand: tuple[float, str] | None,
                        quantized: bool, inputs: str, rtol: float) -> str:
    """Why the first divergent pair fails: a wrong operand when one is (the output then follows), else the output."""
    what = "Add" if t.kind in ADD_KINDS else t.kind
    if bad_operand is not None:
        crit = f"1 - cosine {bad_operand[0]:.2e}" if quantized else f"rel err {bad_operand[0]:.2e} > {rtol:.0e}"
        return (f"the {bad_operand[1]} operand of the {what} differs from PyTorch's on {inputs} ({crit}) although the "
                f"structure matches: the {'skip' if t.kind in ADD_KINDS else 'short path'} reads another tensor of the "
                "same shape (e.g. from inside the branch, after the pre-activation), or its weights differ")
    assert out is not None
    diff, rel, cos = out
    crit = f"cosine {cos:.4f} < {QUANT_MIN_COSINE}" if quantized else f"rel err {rel:.2e} > {rtol:.0e}"
    return (f"{what} output differs from PyTorch on {inputs}: max abs err {diff:.3g}, {crit} (first diverging block; "
            "the structure matches, so look at this block's weights or operands)")


def _run_onnx(model: onnx.ModelProto, path: Path | None, names: dict[str, str], outputs: set[str],
              x: np.ndarray) -> dict[str, np.ndarray]:
    """The values of the exposed tensors. On a float16 or quantized graph, ONNX Runtime's CPU kernels run through
    casts it places around what is exposed, so exposing more tensors changes the numbers: the short-path outputs
    then come from a run that exposes only them, the operands from a second run."""
    wanted = sorted(set(names.values()))
    if is_full_precision(model):
        return onnx_values(model, path, wanted, x)
    first = sorted({names[t] for t in outputs if t in names})
    values = onnx_values(model, path, first, x)
    rest = [n for n in wanted if n not in values]
    return {**onnx_values(model, path, rest, x), **values} if rest else values


def localise(model: onnx.ModelProto, path: Path | None, graph: DataGraph, paths: Sequence[ShortPath], reference: Any,
             pairs: Sequence[tuple[int, int, int]], status: dict[int, str], sample: np.ndarray, *, quantized: bool,
             inputs: str, structural_defects: bool) -> Numbers:
    """Run both sides on ``sample`` and compare the aligned (pair index, ONNX index, reference index) ``pairs`` (see
    :func:`compare`). ``reference``: the traced reference (``paths``, ``graph``, ``program``, ``relu_fed``). A graph
    ONNX Runtime cannot run is an InputError, unless structural defects already explain it (then a note says so)."""
    import torch

    from resdeploy.export.torch_graph import record_values

    names = exposable(graph, [paths[i] for _, i, _ in pairs])
    try:
        raw = _run_onnx(model, path, names, {paths[i].output for _, i, _ in pairs}, sample)
    except InputError as exc:
        if not structural_defects:
            raise
        # A structurally broken graph (a concat that lost an input changes every shape after it) may not even
        # load; the structural defects already name the block.
        return Numbers(notes=[f"numeric localisation skipped: {exc}"])
    producers = {o: n for n in model.graph.node for o in n.output}
    ovals = {}
    for t, name in names.items():
        if name in raw and (v := dequantize(model, producers, name, raw[name])) is not None:
            ovals[t] = v
    tpaths = reference.paths
    wanted = {x for _, _, j in pairs for x in (tpaths[j].output, *tpaths[j].operands)} - set(reference.graph.inputs)
    tvals = record_values(reference.program, reference.graph, torch.from_numpy(np.ascontiguousarray(sample)), wanted)
    return compare(pairs, Side(paths, graph, ovals), Side(tpaths, reference.graph, tvals), status,
                   quantized=quantized, relu_fed=(graph.relu_fed(), reference.relu_fed), inputs=inputs,
                   rtol=FLOAT_RTOL if is_full_precision(model) else LOW_PRECISION_RTOL)
