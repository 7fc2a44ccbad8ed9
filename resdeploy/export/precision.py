"""Precision variants of an exported FP32 ONNX model: FP16, and INT8 with explicit Q/DQ in two flavours.

Precision lives in the ONNX file, so every engine consumes the same artifact (TensorRT 10+ strongly typed
networks take their INT8/FP16 from the graph, not from builder flags).

* ``fp16``: weights and activations in float16, graph inputs/outputs kept float32, numerically sensitive ops
  (reductions, exp/log, unfused normalisation) kept in float32.
* ``int8``: QuantizeLinear/DequantizeLinear around every conv, per-channel symmetric int8 weights, activation
  scales calibrated on real images, and both inputs of every residual Add quantized, so an engine can fold the
  Add into the INT8 convolution (an external bug report, TensorRT GitHub issue #1992: an un-quantized residual
  branch leaves the Add out).
  Two flavours because the engines disagree: ``s8s8`` (symmetric int8 activations) is what TensorRT requires,
  ``u8s8`` (asymmetric uint8 activations) is what ONNX Runtime's fast CPU kernels need; OpenVINO runs both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from resdeploy import atomic
from resdeploy.artifact import external_tensors, load_onnx, precision_of, read_metadata, save_onnx, write_metadata
from resdeploy.errors import CheckFailed, InputError
from resdeploy.export.calibration import CalibrationSet, chunk_batches, even_batch_size, make_reader
from resdeploy.export.onnx_graph import replace_repeated

Precision = Literal["fp32", "fp16", "int8"]
Flavour = Literal["u8s8", "s8s8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
FLAVOURS: tuple[str, ...] = ("u8s8", "s8s8")

# Which INT8 flavour each engine runs fast, and why (the pipeline prints the reason with its choice).
_FLAVOUR_BY_BACKEND: dict[str, tuple[str, str]] = {
    "onnxruntime": ("u8s8", "ONNX Runtime's CPU int8 kernels are fast with uint8 activations; s8s8 runs about as slow as FP32"),
    "openvino": ("u8s8", "OpenVINO runs both flavours at about the same speed; u8s8 is shared with ONNX Runtime"),
    "tensorrt": ("s8s8", "TensorRT accepts only symmetric int8 activations (zero point 0)"),
}

# Ops kept in float32 in the FP16 variant: ORT's default list (ML/argmax ops) plus the numerically sensitive ones
# (reductions and exponentials overflow or lose the small terms in float16; BN is normally folded at export).
FP16_KEEP_FP32_OPS: tuple[str, ...] = (
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "ReduceSum", "ReduceSumSquare",
    "ReduceL2", "ReduceLogSumExp", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
)

def flavour_for_backend(backend: str) -> str:
    """The INT8 flavour an engine runs fast: ``u8s8`` for onnxruntime/openvino, ``s8s8`` for tensorrt."""
    try:
        return _FLAVOUR_BY_BACKEND[backend][0]
    except KeyError:
        raise InputError(f"no INT8 flavour known for backend {backend!r}; use one of {', '.join(_FLAVOUR_BY_BACKEND)}, "
                         "or pass the flavour (u8s8 | s8s8) explicitly") from None


def flavour_reason(backend: str) -> str:
    """One sentence saying why ``flavour_for_backend(backend)`` picked what it picked."""
    flavour_for_backend(backend)
    return _FLAVOUR_BY_BACKEND[backend][1]


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise InputError(f"{what} {value!r} unknown; use one of {', '.join(allowed)}")


# -- loading and metadata (through the artifact contract) -------------------------------------------------------

def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type


# -- residual adds (the skip-add check's finder when it is there, a structural fallback otherwise) ---------------

@dataclass(frozen=True)
class AddRef:
    """A residual Add of a graph, as the precision and build stages need it."""

    name: str  # node name
    output: str
    inputs: tuple[str, str]  # the Add's two inputs as written in the graph
    kind: str = ""  # identity | projection | pooled | option_a ("" when the fallback finder was used)
    block: str = ""  # module path of the block when known


def residual_adds(model: onnx.ModelProto) -> list[AddRef]:
    """Residual Adds of ``model``: from ``resdeploy.export.skipadd.find_residual_adds`` when available."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    fallback = _fallback_adds(model)
    try:
        from resdeploy.export.skipadd import find_residual_adds
    except ImportError:
        return fallback
    refs = []
    for ra in find_residual_adds(model):
        node = getattr(ra, "node", None)
        output = str(getattr(ra, "output", "") or (node.output[0] if isinstance(node, onnx.NodeProto) else ""))
        proto = node if isinstance(node, onnx.NodeProto) else by_output.get(output)
        if proto is None:
            continue
        refs.append(AddRef(proto.name, proto.output[0], (proto.input[0], proto.input[1]), str(getattr(ra, "kind", "")),
                           str(getattr(ra, "block", "") or "")))
    # A data-data Add the finder did not classify is still listed (kind ""): a report must not drop an Add.
    known = {r.output for r in refs}
    extra = [a for a in fallback if a.output not in known]
    if extra:
        order = {n.output[0]: i for i, n in enumerate(model.graph.node) if n.output}
        refs = sorted([*refs, *extra], key=lambda a: order.get(a.output, 0))
    return refs


def _fallback_adds(model: onnx.ModelProto) -> list[AddRef]:
    """Adds whose two inputs are both computed from the graph input (not a bias or a constant)."""
    consts = {t.name for t in model.graph.initializer}
    data = {i.name for i in _data_inputs(model)}
    for n in model.graph.node:  # topological order in exported files
        if n.op_type in ("Constant", "ConstantOfShape", "Shape"):
            consts.update(n.output)
            continue
        ins = [i for i in n.input if i]
        if ins and any(i in data for i in ins):
            data.update(n.output)
        elif ins and all(i in consts for i in ins):
            consts.update(n.output)
    return [AddRef(n.name, n.output[0], (n.input[0], n.input[1])) for n in model.graph.node
            if n.op_type == "Add" and len(n.input) == 2 and n.input[0] in data and n.input[1] in data and n.input[0] != n.input[1]]


# -- FP16 ------------------------------------------------------------------------------------------------------

@dataclass
class Fp16Config:
    keep_io_types: bool = True  # graph inputs/outputs stay float32: callers feed and read float32 whatever the variant
    op_block_list: tuple[str, ...] = FP16_KEEP_FP32_OPS  # op types kept in float32 (numerically sensitive)
    node_block_list: tuple[str, ...] = ()  # node names kept in float32 (a layer that overflows float16)


@dataclass(frozen=True)
class Fp16Report:
    nodes: int
    fp16_initializers: int
    fp32_initializers: int
    casts: int
    kept_fp32_ops: tuple[str, ...]  # op types present in the graph that were kept float32

    def __str__(self) -> str:
        kept = ", ".join(self.kept_fp32_ops) or "none present"
        return (f"fp16: {self.fp16_initializers} float16 / {self.fp32_initializers} float32 initializers, "
                f"{self.casts} Cast nodes, {self.nodes} nodes; kept in float32: {kept}; I/O float32")


def convert_fp16(model: onnx.ModelProto, *, config: Fp16Config | None = None) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16 copy of an FP32 model (``onnxruntime.transformers.float16``), checked: float32 I/O, float16 weights."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    config = config or Fp16Config()
    if precision_of(model) != "fp32":
        raise InputError(f"FP16 conversion needs the FP32 model; this one is {precision_of(model)}. Convert the exported model")
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.op_block_list))
    src = onnx.ModelProto()
    src.CopyFrom(model)
    try:
        out = convert_float_to_float16(src, keep_io_types=config.keep_io_types, op_block_list=block,
                                       node_block_list=list(config.node_block_list) or None)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain ValueError/KeyError on odd graphs
        raise CheckFailed(f"float16 conversion failed ({type(exc).__name__}: {exc}); "
                          "add the failing op to Fp16Config.op_block_list") from None
    _toposort(out.graph)  # the converter appends its input casts at the end of the node list
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"the float16 model is not valid ONNX: {str(exc).splitlines()[0]}") from None
    inits = list(out.graph.initializer)
    n16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    n32 = sum(t.data_type == onnx.TensorProto.FLOAT for t in inits)
    if config.keep_io_types:
        bad = [f"{vi.name}: {onnx.TensorProto.DataType.Name(_elem_type(vi))}" for vi in [*_data_inputs(out), *out.graph.output]
               if _elem_type(vi) != onnx.TensorProto.FLOAT]
        if bad:
            raise CheckFailed(f"float16 model has non-float32 graph I/O ({', '.join(bad)}); expected float32 with keep_io_types")
    if n16 == 0:
        raise CheckFailed("float16 conversion left no float16 weights; the op block list covers every weighted op")
    present = {n.op_type for n in model.graph.node}
    report = Fp16Report(len(out.graph.node), n16, n32, sum(n.op_type == "Cast" for n in out.graph.node),
                        tuple(sorted(present & set(block))))
    return out, report


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically in place (stable where the order is already valid)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise CheckFailed(f"graph has a cycle or a missing tensor at node {rest[0].name!r} ({list(rest[0].input)})")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# -- INT8 ------------------------------------------------------------------------------------------------------

@dataclass
class Int8Config:
    method: str = "minmax"  # minmax | entropy | percentile: calibration method (MinMax is ORT's fast default)
    per_channel: bool = True  # per-output-channel weight scales (what TensorRT and ORT expect for convs)
    batch_size: int = 32  # calibration batch size
    max_images: int = 500  # calibration images used (the first N of the set); a few hundred suffice for MinMax
    reduce_range: bool = False  # 7-bit weights: only for old x86 without VNNI that saturates u8s8 products
    preprocess: bool = False  # run ORT's quant_pre_process (symbolic shapes + basic optimisation) first
    nodes_to_exclude: tuple[str, ...] = ()  # node names left in float (a layer that loses too much accuracy)
    extra_options: dict[str, Any] = field(default_factory=dict)  # passed to quantize_static, overriding ours


@dataclass(frozen=True)
class Int8GraphCheck:
    """What a Q/DQ graph holds, and whether that is what the flavour promised."""

    flavour: str
    convs: int
    convs_quantized: int  # Conv with both data and weight coming through DequantizeLinear
    convs_per_channel: int  # of those, with a per-channel weight scale
    convs_float_bias: int  # quantized convs whose bias is not a DequantizeLinear of int32 (ORT will not fuse them)
    residual_adds: int
    residual_adds_quantized: int  # both Add inputs coming through DequantizeLinear
    activation_dtypes: tuple[str, ...]  # zero-point dtypes of activation QuantizeLinear nodes
    nonzero_activation_zero_points: int  # must be 0 for s8s8
    problems: tuple[str, ...]

    def __bool__(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        s = (f"int8 {self.flavour}: convs quantized {self.convs_quantized}/{self.convs} "
             f"({self.convs_per_channel} per-channel), residual Adds quantized {self.residual_adds_quantized}/"
             f"{self.residual_adds}, activations {'/'.join(self.activation_dtypes) or '-'}")
        return s + ("" if not self.problems else "; PROBLEMS: " + "; ".join(self.problems))


@dataclass(frozen=True)
class QuantizeReport:
    precision: str
    flavour: str | None
    method: str | None
    calibration: dict[str, object]
    seconds: float
    graph: Int8GraphCheck | None = None
    fp16: Fp16Report | None = None

    def __bool__(self) -> bool:
        return self.graph is None or bool(self.graph)

    def __str__(self) -> str:
        if self.precision == "fp16" and self.fp16 is not None:
            return f"{self.fp16} ({self.seconds:.1f} s)"
        cal = self.calibration
        return (f"{self.graph}; calibration {self.method} on {cal.get('count')} {cal.get('data')}/{cal.get('split')} "
                f"images ({self.seconds:.1f} s)")


def check_int8_graph(model: onnx.ModelProto, flavour: str, *, per_channel: bool = True,
                     excluded: Sequence[str] = ()) -> Int8GraphCheck:
    """Verify a Q/DQ model: quantized convs (per-channel weights), quantized residual Adds, flavour's activations."""
    _check_choice(flavour, FLAVOURS, "int8 flavour")
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    const_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in const_nodes:
            for a in const_nodes[name].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def dq(name: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    problems: list[str] = []
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in excluded]
    quantized = per_ch = 0
    unquantized: list[str] = []
    float_bias: list[str] = []
    for n in convs:
        x_dq, w_dq = dq(n.input[0]), dq(n.input[1])
        if x_dq is None or w_dq is None:
            unquantized.append(n.name)
            continue
        quantized += 1
        if len(n.input) > 2 and n.input[2] and dq(n.input[2]) is None:
            float_bias.append(n.name)
        scale = const(w_dq.input[1])
        if scale is not None and scale.size > 1:
            per_ch += 1
    if unquantized:
        problems.append(f"{len(unquantized)} Conv nodes are not fed by DequantizeLinear on both data and weight "
                        f"(e.g. {unquantized[0]!r})")
    if float_bias:
        problems.append(f"{len(float_bias)} quantized convs keep a float bias (e.g. {float_bias[0]!r}); ONNX Runtime then "
                        "leaves them out of QLinearConv. Give each conv its own bias initializer")
    if per_channel and quantized and per_ch < quantized:
        problems.append(f"only {per_ch} of {quantized} quantized convs have per-channel weight scales; expected all")
    adds = [a for a in residual_adds(model) if a.name not in excluded]
    adds_q = [a for a in adds if dq(a.inputs[0]) is not None and dq(a.inputs[1]) is not None]
    if len(adds_q) < len(adds):
        missing = next(a.name for a in adds if a not in adds_q)
        problems.append(f"{len(adds) - len(adds_q)} of {len(adds)} residual Adds have an input that is not quantized "
                        f"(e.g. {missing!r}); an engine cannot fuse such an Add into the INT8 conv (TensorRT GitHub issue #1992)")
    weight_inputs = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    act_dtypes: set[str] = set()
    nonzero = 0
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        if any(c.input and c.input[0] == n.output[0] and c.output[0] in weight_inputs
               for c in model.graph.node if c.op_type == "DequantizeLinear"):
            continue  # a weight's Q/DQ pair (AddQDQPairToWeight), not an activation
        zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        dtype = "uint8" if zp is None else str(zp.dtype)  # ONNX: no zero point means uint8
        act_dtypes.add(dtype)
        if zp is not None and np.any(zp != 0):
            nonzero += 1
    want = "uint8" if flavour == "u8s8" else "int8"
    wrong = sorted(act_dtypes - {want})
    if wrong:
        problems.append(f"activation QuantizeLinear nodes use {', '.join(wrong)}; the {flavour} flavour needs {want} only")
    if flavour == "s8s8" and nonzero:
        problems.append(f"{nonzero} activation QuantizeLinear nodes have a non-zero zero point; s8s8 (TensorRT) needs "
                        "symmetric activations")
    if not act_dtypes:
        problems.append("the model has no activation QuantizeLinear nodes; it is not an explicitly quantized model")
    return Int8GraphCheck(flavour, len(convs), quantized, per_ch, len(float_bias), len(adds), len(adds_q), tuple(sorted(act_dtypes)),
                          nonzero, tuple(problems))


def inline_constant_identities(model: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` by a copy of the initializer under the Identity's output name.

    Exporters de-duplicate equal tensors (e.g. equal conv biases) and re-expose them through Identity nodes; ORT's
    quantizer then cannot quantize such a bias, and its QDQ->QLinearConv fusion skips the conv (measured on
    resnet50: 47 of 53 convs left in float). Values are unchanged.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep, added = [], 0
    for n in g.node:
        if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            g.initializer.append(t)
            added += 1
        else:
            keep.append(n)
    if added:
        replace_repeated(g.node, keep)
        used = {i for n in g.node for i in n.input}
        # Drop graph inputs that duplicated an initializer name we just created (old IR models list them).
        dup_inputs = [i for i in g.input if i.name in {t.name for t in g.initializer} and i.name not in used]
        for i in dup_inputs:
            g.input.remove(i)
    return added


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs "consider pre-processing" on the root logger on every call; we decide that (config)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(model_path: str | Path, out_path: str | Path, calibration: CalibrationSet | np.ndarray, *,
                  flavour: str, config: Int8Config | None = None,
                  metadata: Mapping[str, Any] | None = None) -> QuantizeReport:
    """Write an explicitly quantized (Q/DQ) INT8 copy of an FP32 ONNX model to ``out_path``, checked first.

    ``calibration`` holds normalised images (the val split, never test). The result is written only when
    :func:`check_int8_graph` passes (convs and residual Adds quantized, the flavour's activation type).
    ``metadata``: :class:`~resdeploy.artifact.ArtifactMetadata` fields that override the variant's. A source with
    external data gives a variant with external data (``<out>.data`` beside it).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _check_choice(flavour, FLAVOURS, "int8 flavour")
    config = config or Int8Config()
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    _check_choice(config.method, tuple(methods), "calibration method")
    cal = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(np.asarray(calibration))
    graph = load_onnx(model_path)
    if precision_of(graph) != "fp32":
        raise InputError(f"INT8 quantization needs the FP32 model; {model_path} is {precision_of(graph)}")
    external = bool(external_tensors(graph))
    source = load_onnx(model_path, weights=True) if external else graph
    inputs = _data_inputs(source)
    if len(inputs) != 1:
        raise InputError(f"{model_path} has {len(inputs)} inputs; resdeploy quantizes single-input image models")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is not None and d != s for d, s in zip(dims[1:], cal.images.shape[1:])):
        raise InputError(f"calibration images have shape {list(cal.images.shape[1:])} per image; {model_path} input "
                         f"{inputs[0].name!r} expects {dims[1:]}")
    images = cal.images[: config.max_images]
    used = CalibrationSet(images, cal.source, cal.split, cal.fingerprint)
    symmetric_act = flavour == "s8s8"
    extra = {
        "ActivationSymmetric": symmetric_act,  # s8s8: zero point 0, which TensorRT requires
        "WeightSymmetric": True,  # int8 weights with zero point 0 (both engines)
        **config.extra_options,
    }
    chunk = chunk_batches(len(images), config.batch_size, int(np.prod(images.shape[1:])))
    if chunk * even_batch_size(len(images), config.batch_size) < len(images):
        extra.setdefault("CalibStridedMinMax", chunk)  # memory bounded by one chunk (any method, despite the name)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resdeploy-int8-") as tmp:
        src = Path(tmp) / "source.onnx"
        prepared = onnx.ModelProto()
        prepared.CopyFrom(source)
        inline_constant_identities(prepared)
        save_onnx(prepared, src, external_data=external)
        if config.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            src = pre
        out_tmp = Path(tmp) / "int8.onnx"
        try:
            with _quiet_root_logger():
                quantize_static(
                    str(src), str(out_tmp), make_reader(images, inputs[0].name, config.batch_size),
                    quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=config.reduce_range,
                    activation_type=QuantType.QInt8 if symmetric_act else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(config.nodes_to_exclude) or None, calibrate_method=methods[config.method],
                    extra_options=extra, use_external_data_format=external,
                )
        except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises assorted errors
            raise CheckFailed(f"onnxruntime quantize_static failed on {model_path} ({type(exc).__name__}: {exc})") from None
        model = load_onnx(out_tmp, weights=True)
    check = check_int8_graph(model, flavour, per_channel=config.per_channel, excluded=config.nodes_to_exclude)
    report = QuantizeReport("int8", flavour, config.method, used.describe(), time.perf_counter() - t0, graph=check)
    if not check:
        raise CheckFailed(f"the INT8 model of {model_path} is not what it must be, nothing written: {check}")
    meta = read_metadata(source).variant("int8", flavour=flavour, calibration=used.describe(),
                                         source_sha256=atomic.sha256_file(model_path))
    write_metadata(model, dataclasses.replace(meta, **dict(metadata or {})))
    save_onnx(model, out_path, external_data=external)
    return report


def fp16_variant(model_path: str | Path, out_path: str | Path, *, config: Fp16Config | None = None,
                 metadata: Mapping[str, Any] | None = None) -> QuantizeReport:
    """Write the FP16 variant of an FP32 ONNX file, with its metadata (checked by :func:`convert_fp16`).

    ``metadata``: ArtifactMetadata fields that override the variant's. External data in, external data out."""
    t0 = time.perf_counter()
    external = bool(external_tensors(load_onnx(model_path)))
    source = load_onnx(model_path, weights=True)
    model, rep = convert_fp16(source, config=config)
    meta = read_metadata(source).variant("fp16", source_sha256=atomic.sha256_file(model_path))
    write_metadata(model, dataclasses.replace(meta, **dict(metadata or {})))
    save_onnx(model, out_path, external_data=external)
    return QuantizeReport("fp16", None, None, {}, time.perf_counter() - t0, fp16=rep)
