"""PyTorch -> ONNX export that verifies itself before the file appears at its final path.

Order of work: export in memory (dynamo by default, TorchScript selectable) -> fold what BatchNorm the
exporter left (a BN not directly after a conv, as in the pre-activation net, becomes an exact per-channel
Mul+Add) -> make it deterministic (drop machine-specific stack traces and doc strings) -> attach metadata ->
write to a temp path beside the target -> ``onnx.checker`` (full check), strict shape inference, I/O and
opset checks -> parity against PyTorch through ONNX Runtime CPU -> atomic rename. A failed check raises
:class:`~resdeploy.errors.CheckFailed` and leaves any previous file untouched.

This module never imports ``resdeploy.models``: it takes an ``nn.Module`` and plain metadata.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from resdeploy import atomic
from resdeploy.artifact import EXTERNAL_DATA_THRESHOLD, ArtifactMetadata, load_onnx, parse_onnx, read_metadata, save_onnx, staged_onnx, write_metadata
from resdeploy.errors import CheckFailed, InputError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
_DROP_NODE_META = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")  # absolute paths: not reproducible


@dataclass(frozen=True)
class ExportConfig:
    exporter: Literal["dynamo", "torchscript"] = "dynamo"  # torch.onnx.export(dynamo=True) or the TorchScript exporter
    # 18: the lowest opset the dynamo exporter writes (it turns 17 into 18 and its down-conversion fails on
    # Reduce/Pad); ONNX Runtime >= 1.14 and TensorRT 10/11 parse it.
    opset: int = 18
    dynamic_batch: bool = True  # batch axis named "batch"; C, H, W stay static
    fold_bn: bool = True  # no BatchNormalization node may remain in the written graph
    atol: float = 1e-4  # FP32 parity gate: max |onnx - torch| on the logits
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # weights over this many bytes go to <name>.data
    parity_images: int = 16  # held-out images used for parity (fewer if fewer are given)


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_err: float
    max_rel_err: float  # max |onnx - torch| / max |torch|
    top1_agreement: float  # fraction of images whose arg-max agrees
    inputs: str  # "real images" or "seeded random inputs"

    def __bool__(self) -> bool:
        return self.top1_agreement == 1.0

    def __str__(self) -> str:
        return (f"parity on {self.images} {self.inputs}: max abs err {self.max_abs_err:.3g}, max rel err "
                f"{self.max_rel_err:.3g}, top-1 agreement {self.top1_agreement:.1%}")


@dataclass(frozen=True)
class ExportReport:
    path: Path
    sha256: str
    exporter: str
    opset: int  # the default-domain opset actually written
    opset_requested: int
    nodes: int
    op_counts: dict[str, int]
    parity: Parity
    external_data: bool
    size_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.parity)

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        lines = [f"exported {self.path} ({self.size_bytes / 1e6:.2f} MB{', external data' if self.external_data else ''}) "
                 f"with the {self.exporter} exporter, opset {self.opset}" +
                 (f" (requested {self.opset_requested})" if self.opset != self.opset_requested else ""),
                 f"  {self.nodes} nodes: {ops}", f"  {self.parity}", f"  sha256 {self.sha256}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _torch_export(model: Any, example: Any, config: ExportConfig) -> onnx.ModelProto:
    import logging

    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=config.opset)
    # The exporters log progress and deprecation notes at WARNING, and internal tracebacks at ERROR before they
    # raise; none of it is actionable for the user (a failure becomes one InputError naming the op and the fix).
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        return _run_exporter(model, example, config, kwargs)
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _run_exporter(model: Any, example: Any, config: ExportConfig, kwargs: dict[str, Any]) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if config.exporter == "dynamo":
            if config.dynamic_batch:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
            prog = torch.onnx.export(model, (example,), dynamo=True, optimize=True, verbose=False, **kwargs)
            proto = prog.model_proto
        elif config.exporter == "torchscript":
            if config.dynamic_batch:
                kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
            buf = io.BytesIO()
            torch.onnx.export(model, (example,), buf, dynamo=False, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.EVAL, **kwargs)
            proto = parse_onnx(buf.getvalue(), "the TorchScript exporter's output")
        else:
            raise InputError(f"unknown exporter {config.exporter!r}; use 'dynamo' or 'torchscript'")
    return proto


_OP_PATTERNS = (
    re.compile(r"(?:torch\.ops\.)?aten(?:::|\.)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?"),  # aten ops, both exporters
    re.compile(r"operator '([^']+)'"),  # the TorchScript exporter's "Exporting the operator 'x' ... not supported"
    re.compile(r"target=([A-Za-z0-9_.:]+)"),  # an FX node the dynamo exporter could not translate
)
# What torch.export says when the batch axis cannot stay dynamic (the model fixes or guards on it).
_DYNAMIC_SHAPE_SIGNS = ("Constraints violated", "specializ", "is inconsistent", "dynamic_shapes")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Loggers that print the exporter's internal tracebacks at ERROR before it raises: the InputError says it all.
_NOISY_LOGGERS = ("torch.onnx", "torch._guards", "torch._dynamo", "torch.export", "torch._export",
                  "torch.fx.experimental.symbolic_shapes")


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and those it was raised from, outermost first (the exporters wrap the real cause)."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def exporter_failure(exc: BaseException, config: ExportConfig) -> str:
    """One message for an exporter failure: the op that failed (when the exporter names one), the innermost cause,
    and the fixes (the other exporter; a fixed batch when the batch axis could not stay dynamic)."""
    chain = _chain(exc)
    text = _ANSI.sub("", "\n".join(f"{type(e).__name__}: {e}" for e in chain))
    op = next((m.group(1) if m.groups() else m.group(0) for pat in _OP_PATTERNS if (m := pat.search(text))), None)
    cause = chain[-1]
    first = next((ln.strip() for ln in _ANSI.sub("", str(cause)).splitlines() if ln.strip()), "")
    fixes = []
    if config.dynamic_batch and any(sign in text for sign in _DYNAMIC_SHAPE_SIGNS):
        fixes.append("export a fixed batch of 1 (--static-batch, ExportConfig(dynamic_batch=False))")
    fixes.append(f"try the other exporter (--exporter {'torchscript' if config.exporter == 'dynamo' else 'dynamo'})")
    if config.dynamic_batch and len(fixes) == 1:
        fixes.append("or a fixed batch (--static-batch)")
    where = f"at op {op}" if op else "(its error names no op)"
    return (f"the {config.exporter} exporter failed {where}: {type(cause).__name__}: {first[:300].rstrip('.')}. Fix: "
            + "; ".join(fixes) + "; or rewrite that part of the model's forward")


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Rewrite each inference BatchNormalization the exporter left as an exact per-channel Mul + Add.

    Conv->BN pairs are already folded by the exporters (dynamo's optimizer, TorchScript's constant folding);
    what remains is a BN on a non-conv input (pre-activation nets), which no conv can absorb. Returns how many.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out_nodes: list[onnx.NodeProto] = []
    count = 0
    for n in g.node:
        if n.op_type != "BatchNormalization" or len([o for o in n.output if o]) != 1 or \
                not all(i in inits for i in n.input[1:5]):
            out_nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in n.input[1:5])
        a = scale / np.sqrt(var + eps)
        b = bias - mean * a
        base = n.output[0]
        a_name, b_name, mid = f"{base}_bn_scale", f"{base}_bn_shift", f"{base}_bn_scaled"
        g.initializer.extend([numpy_helper.from_array(a.astype(np.float32).reshape(-1, 1, 1), a_name),
                              numpy_helper.from_array(b.astype(np.float32).reshape(-1, 1, 1), b_name)])
        name = n.name or base
        out_nodes.append(onnx.helper.make_node("Mul", [n.input[0], a_name], [mid], name=f"{name}_scale"))
        out_nodes.append(onnx.helper.make_node("Add", [mid, b_name], [n.output[0]], name=f"{name}_shift"))
        count += 1
    if count:
        del g.node[:]
        g.node.extend(out_nodes)
        used = {i for nd in g.node for i in nd.input}
        keep = [t for t in g.initializer if t.name in used or t.name in {o.name for o in g.output}]
        del g.initializer[:]
        g.initializer.extend(keep)
    return count


def _make_deterministic(model: onnx.ModelProto) -> None:
    model.doc_string = ""
    model.graph.doc_string = ""
    for n in model.graph.node:
        n.doc_string = ""
        keep = [p for p in n.metadata_props if p.key not in _DROP_NODE_META]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)


def _set_metadata(model: onnx.ModelProto, metadata: ArtifactMetadata | None) -> None:
    """The artifact's metadata; keys the exporter itself wrote (unknown to resdeploy) are kept in ``extra``."""
    own = read_metadata(model, "the exported graph")
    write_metadata(model, replace(metadata, extra={**own.extra, **metadata.extra}) if metadata else own)


def verify_graph(path: Path, *, fold_bn: bool, dynamic_batch: bool, opset: int) -> onnx.ModelProto:
    """Checker (full), strict shape inference, named I/O, batch axis, opset and BN folding of a written file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"onnx.checker rejects {path}: {str(exc).splitlines()[0]}; the exporter wrote an invalid "
                          "graph, try --exporter torchscript or another opset") from None
    proto = load_onnx(path)
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - InferenceError and friends
        raise CheckFailed(f"strict shape inference fails on {path}: {str(exc).splitlines()[0]}") from None
    g = proto.graph
    inits = {t.name for t in g.initializer}
    ins = [i for i in g.input if i.name not in inits]
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in g.output] != [OUTPUT_NAME]:
        raise CheckFailed(f"{path} has inputs {[i.name for i in ins]} and outputs {[o.name for o in g.output]}; "
                          f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
    if dynamic_batch:
        for vi in (ins[0], g.output[0]):
            d0 = vi.type.tensor_type.shape.dim[0]
            if d0.HasField("dim_value") or not d0.dim_param:
                raise CheckFailed(f"{path}: {vi.name} has a fixed batch axis ({d0.dim_value}); expected a dynamic one")
    written = default_opset(proto)
    if written != opset:
        raise CheckFailed(f"{path} declares opset {written}; {opset} was requested and is what consumers were promised")
    if fold_bn:
        left = [n.name for n in g.node if n.op_type == "BatchNormalization"]
        if left:
            raise CheckFailed(f"{path} still has {len(left)} BatchNormalization nodes ({', '.join(left[:3])}); "
                              "expected all folded")
    return proto


def check_parity(path: Path, model: Any, images: np.ndarray, *, inputs: str = "real images",
                 batch: int | None = None) -> Parity:
    """Logits of the ONNX file (ONNX Runtime CPU) vs the PyTorch module on ``images``."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"ONNX Runtime cannot load {path}: {exc}") from None
    x = np.ascontiguousarray(images, np.float32)
    step = batch or len(x)
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + step]})[0] for i in range(0, len(x), step)]
    got = np.concatenate(outs)
    with torch.no_grad():  # in the same batches: a static-batch model may only run batch 1 in PyTorch too
        ref = np.concatenate([model(torch.from_numpy(x[i:i + step])).detach().cpu().numpy()
                              for i in range(0, len(x), step)])
    if got.shape != ref.shape:
        raise CheckFailed(f"{path} returns logits of shape {got.shape}; PyTorch gives {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    return Parity(len(x), max_abs, max_rel, agree, inputs)


def export_onnx(
    model: Any,
    out: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int],
    metadata: ArtifactMetadata | None = None,
    sample: np.ndarray | None = None,
    config: ExportConfig = ExportConfig(),
) -> ExportReport:
    """Export ``model`` (an nn.Module, eval mode is enforced on a copy) to ``out`` and verify it.

    ``sample``: held-out real images, (N, C, H, W) float32 normalised as the model expects; None uses seeded
    random inputs (said so in the report). A dynamic batch axis is exported from a batch-2 example. Raises
    InputError when the exporter cannot export the model (naming the op and the fixes), CheckFailed when a check of
    the written graph fails; nothing is written then.
    """
    import torch

    out = Path(out)
    if out.suffix != ".onnx":
        raise InputError(f"output {out} should end in .onnx")
    if len(input_shape) != 3:
        raise InputError(f"input_shape {input_shape} must be (C, H, W)")
    ref = copy.deepcopy(model).eval()
    if sample is None:
        images = np.random.default_rng(0).standard_normal((config.parity_images, *input_shape)).astype(np.float32)
        kind = "seeded random inputs"
    else:
        images = np.asarray(sample, np.float32)[:config.parity_images]
        kind = "real images"
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
            raise InputError(f"sample images have shape {images.shape}; expected (N, {', '.join(map(str, input_shape))})")
    # A dynamic batch is exported from a batch-2 example: from batch 1 torch.export specialises the axis to 1 and
    # the dynamic-shape constraint then fails on models that broadcast over it (ConvNeXt's layer scale).
    example = torch.from_numpy(np.ascontiguousarray(
        np.concatenate([images[:1], images[:1]]) if config.dynamic_batch and len(images) < 2
        else images[:2 if config.dynamic_batch else 1]))
    try:
        proto = _torch_export(ref, example, config)
    except (InputError, CheckFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        raise InputError(exporter_failure(exc, config)) from None
    notes: list[str] = []
    if config.fold_bn:
        n_bn = fold_batchnorm(proto)
        if n_bn:
            notes.append(f"{n_bn} BatchNormalization node(s) not preceded by a conv rewritten as exact Mul+Add")
    _make_deterministic(proto)
    _set_metadata(proto, metadata)
    written = default_opset(proto)
    if written != config.opset:
        raise CheckFailed(f"the {config.exporter} exporter wrote opset {written} although {config.opset} was requested "
                          f"(the dynamo exporter's minimum is 18); request --opset {written} or use --exporter torchscript")
    # Staged beside ``out``: the checks read the very files (model + <name>.data) that then move into place.
    with staged_onnx(out) as staged:
        save_onnx(proto, staged, threshold=config.external_data_threshold)
        external = staged.with_name(f"{out.name}.data").exists()
        verify_graph(staged, fold_bn=config.fold_bn, dynamic_batch=config.dynamic_batch, opset=config.opset)
        parity = check_parity(staged, ref, images, inputs=kind, batch=None if config.dynamic_batch else 1)
        if parity.max_abs_err > config.atol or parity.top1_agreement < 1.0:
            raise CheckFailed(f"export parity failed: {parity}; expected max abs err <= {config.atol:g} and 100% top-1 "
                              "agreement (FP32). Try the other exporter, or report the op that differs")
    final = load_onnx(out)
    ops: dict[str, int] = {}
    for n in final.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ExportReport(out, atomic.sha256_file(out), config.exporter, written, config.opset, len(final.graph.node), ops,
                        parity, external, out.stat().st_size + (out.with_name(f"{out.name}.data").stat().st_size if external else 0),
                        read_metadata(final, str(out)).to_props(), tuple(notes))
