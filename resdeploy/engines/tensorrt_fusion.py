"""Fusion report from TensorRT's engine inspector: where did each residual Add go?

Input: the layer-information JSON that ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``
returns and ``trtexec --exportLayerInfo`` writes (the same document). Schemas accepted:

* TensorRT 8.x-10.x: ``{"Layers": [...], "Bindings": ["input", ...]}``, tensors carry ``"Format/Datatype"``
  (e.g. ``"Channel major FP16 format where channel % 8 == 0"``);
* TensorRT 11: ``{"Layers": [...], "I/O Tensors": [{"Name": ...}, ...]}``, tensors carry separate ``"Format"``
  and ``"DataType"`` (also spelled ``"Datatype"``) keys;
* a build with ``ProfilingVerbosity.LAYER_NAMES_ONLY``: ``"Layers"`` is a list of strings;
* a bare list of layers (with or without a leading ``{"count": N}`` object, as trtexec's profile export has).

A fused engine layer is named after the ONNX nodes it absorbed joined with ``" + "`` (``Conv_5 + Add_6 + Relu_7``,
QAT: ``layer1.0.conv2.weight + QuantizeLinear_32 + Conv_34 + Add_36 + Relu_37``); pointwise fusions are
``PWN(PWN(Add_6), Relu_7)``; Myelin regions are ``{ForeignNode[first...last]}`` (only the two ends are named).
Engines with several optimisation profiles repeat layers with a ``[profile N]`` suffix: profile 0 is used.

Without the ONNX model every constituent name that looks like an Add (``Add_6``, ``/layer1/layer1.0/Add``,
``node_add_3``) is a residual-Add candidate. With it, the skip-add check's residual Adds (their ONNX node
names) are looked up, and the conv that absorbed each Add is named as the branch or the projection conv.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resdeploy.errors import InputError

_PROFILE_RE = re.compile(r"\[profile +\d+\]")
_ADD_RE = re.compile(r"^(?:node_)?add(?:[_.]?\d+)?$", re.IGNORECASE)
_DTYPE_RE = re.compile(r"\b(FP4|FP8|FP16|FP32|BFloat16|BF16|Half|Float|Double|Int4|INT4|Int8|INT8|Int32|INT32|"
                       r"Int64|INT64|UInt8|UINT8|BOOL|Bool)\b")
_DTYPE_NORMAL = {"half": "FP16", "float": "FP32", "double": "FP64", "bfloat16": "BF16", "bool": "BOOL"}
_CONV_TYPES = ("convolution", "convactpool", "deconvolution", "gemm", "matrixmultiply")
_ELEMENTWISE_TYPES = ("elementwise", "pointwise", "pointwisev2")
_PROJECTION_HINTS = ("downsample", "shortcut", "proj")
_QDQ_PASSTHROUGH = {"BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Identity", "Cast"}


def _last_segment(name: str) -> str:
    return re.split(r"[/:]", name.strip())[-1]


def is_add_name(name: str) -> bool:
    """True for an ONNX Add node name as exporters write them (``Add_6``, ``/layer1/layer1.0/Add_1``, ``node_add``)."""
    return bool(_ADD_RE.match(_last_segment(name)))


def is_conv_name(name: str) -> bool:
    """True for a Conv/Gemm/MatMul node name (``Conv_5``, ``/layer1/layer1.0/conv1/Conv``, ``node_conv2d_1``)."""
    seg = re.sub(r"^node_", "", _last_segment(name), flags=re.IGNORECASE).lower()
    return seg.startswith(("conv", "gemm", "matmul"))


def normalize_dtype(text: str | None) -> str:
    """``"Channel major FP16 format where channel % 8 == 0"`` -> ``FP16``; ``"Half"`` -> ``FP16``; unknown -> ``""``."""
    if not text:
        return ""
    m = _DTYPE_RE.search(str(text))
    if not m:
        return ""
    tok = m.group(1)
    return _DTYPE_NORMAL.get(tok.lower(), tok.upper())


def constituent_names(layer_name: str) -> list[str]:
    """The original (ONNX) node names an engine layer absorbed, in order."""
    name = _PROFILE_RE.sub("", layer_name).strip()
    out: list[str] = []

    def walk(text: str) -> None:
        text = text.strip()
        if not text:
            return
        m = re.fullmatch(r"\{ForeignNode\[(.*)\]\}", text)
        if m:
            for part in m.group(1).split("..."):
                walk(part)
            return
        m = re.fullmatch(r"PWN\((.*)\)", text)
        if m:
            for part in _split_top(m.group(1), ","):
                walk(part)
            return
        parts = _split_top(text, " + ")
        if len(parts) > 1:
            for part in parts:
                walk(part)
            return
        out.append(text)

    walk(name)
    return out


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses/brackets (``(Unnamed Layer* 306) [Shuffle]`` stays whole)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


# -- parsed layer information ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    dtype: str  # FP32 / FP16 / INT8 / ... ("" when the dump does not say)
    format: str  # the layout text as TensorRT wrote it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype, "format": self.format}


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str  # LayerType (the kernel family: CaskConvolution, PointWiseV2, Reformat, NoOp, Myelin, ...)
    parameter_type: str  # ParameterType (Convolution, Pooling, Reformat, ...) or ""
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    tactic: str = ""
    origin: str = ""
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    constituents: tuple[str, ...] = ()

    @property
    def is_reformat(self) -> bool:
        """A data-layout copy TensorRT inserted (not a Q/DQ 'Reformat', which is a real quantize op)."""
        return self.name.startswith("Reformatting CopyNode") or self.origin.upper() == "REFORMAT"

    @property
    def is_conv(self) -> bool:
        kinds = (self.parameter_type + " " + self.layer_type).lower()
        if any(t in kinds for t in _CONV_TYPES):
            return True
        return not self.layer_type and any(is_conv_name(c) for c in self.constituents)

    @property
    def is_elementwise(self) -> bool:
        kinds = (self.parameter_type + " " + self.layer_type).lower().replace(" ", "")
        return any(t in kinds for t in _ELEMENTWISE_TYPES) or self.name.startswith("PWN(")

    @property
    def is_myelin(self) -> bool:
        return "myelin" in self.layer_type.lower() or "ForeignNode[" in self.name

    @property
    def dtype(self) -> str:
        """Output data type(s), ``FP16`` or ``FP16/INT8`` when outputs differ; ``?`` when the dump has none."""
        kinds = sorted({t.dtype for t in self.outputs if t.dtype})
        return "/".join(kinds) if kinds else "?"

    @property
    def input_dtypes(self) -> tuple[str, ...]:
        return tuple(t.dtype or "?" for t in self.inputs)


@dataclass(frozen=True)
class EngineLayers:
    layers: tuple[EngineLayer, ...]
    io_tensors: tuple[str, ...]
    schema: str  # "bindings" (TensorRT <= 10) | "io-tensors" (TensorRT 11) | "names-only" | "list"
    detailed: bool  # False when the inspector gave names only (build with ProfilingVerbosity.DETAILED for more)


def _tensor(raw: Any) -> TensorInfo:
    if isinstance(raw, str):
        return TensorInfo(raw, (), "", "")
    if not isinstance(raw, dict):
        raise InputError(f"engine layer tensor {raw!r} is neither an object nor a name")
    fmt_dt = raw.get("Format/Datatype")
    if fmt_dt is not None:
        fmt, dtype = str(fmt_dt), normalize_dtype(fmt_dt)
    else:
        dt = raw.get("DataType", raw.get("Datatype", raw.get("Data Type")))
        fmt = str(raw.get("Format", ""))
        dtype = normalize_dtype(dt) or normalize_dtype(fmt)
    dims = raw.get("Dimensions", ())
    return TensorInfo(str(raw.get("Name", "")), tuple(int(d) for d in dims) if isinstance(dims, list) else (), dtype, fmt)


def _layer(raw: Any, where: str) -> EngineLayer:
    if isinstance(raw, str):
        return EngineLayer(raw, "", "", constituents=tuple(constituent_names(raw)))
    if not isinstance(raw, dict) or not isinstance(raw.get("Name", raw.get("name")), str):
        raise InputError(f"{where}: a layer entry is not an object with a Name: {str(raw)[:120]}")
    name = raw.get("Name", raw.get("name"))
    ints = lambda v: tuple(int(x) for x in v) if isinstance(v, list) else ()  # noqa: E731
    return EngineLayer(
        name=name, layer_type=str(raw.get("LayerType", "")), parameter_type=str(raw.get("ParameterType", "")),
        inputs=tuple(_tensor(t) for t in raw.get("Inputs", [])), outputs=tuple(_tensor(t) for t in raw.get("Outputs", [])),
        tactic=str(raw.get("TacticName") or raw.get("Tactic") or raw.get("TacticValue") or ""), origin=str(raw.get("Origin", "")),
        kernel=ints(raw.get("Kernel", raw.get("ConvKernel"))), stride=ints(raw.get("Stride", raw.get("ConvStride"))),
        constituents=tuple(constituent_names(name)))


def parse_layer_info(doc: Any, source: str = "layer information", profile: int = 0) -> EngineLayers:
    """Parse an engine-inspector document (a JSON string or the loaded object). ``profile``: which
    optimisation profile's layers to keep (0 = layers without a ``[profile N]`` suffix)."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except ValueError as exc:
            raise InputError(f"{source} is not JSON ({exc}); pass the file that `trtexec --exportLayerInfo` or the "
                             "engine inspector (LayerInformationFormat.JSON) wrote") from None
    if isinstance(doc, dict):
        if "Layers" not in doc:
            raise InputError(f"{source} has no \"Layers\" (keys: {', '.join(list(doc)[:8])}); expected the engine "
                             "inspector's JSON, e.g. from `trtexec --exportLayerInfo=FILE --profilingVerbosity=detailed`")
        raw_layers = doc["Layers"]
        if "I/O Tensors" in doc:
            schema = "io-tensors"
            io = [t.get("Name", "") if isinstance(t, dict) else str(t) for t in doc["I/O Tensors"]]
        else:
            schema = "bindings"
            io = [str(b) for b in doc.get("Bindings", [])]
    elif isinstance(doc, list):
        schema, io = "list", []
        raw_layers = [r for r in doc if not (isinstance(r, dict) and set(r) <= {"count"})]
    else:
        raise InputError(f"{source} is a JSON {type(doc).__name__}; expected the engine inspector's object with \"Layers\"")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise InputError(f"{source} has no layers; was the engine built? (\"Layers\" must be a non-empty list)")
    names_only = all(isinstance(r, str) for r in raw_layers)
    if names_only and schema != "list":
        schema = "names-only"
    layers = [_layer(r, source) for r in raw_layers]
    layers = [l for l in layers if l.layer_type.lower() not in ("signal", "wait")]
    if profile:
        tag = re.compile(rf"\[profile +{profile}\]")
        layers = [l for l in layers if tag.search(l.name)]
        io = [n for n in io if tag.search(n)]
    else:
        layers = [l for l in layers if not _PROFILE_RE.search(l.name)]
        io = [n for n in io if not _PROFILE_RE.search(n)]
    if not layers:
        raise InputError(f"{source} has no layers for optimisation profile {profile}")
    detailed = not names_only and any(l.layer_type or l.inputs for l in layers)
    return EngineLayers(tuple(layers), tuple(io), schema, detailed)


def load_layer_info(path: str | os.PathLike[str], profile: int = 0) -> EngineLayers:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"layer information file {p} not found; write one with `trtexec --loadEngine=PLAN "
                         "--exportLayerInfo=FILE --profilingVerbosity=detailed` or `resdeploy fusion PLAN`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"layer information file {p} is unreadable: {exc}") from None
    return parse_layer_info(text, source=str(p), profile=profile)


# -- the report ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddFusion:
    """Where one residual Add ended up in the engine."""

    add: str  # the Add's name (ONNX node name)
    layer: str  # engine layer that runs it ("" when not found)
    layer_type: str
    status: str  # "fused" (into a conv) | "standalone" (its own elementwise/pointwise layer) | "myelin" | "not-found"
    conv: str = ""  # the conv constituent that absorbed the Add
    conv_role: str = ""  # "branch" | "projection" | "unknown" ("" when not fused into a conv)
    tactic: str = ""
    dtype: str = ""  # output dtype(s) of the engine layer
    input_dtypes: tuple[str, ...] = ()
    kind: str = ""  # identity | projection | pooled | option_a, from the skip-add check (with --onnx)
    block: str = ""
    warning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"add": self.add, "layer": self.layer, "layer_type": self.layer_type, "status": self.status,
                "conv": self.conv, "conv_role": self.conv_role, "tactic": self.tactic, "dtype": self.dtype,
                "input_dtypes": list(self.input_dtypes), "kind": self.kind, "block": self.block, "warning": self.warning}


@dataclass(frozen=True)
class FusionReport:
    source: str
    schema: str
    detailed: bool
    layer_count: int
    reformat_count: int
    dtype_counts: dict[str, int]
    adds: tuple[AddFusion, ...]
    io_tensors: tuple[str, ...] = ()
    mapped_from_onnx: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fused_count(self) -> int:
        return sum(a.status == "fused" for a in self.adds)

    @property
    def standalone_count(self) -> int:
        return sum(a.status == "standalone" for a in self.adds)

    @property
    def all_fused(self) -> bool:
        return bool(self.adds) and self.fused_count == len(self.adds)

    @property
    def warnings(self) -> list[str]:
        return [f"{a.add}: {a.warning}" for a in self.adds if a.warning]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "schema": self.schema, "detailed": self.detailed, "layer_count": self.layer_count,
                "reformat_count": self.reformat_count, "dtype_counts": dict(self.dtype_counts),
                "io_tensors": list(self.io_tensors), "mapped_from_onnx": self.mapped_from_onnx,
                "residual_adds": len(self.adds), "fused": self.fused_count, "standalone": self.standalone_count,
                "adds": [a.to_dict() for a in self.adds], "warnings": self.warnings, "notes": list(self.notes)}

    def __str__(self) -> str:
        dts = ", ".join(f"{k} {v}" for k, v in sorted(self.dtype_counts.items()))
        lines = [f"TensorRT fusion report: {self.source}",
                 f"  {self.layer_count} engine layers ({self.reformat_count} reformat), by output dtype: {dts or '-'}; "
                 f"schema {self.schema}; residual Adds {'from the ONNX skip-add check' if self.mapped_from_onnx else 'from layer names'}",
                 f"  {len(self.adds)} residual Adds: {self.fused_count} fused into a convolution, "
                 f"{self.standalone_count} standalone, {len(self.adds) - self.fused_count - self.standalone_count} other"]
        if self.adds:
            w_add = max(4, *(len(a.add) for a in self.adds))
            w_layer = min(60, max(5, *(len(a.layer) for a in self.adds)))
            lines.append(f"  {'#':>2}  {'add':<{w_add}}  {'status':<10} {'conv':<10} {'dtype':<10} {'engine layer':<{w_layer}}  type / tactic")
            for i, a in enumerate(self.adds):
                layer = a.layer if len(a.layer) <= w_layer else a.layer[: w_layer - 3] + "..."
                tactic = f" / {a.tactic[:40]}" if a.tactic else ""
                lines.append(f"  {i:>2}  {a.add:<{w_add}}  {a.status:<10} {a.conv_role or '-':<10} {a.dtype or '?':<10} "
                             f"{layer or '-':<{w_layer}}  {a.layer_type or '?'}{tactic}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def _attr(obj: Any, name: str, default: Any = "") -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class _Graph:
    """Producer/consumer view of the engine layers (reformat copies included) for ancestry questions."""

    def __init__(self, layers: Sequence[EngineLayer]) -> None:
        self.producer: dict[str, EngineLayer] = {}
        for layer in layers:
            for t in layer.outputs:
                self.producer.setdefault(t.name, layer)

    def is_ancestor(self, tensor: str, of_tensor: str, limit: int = 256) -> bool:
        """True when ``tensor`` is computed before ``of_tensor`` on some path (``of_tensor`` depends on it)."""
        seen, stack = set(), [of_tensor]
        while stack and len(seen) < limit:
            t = stack.pop()
            if t == tensor:
                return True
            if t in seen:
                continue
            seen.add(t)
            layer = self.producer.get(t)
            if layer is not None:
                stack.extend(i.name for i in layer.inputs)
        return False


def _structural_role(layer: EngineLayer, graph: _Graph) -> str:
    """Branch or projection conv, from the engine graph alone.

    A conv fused with an Add has the conv's data as input 0 and the Add's other operand as input 1. When the
    conv's own input is an ancestor of that operand, the operand was computed from the same block input (it is
    the branch's output) and this conv is the projection; otherwise this conv ends the branch."""
    hint = " ".join(layer.constituents).lower()
    if any(h in hint for h in _PROJECTION_HINTS):
        return "projection"
    if len(layer.inputs) >= 2:
        data, other = layer.inputs[0].name, layer.inputs[1].name
        return "projection" if graph.is_ancestor(data, other) else "branch"
    return "unknown"


def _onnx_conv_for(graph: Any, tensor: str) -> str:
    """Name of the Conv/Gemm that produces ``tensor`` in an ONNX graph, looking through BN / Q / DQ / Cast."""
    if graph is None or not tensor:
        return ""
    producer = {o: n for n in graph.node for o in n.output}
    for _ in range(8):
        node = producer.get(tensor)
        if node is None:
            return ""
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            return node.name
        if node.op_type not in _QDQ_PASSTHROUGH or not node.input:
            return ""
        tensor = node.input[0]
    return ""


def _classify(add: str, layer: EngineLayer | None, graph: _Graph, branch_conv: str = "", projection_conv: str = "",
              kind: str = "", block: str = "") -> AddFusion:
    if layer is None:
        return AddFusion(add, "", "", "not-found", kind=kind, block=block,
                         warning="no engine layer is named after this Add: it may sit inside a Myelin region "
                                 "({ForeignNode[...]}) or have been renamed; build with ProfilingVerbosity.DETAILED "
                                 "and check the layer names")
    common = dict(layer_type=layer.layer_type or layer.parameter_type, tactic=layer.tactic, dtype=layer.dtype,
                  input_dtypes=layer.input_dtypes, kind=kind, block=block)
    convs = [c for c in layer.constituents if is_conv_name(c) and not c.endswith((".weight", ".bias"))]
    if layer.is_conv or (not layer.layer_type and convs):
        role, conv = "unknown", convs[-1] if convs else ""
        if branch_conv and branch_conv in layer.constituents:
            role, conv = "branch", branch_conv
        elif projection_conv and projection_conv in layer.constituents:
            role, conv = "projection", projection_conv
        elif layer.inputs:
            role = _structural_role(layer, graph)
        else:
            hint = " ".join(layer.constituents).lower()
            role = "projection" if any(h in hint for h in _PROJECTION_HINTS) else "unknown"
        return AddFusion(add, layer.name, status="fused", conv=conv, conv_role=role, **common)
    if layer.is_myelin:
        return AddFusion(add, layer.name, status="myelin", **common,
                         warning="runs inside a Myelin region: TensorRT's own compiler decides its fusion; check the "
                                 "region's kernels with the profiler")
    return AddFusion(add, layer.name, status="standalone", **common,
                     warning=f"runs as a standalone {layer.layer_type or 'elementwise'} layer (not fused into a "
                             "convolution): an extra read and write of the activation; check that the branch ends in "
                             "a Conv(+BN) with no op between it and the Add")


def fusion_report(layers: EngineLayers, residual_adds: Iterable[Any] | None = None, onnx_model: Any = None,
                  source: str = "") -> FusionReport:
    """Report where each residual Add went.

    ``residual_adds``: the skip-add check's ``ResidualAdd`` records (``node``, ``branch_input``,
    ``shortcut_input``, ``kind``, ``block``; objects or dicts); ``None`` = every Add-named constituent of a
    (non-reformat) layer is a candidate. ``onnx_model``: the ``onnx.ModelProto`` the adds came from, used to
    name the conv that ends the branch and the projection conv.
    """
    real = [l for l in layers.layers if not l.is_reformat]
    graph = _Graph(layers.layers)
    owner: dict[str, EngineLayer] = {}
    for layer in real:
        for c in layer.constituents:
            owner.setdefault(c, layer)
    notes: list[str] = []
    fusions: list[AddFusion] = []
    onnx_graph = getattr(onnx_model, "graph", None)
    if residual_adds is None:
        for layer in real:
            for c in layer.constituents:
                if is_add_name(c):
                    fusions.append(_classify(c, layer, graph))
        if any(l.is_myelin for l in real):
            notes.append("the engine has Myelin regions ({ForeignNode[...]}) whose inner nodes are not named; pass "
                         "--onnx MODEL.onnx to look every residual Add up")
        notes.append("without --onnx every Add-named node is taken as a residual Add")
    else:
        for ra in residual_adds:
            node = str(_attr(ra, "node"))
            branch_conv = _onnx_conv_for(onnx_graph, str(_attr(ra, "branch_input")))
            projection_conv = _onnx_conv_for(onnx_graph, str(_attr(ra, "shortcut_input")))
            fusions.append(_classify(node, owner.get(node), graph, branch_conv, projection_conv,
                                     kind=str(_attr(ra, "kind")), block=str(_attr(ra, "block"))))
    if not layers.detailed:
        notes.append("the layer information has names only (no types, dtypes or tactics): build with "
                     "ProfilingVerbosity.DETAILED (`--profilingVerbosity=detailed`) for the full report")
    dtype_counts = Counter(l.dtype for l in layers.layers) if layers.detailed else Counter()
    return FusionReport(source=source, schema=layers.schema, detailed=layers.detailed, layer_count=len(layers.layers),
                        reformat_count=sum(l.is_reformat for l in layers.layers), dtype_counts=dict(dtype_counts),
                        adds=tuple(fusions), io_tensors=layers.io_tensors, mapped_from_onnx=residual_adds is not None,
                        notes=tuple(notes))


__all__ = ["AddFusion", "EngineLayer", "EngineLayers", "FusionReport", "TensorInfo", "constituent_names", "fusion_report",
           "is_add_name", "load_layer_info", "normalize_dtype", "parse_layer_info"]
