"""ONNX Runtime build: the optimised graph saved beside the model, and a fusion report of its residual Adds.

ONNX Runtime optimises a graph at session creation. At ``all`` on x86 the NCHWc layout transformer rewrites
convolutions into ``com.microsoft.nchwc.Conv``, which can take a fourth "Sum" input: a residual Add (and the
Relu after it) absorbed into the conv. ``FusedConv`` with a ``Z`` input is the same idea in NCHW. For Q/DQ INT8
models the QDQ transformer turns DQ->Add->Q into ``QLinearAdd``, an integer Add kernel. The report says, for
every residual Add of the *source* graph, which of these happened. The caller says which Adds are residual
(``adds``: the pipeline passes the short-path check's finder, :func:`resdeploy.export.precision.residual_adds`);
this module only maps them onto the optimised graph.

Mapping source Adds to optimised nodes relies on two naming facts of ONNX Runtime (checked in the tests):
a node that survives or is converted (Add, QLinearAdd) keeps its node name, and an NCHWc conv is named after
the output tensor of the conv it replaced (``<conv output>_nchwc``, with ``InsertedPrecisionFreeCast_`` in front
when the CPU provider wrapped a float16 graph in casts). An Add that cannot be attributed is reported as
``unknown``, never guessed.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from resdeploy import atomic
from resdeploy.errors import BackendUnavailable, CheckFailed, InputError
from resdeploy.artifact import copy_onnx, external_tensors, load_onnx, precision_of, read_metadata

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
SEE_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity"}
NAME_PREFIXES = ("InsertedPrecisionFreeCast_",)  # the CPU EP's float16 wrapping casts
NAME_SUFFIXES = ("_nchwc",)
MODEL_NAME = "model.onnx"
OPTIMIZED_NAME = "model.optimized.onnx"
REPORT_JSON = "fusion_report.json"
REPORT_TXT = "fusion_report.txt"
BUILD_JSON = "build.json"

FUSED_FORMS = ("conv_sum", "qlinear_add")  # an Add inside a conv, or an integer Add kernel with its Q/DQ absorbed


class SourceAdd(Protocol):
    """A residual Add of the source graph, as the caller found it (``resdeploy.export.precision.AddRef``)."""

    name: str  # node name
    output: str  # output tensor
    inputs: tuple[str, str]  # its two inputs as written in the graph
    kind: str  # identity | projection | pooled | option_a ("" when unclassified)
    block: str  # module path of the block when known


@dataclass(frozen=True)
class AddFusion:
    """What ONNX Runtime did with one residual Add of the source graph."""

    node: str  # source Add node
    output: str  # source Add output tensor
    kind: str  # identity | projection | pooled | option_a ("" when unclassified)
    block: str
    form: str  # conv_sum | qlinear_add | standalone | unknown
    into: str = ""  # optimised node that computes it
    op: str = ""  # that node's domain:op
    activation: str = ""  # activation fused with it (Relu) when the node says so

    @property
    def fused(self) -> bool:
        return self.form in FUSED_FORMS


@dataclass(frozen=True)
class FusionReport:
    model: str
    precision: str
    optimization: str
    adds: tuple[AddFusion, ...]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    bn_folded: int  # BatchNormalization nodes gone (folded into convs)
    conv_activation_fused: int  # convs carrying a fused activation (FusedConv / NCHWc Conv activation=Relu)
    nchwc_nodes: int
    qlinear_nodes: int
    notes: tuple[str, ...] = ()

    @property
    def fused(self) -> int:
        return sum(a.fused for a in self.adds)

    @property
    def standalone(self) -> int:
        return sum(a.form == "standalone" for a in self.adds)

    @property
    def unknown(self) -> int:
        return sum(a.form == "unknown" for a in self.adds)

    def by_form(self) -> dict[str, int]:
        return dict(Counter(a.form for a in self.adds))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adds"] = [{**asdict(a), "fused": a.fused} for a in self.adds]
        d["summary"] = {"residual_adds": len(self.adds), "fused": self.fused, "standalone": self.standalone,
                        "unknown": self.unknown, "by_form": self.by_form()}
        return d

    def __str__(self) -> str:
        lines = [f"ONNX Runtime fusion report of {self.model} ({self.precision}, optimization {self.optimization}): "
                 f"{self.fused}/{len(self.adds)} residual Adds fused, {self.standalone} standalone"
                 + (f", {self.unknown} unknown" if self.unknown else ""),
                 f"{'#':>3}  {'source Add':<28} {'shortcut':<10} {'form':<12} {'activation':<10} optimised node"]
        for i, a in enumerate(self.adds):
            lines.append(f"{i:>3}  {(a.block or a.node)[:28]:<28} {a.kind or '?':<10} {a.form:<12} "
                         f"{a.activation or '-':<10} {a.op + ' ' if a.op else ''}{a.into or '-'}")
        lines.append(f"BN folded: {self.bn_folded}; conv+activation fused: {self.conv_activation_fused}; "
                     f"NCHWc nodes: {self.nchwc_nodes}; QLinear nodes: {self.qlinear_nodes}")
        changed = sorted(set(self.ops_before) | set(self.ops_after))
        diff = [f"{op} {self.ops_before.get(op, 0)}->{self.ops_after.get(op, 0)}" for op in changed
                if self.ops_before.get(op, 0) != self.ops_after.get(op, 0)]
        lines.append("node types changed: " + (", ".join(diff) or "none"))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _op_key(n: onnx.NodeProto) -> str:
    return f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def _attr(n: onnx.NodeProto, name: str) -> Any:
    for a in n.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return None


def _normalise(name: str) -> str:
    for p in NAME_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    for s in NAME_SUFFIXES:
        if name.endswith(s):
            name = name[: -len(s)]
    return name


def _sum_input(n: onnx.NodeProto) -> str:
    """The residual (Sum / Z) input of a conv that has one, else ''."""
    if n.op_type in ("Conv", "FusedConv", "NhwcFusedConv") and n.domain in ("com.microsoft.nchwc", "com.microsoft"):
        return n.input[3] if len(n.input) > 3 else ""
    return ""


def _source_keys(source: onnx.ModelProto, add: SourceAdd) -> set[str]:
    """Names an optimised conv absorbing ``add`` may carry: the tensors/nodes from each Add input back to its conv."""
    producer = {o: n for n in source.graph.node for o in n.output}
    keys: set[str] = set()
    for t in add.inputs:
        for _ in range(8):  # see through a few Q/DQ/Cast nodes only
            keys.add(t)
            n = producer.get(t)
            if n is None:
                break
            keys.add(n.name)
            if n.op_type not in SEE_THROUGH or not n.input:
                break
            t = n.input[0]
    return keys


def fusion_report(source: onnx.ModelProto, optimized: onnx.ModelProto, adds: Sequence[SourceAdd], *,
                  optimization: str = "all", name: str = "") -> FusionReport:
    """Classify each of ``adds`` (the residual Adds of ``source``) in ``optimized`` (the graph ONNX Runtime saved)."""
    by_name = {n.name: n for n in optimized.graph.node if n.name}
    by_output = {o: n for n in optimized.graph.node for o in n.output}
    sum_convs = [n for n in optimized.graph.node if _sum_input(n)]
    conv_keys = {id(n): {_normalise(n.name), *(_normalise(o) for o in n.output)} for n in sum_convs}
    claimed: dict[int, str] = {}
    notes: list[str] = []
    rows = []
    for a in adds:
        node = by_name.get(a.name) or by_output.get(a.output)
        form, into, op, act = "unknown", "", "", ""
        if node is not None and node.op_type in ("Add", "Sum"):
            form = "standalone"
        elif node is not None and node.op_type == "QLinearAdd":
            form = "qlinear_add"
        elif node is not None and _sum_input(node):
            form = "conv_sum"
        elif node is None:
            keys = _source_keys(source, a)
            hits = [n for n in sum_convs if conv_keys[id(n)] & keys]
            if len(hits) == 1:
                node, form = hits[0], "conv_sum"
            elif len(hits) > 1:
                notes.append(f"{a.name}: {len(hits)} convs with a sum input match its inputs ({', '.join(h.name for h in hits)}); "
                             "reported as unknown")
        if node is not None and form != "unknown":
            into, op = node.name or node.output[0], _op_key(node)
            act = str(_attr(node, "activation") or "")
            if form == "conv_sum":
                if id(node) in claimed:
                    notes.append(f"{a.name} and {claimed[id(node)]} both map to {into}; reported as unknown")
                    form, into, op, act = "unknown", "", "", ""
                else:
                    claimed[id(node)] = a.name
        rows.append(AddFusion(a.name, a.output, a.kind, a.block, form, into, op, act))
    unclaimed = [n.name for n in sum_convs if id(n) not in claimed]
    if unclaimed:
        notes.append(f"{len(unclaimed)} convs with a sum input matched no residual Add of the source "
                     f"(e.g. {unclaimed[0]}); the Add finder may have missed some")
    before = Counter(_op_key(n) for n in source.graph.node)
    after = Counter(_op_key(n) for n in optimized.graph.node)
    conv_act = sum(1 for n in optimized.graph.node if "Conv" in n.op_type and _attr(n, "activation"))
    nchwc = sum(1 for n in optimized.graph.node if n.domain == "com.microsoft.nchwc")
    qlinear = sum(1 for n in optimized.graph.node if n.op_type.startswith("QLinear") or n.op_type == "QGemm")
    if nchwc:
        notes.append("the optimised graph holds NCHWc nodes (com.microsoft.nchwc): it loads only on this CPU type; "
                     "other machines rebuild from model.onnx")
    forms = Counter(r.form for r in rows)
    if forms.get("qlinear_add"):
        notes.append("qlinear_add: the Add runs as ORT's integer QLinearAdd kernel with its Q/DQ absorbed (ORT's CPU "
                     "QLinearConv has no sum input, so this is the INT8 form of a fused residual Add)")
    if read_metadata(source).int8_flavour == "s8s8" and forms.get("standalone"):
        notes.append("s8s8 is the TensorRT flavour: ONNX Runtime's CPU QDQ fusions keep its Relu-followed convs and "
                     "Adds in float; build the u8s8 variant (`resdeploy quantize --backend onnxruntime`) for this engine")
    if any(n.name.startswith(NAME_PREFIXES) for n in optimized.graph.node) and precision_of(source) == "fp16":
        notes.append("float16 model: this CPU provider has no float16 conv kernels here, so ONNX Runtime wrapped the "
                     "graph in casts and computes in float32 (no speed-up on CPU; FP16 is for GPU engines)")
    return FusionReport(name, precision_of(source), optimization, tuple(rows), dict(before), dict(after),
                        before.get("BatchNormalization", 0) - after.get("BatchNormalization", 0), conv_act, nchwc,
                        qlinear, tuple(notes))


@dataclass(frozen=True)
class OrtBuildReport:
    out_dir: Path
    model: Path
    optimized_model: Path
    fusion: FusionReport
    ort_version: str
    providers: tuple[str, ...]
    optimization: str
    threads: int | None
    precision: str
    int8_flavour: str | None
    max_abs_diff: float  # optimised session vs un-optimised reference on the sample
    rel_diff: float  # max_abs_diff / max |reference|
    seconds: float
    build: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        fl = f" ({self.int8_flavour})" if self.int8_flavour else ""
        return (f"onnxruntime {self.ort_version} build of {self.precision}{fl} model in {self.out_dir}: "
                f"{self.providers[0]}, optimization {self.optimization}, optimised graph {self.optimized_model.name}; "
                f"optimised vs reference max |diff| {self.max_abs_diff:.3g} (rel {self.rel_diff:.2g}); "
                f"{self.seconds:.1f} s\n{self.fusion}")


# Tolerance of the optimised graph against the un-optimised one: float kernels reorder sums; QLinear kernels round
# once per op where the Q/DQ reference computes in float, so INT8 logits may move by a few quantisation steps.
REL_TOL = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.15}


def _session(model: str | bytes, level: str, threads: int | None, provider: str, optimized_path: str | None = None,
             external_data: bool = False):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
        if external_data:  # a > 2 GB model's optimised graph must keep its weights outside the protobuf too
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        f"{Path(optimized_path).name}.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.log_severity_level = 3
    wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {wanted} (available: {', '.join(available)}); "
                                 "install onnxruntime-gpu on a CUDA machine, or build with --provider cpu")
    providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
    try:
        sess = ort.InferenceSession(model, so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises Fail / InvalidGraph / NotImplemented
        raise CheckFailed(f"onnxruntime could not build a session: {exc}") from None
    got = sess.get_providers()
    if got[0] != wanted:  # ORT falls back to the CPU without saying so
        raise BackendUnavailable(f"onnxruntime asked for {wanted} but got {got}; check the CUDA/cuDNN libraries")
    return sess


def sample_input(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded standard-normal batch for the model's one float input (dynamic dims other than batch refused)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"the model has {len(inputs)} inputs; give a sample feed for multi-input models")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise InputError(f"input {inputs[0].name!r} has dynamic dims {dims} besides the batch; pass a sample")
    x = np.random.default_rng(seed).standard_normal((batch, *dims[1:])).astype(np.float32)
    return {inputs[0].name: x}


def build_onnxruntime(model_path: str | Path, out_dir: str | Path, *, adds: Sequence[SourceAdd],
                      threads: int | None = None, optimization: str = "all", provider: str = "cpu",
                      sample: dict[str, np.ndarray] | None = None, build_info: dict[str, Any] | None = None) -> OrtBuildReport:
    """Copy the model into ``out_dir``, save ONNX Runtime's optimised graph beside it, write the fusion report of
    ``adds`` (the model's residual Adds, found by the caller).

    Checks before anything lands in ``out_dir``: the optimised session matches an un-optimised one on ``sample``
    (a seeded random batch if None) within the precision's tolerance, and the saved optimised graph loads and
    gives the optimised session's outputs. Writes model.onnx, model.optimized.onnx, fusion_report.json/.txt and
    build.json (``build_info`` entries are added to build.json: what the caller did to the model before).
    """
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"optimization {optimization!r} unknown; use one of {', '.join(OPTIMIZATION_LEVELS)}")
    if provider not in ("cpu", "cuda"):
        raise InputError(f"provider {provider!r} unknown for the onnxruntime build; use cpu or cuda "
                         "(TensorRT engines are built with --backend tensorrt)")
    t0 = time.perf_counter()
    src_path = Path(model_path)
    source = load_onnx(src_path)
    external = bool(external_tensors(source))
    # A model with external data is opened by path (ORT reads its weights beside it; checked by load_onnx first).
    model_bytes: str | bytes = str(src_path) if external else src_path.read_bytes()
    feed = sample if sample is not None else sample_input(source)
    precision = precision_of(source)
    meta = read_metadata(source, str(src_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as tmp:
        opt_tmp = Path(tmp) / OPTIMIZED_NAME
        sess = _session(model_bytes, optimization, threads, provider, str(opt_tmp), external)
        providers = tuple(sess.get_providers())
        got = sess.run(None, feed)
        ref = _session(model_bytes, "disable", threads, "cpu").run(None, feed)
        max_abs, rel = _diff(ref, got)
        tol = REL_TOL.get(precision, 1e-3)
        if not rel <= tol:
            raise CheckFailed(f"the optimised {precision} graph of {src_path} differs from the un-optimised one: max |diff| "
                              f"{max_abs:.3g}, relative {rel:.3g} > {tol}; an ONNX Runtime rewrite changed the result "
                              "(try --optimization extended to locate it)")
        if not opt_tmp.is_file():
            raise CheckFailed(f"onnxruntime did not write the optimised graph to {opt_tmp}")
        reloaded = _session(str(opt_tmp), "disable", threads, provider).run(None, feed)
        rmax, rrel = _diff(got, reloaded)
        if not rrel <= 1e-5:
            raise CheckFailed(f"the saved optimised graph does not reproduce the session it came from (max |diff| {rmax:.3g})")
        optimized = load_onnx(opt_tmp)
        fusion = fusion_report(source, optimized, adds, optimization=optimization, name=src_path.name)
        build = {
            "format": "resdeploy-ort-build/1",
            "source": str(src_path), "model": MODEL_NAME, "optimized_model": OPTIMIZED_NAME,
            "model_sha256": atomic.sha256_file(src_path), "optimized_sha256": atomic.sha256_file(opt_tmp),
            "precision": precision, "int8_flavour": meta.int8_flavour or None,
            "onnxruntime": ort.__version__, "providers": list(providers),
            "options": {"optimization": optimization, "threads": threads, "provider": provider},
            "optimized_portable": fusion.nchwc_nodes == 0,
            "optimized_note": ("holds NCHWc nodes: load it only on this CPU type (" + _cpu() + "); elsewhere load "
                               "model.onnx and let ONNX Runtime optimise at startup") if fusion.nchwc_nodes else "",
            "machine": _cpu(),
            "verification": {"max_abs_diff": max_abs, "rel_diff": rel, "tolerance": tol,
                             "sample_shape": [list(v.shape) for v in feed.values()]},
            "residual_adds": {"total": len(fusion.adds), "fused": fusion.fused, "standalone": fusion.standalone,
                              "unknown": fusion.unknown},
            "metadata": meta.to_props(),
            **(build_info or {}),
        }
        copy_onnx(src_path, Path(tmp) / MODEL_NAME)  # with its external data, if any
        atomic.write_json(Path(tmp) / REPORT_JSON, fusion.to_dict())
        atomic.write_text(Path(tmp) / REPORT_TXT, str(fusion) + "\n")
        atomic.write_json(Path(tmp) / BUILD_JSON, build)
        data_files = sorted(f.name for f in Path(tmp).iterdir() if f.name.endswith(".data"))
        for name in (*data_files, MODEL_NAME, OPTIMIZED_NAME, REPORT_JSON, REPORT_TXT, BUILD_JSON):  # build.json last: it marks done
            os.replace(Path(tmp) / name, out / name)
    return OrtBuildReport(out, out / MODEL_NAME, out / OPTIMIZED_NAME, fusion, ort.__version__, providers, optimization,
                          threads, precision, meta.int8_flavour or None, max_abs, rel, time.perf_counter() - t0, build)


def _diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    max_abs = max(float(np.max(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)))) for r, g in zip(ref, got))
    scale = max(float(np.max(np.abs(r))) for r in ref) or 1.0
    return max_abs, max_abs / scale


def _cpu() -> str:
    return f"{platform.machine()} {platform.processor() or ''}".strip()
