"""Pipeline glue for ``resdeploy quantize``: FP32 ONNX -> FP16 or INT8 (Q/DQ) variant, accepted only when checked.

Order: read the model's input spec (the artifact's metadata, or the reference checkpoint) -> load the data module ->
calibrate on the val split (INT8) -> write the variant to a temp path beside the target -> the variant's own
graph check (precision module) -> the skip-add check (against the checkpoint when given) -> the accuracy gate on
the test split (FP16: top-1 agreement with FP32; INT8: accuracy drop) -> atomic rename. A failure leaves any
previous file untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import CheckFailed, InputError
from resdeploy.export.calibration import CalibrationSet
from resdeploy.artifact import load_onnx, open_artifact, staged_onnx
from resdeploy.export.precision import (
    FLAVOURS, Fp16Config, Int8Config, QuantizeReport, flavour_for_backend, flavour_reason, fp16_variant, precision_of,
    quantize_int8,
)


@dataclass
class QuantizeConfig:
    precision: str = "int8"  # fp16 | int8
    backend: str = "onnxruntime"  # the engine the variant is for: picks the INT8 flavour (onnxruntime/openvino u8s8, tensorrt s8s8)
    flavour: str | None = None  # force u8s8 | s8s8 instead of the backend's choice
    data: str = "mnist"  # data module source: calibration from its val split, the accuracy gate on its test split
    calibration_images: int = 500  # val images used to calibrate (MinMax settles after a few hundred)
    eval_images: int | None = None  # test images for the accuracy gate; None = the whole test split
    min_fp16_agreement: float = 0.995  # FP16 top-1 agreement with FP32 on the test split
    max_int8_drop: float = 1.0  # INT8 accuracy drop vs FP32 on the test split, in percentage points
    check_images: int = 2  # test images for the skip-add check's per-Add numeric comparison
    rewrite_option_a: bool = False  # first rewrite option-A shortcuts as exact 1x1 selection convs (lets ORT fuse them)
    threads: int | None = None  # ONNX Runtime intra-op threads for calibration and evaluation
    int8: Int8Config = field(default_factory=Int8Config)
    fp16: Fp16Config = field(default_factory=Fp16Config)


@dataclass(frozen=True)
class Accuracy:
    images: int
    fp32: float  # top-1 accuracy of the FP32 source
    variant: float  # top-1 accuracy of the variant
    agreement: float  # fraction of images where both predict the same class

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.fp32 - self.variant)

    def __str__(self) -> str:
        return (f"test split ({self.images} images): FP32 {self.fp32:.2%}, variant {self.variant:.2%} "
                f"(drop {self.drop_points:+.2f} points), top-1 agreement {self.agreement:.2%}")


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    precision: str
    flavour: str | None
    flavour_reason: str
    report: QuantizeReport
    skipadd: Any  # SkipAddReport
    accuracy: Accuracy | None
    gate: str  # the accuracy gate applied, in words
    rewrite: Any = None  # RewriteReport when option-A shortcuts were rewritten first

    def __bool__(self) -> bool:
        return bool(self.report) and bool(self.skipadd)

    def __str__(self) -> str:
        head = f"wrote {self.path} ({self.precision}" + (f", {self.flavour}" if self.flavour else "") + ")"
        lines = [head]
        if self.flavour:
            lines.append(f"  int8 flavour {self.flavour}: {self.flavour_reason}")
        if self.rewrite is not None:
            lines.append(f"  {self.rewrite}")
        lines.append(f"  {self.report}")
        if self.accuracy is not None:
            lines.append(f"  {self.accuracy}; gate: {self.gate}")
        lines.append("  " + str(self.skipadd).replace("\n", "\n  "))
        return "\n".join(lines)


def input_spec_of(onnx_path: str | Path, reference_info: Any = None) -> Any:
    """The model's InputSpec: from the checkpoint when given, else from the artifact's metadata."""
    if reference_info is not None:
        return reference_info.input_spec
    spec = open_artifact(onnx_path).metadata.input_spec
    if spec is None:
        raise InputError(f"{onnx_path} has no input spec in its metadata (mean/std for normalisation); export it with "
                         "`resdeploy export`, or pass --reference CHECKPOINT")
    return spec


def _predict(path: str | Path, images: np.ndarray, threads: int | None, batch: int = 256) -> np.ndarray:
    from resdeploy.serve.runners import open_runner

    out = []
    with open_runner(str(path), backend="onnxruntime", provider="cpu", threads=threads, optimization="all") as r:
        name = r.inputs[0].name
        for i in range(0, len(images), batch):
            logits = next(iter(r.infer({name: np.ascontiguousarray(images[i:i + batch])}).values()))
            out.append(np.asarray(logits).argmax(axis=1))
    return np.concatenate(out)


def evaluate(fp32_path: str | Path, variant_path: str | Path, images: np.ndarray, labels: np.ndarray,
             threads: int | None = None) -> Accuracy:
    """Top-1 accuracy of both models and their agreement, in ONNX Runtime CPU."""
    a = _predict(fp32_path, images, threads)
    b = _predict(variant_path, images, threads)
    return Accuracy(len(labels), float((a == labels).mean()), float((b == labels).mean()), float((a == b).mean()))


def quantize_model(model_path: str | Path, out: str | Path, *, config: QuantizeConfig | None = None,
                   reference: str | Path | Any | None = None) -> QuantizeResult:
    """``resdeploy quantize``: write the FP16/INT8 variant of an FP32 ONNX model, checked before it is accepted.

    ``reference``: the checkpoint folder the model was exported from, or the loaded model itself; the skip-add
    check compares the variant with it."""
    from resdeploy.models import load_data

    config = config or QuantizeConfig()
    if config.precision not in ("fp16", "int8"):
        raise InputError(f"precision {config.precision!r}: quantize writes fp16 or int8 (fp32 is the exported model itself)")
    src = Path(model_path)
    src_precision = precision_of(load_onnx(src))
    if src_precision != "fp32":
        raise InputError(f"{src} is already a {src_precision} variant; quantize the exported FP32 model")
    if Path(out).resolve() == src.resolve():
        raise InputError(f"--out {out} is the source model; write the variant to another file")
    ref_model = ref_info = None
    if isinstance(reference, (str, Path)):
        from resdeploy.models import load_checkpoint

        ref_model, ref_info = load_checkpoint(reference)
    elif reference is not None:  # an in-memory model (parity and bench on a random-weight net)
        ref_model = reference
    spec = input_spec_of(src, ref_info) if ref_info is not None or ref_model is None else ref_model.input_spec
    data = load_data(config.data)
    source_name = data.name
    if tuple(data.shape) != tuple(spec.shape):
        source_name = f"{data.name} resized to {'x'.join(map(str, spec.shape))}"
    flavour, reason = None, ""
    if config.precision == "int8":
        if config.flavour is not None:
            if config.flavour not in FLAVOURS:
                raise InputError(f"int8 flavour {config.flavour!r} unknown; use one of {', '.join(FLAVOURS)}")
            flavour, reason = config.flavour, "chosen explicitly"
            if config.flavour != flavour_for_backend(config.backend):
                reason += f" (note: {config.backend} prefers {flavour_for_backend(config.backend)})"
        else:
            flavour, reason = flavour_for_backend(config.backend), f"for {config.backend}: {flavour_reason(config.backend)}"
    extra_meta: dict[str, Any] = {}
    variant_src = src
    rewrite = None
    tmpdir = None
    if config.rewrite_option_a:
        import tempfile

        from resdeploy.artifact import external_tensors, save_onnx
        from resdeploy.export.shortcut_rewrite import rewrite_option_a

        external = bool(external_tensors(load_onnx(src)))
        rewritten, rewrite = rewrite_option_a(load_onnx(src, weights=True))
        tmpdir = tempfile.TemporaryDirectory(prefix="resdeploy-rewrite-")
        variant_src = Path(tmpdir.name) / src.name
        save_onnx(rewritten, variant_src, external_data=external)
        extra_meta = {"shortcut_rewrite": f"option_a_conv:{len(rewrite.rewritten)}",
                      "source_sha256": atomic.sha256_file(src)}
    try:
        result = _write_variant(src, variant_src, Path(out), config, data, spec, source_name, flavour, reason,
                                ref_model, extra_meta)
        return dataclasses.replace(result, rewrite=rewrite)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _write_variant(src: Path, variant_src: Path, out: Path, config: QuantizeConfig, data: Any, spec: Any,
                   source_name: str, flavour: str | None, reason: str, ref_model: Any,
                   extra_meta: dict[str, Any]) -> QuantizeResult:
    from resdeploy.export.shortpath import check_short_paths
    from resdeploy.models import normalize
    from resdeploy.models.data import fit_images

    test_x = normalize(fit_images(data.test.images[: config.eval_images], spec.shape), spec.mean, spec.std)
    test_y = data.test.labels[: config.eval_images]
    with staged_onnx(out) as tmp:  # model + <name>.data checked where they are, then moved into place
        if config.precision == "fp16":
            report = fp16_variant(variant_src, tmp, config=config.fp16, metadata=extra_meta)
        else:
            cal_x = fit_images(data.val.images[: config.calibration_images], spec.shape)
            cal = CalibrationSet(normalize(cal_x, spec.mean, spec.std), source_name, "val", data.fingerprint)
            report = quantize_int8(variant_src, tmp, cal, flavour=flavour, config=config.int8, metadata=extra_meta)
        sample = test_x[: config.check_images] if ref_model is not None and config.check_images > 0 else None
        skip = check_short_paths(tmp, ref_model, sample)  # the skip-add check for ResNets, unchanged
        skip = dataclasses.replace(skip, model=str(out))  # name the file being accepted, not its staging path
        if not skip:
            raise CheckFailed(f"the {config.precision} variant of {src} fails the skip-add check; nothing written:\n{skip}")
        acc = evaluate(src, tmp, test_x, test_y, config.threads)
        if config.precision == "fp16":
            gate = f"top-1 agreement >= {config.min_fp16_agreement:.1%}"
            ok = acc.agreement >= config.min_fp16_agreement
        else:
            gate = f"accuracy drop <= {config.max_int8_drop:g} points"
            ok = acc.drop_points <= config.max_int8_drop
        if not ok:
            hint = ("keep more ops in float32 (Fp16Config.op_block_list / node_block_list)" if config.precision == "fp16"
                    else "calibrate on more images, try --method entropy/percentile, or exclude the sensitive layer")
            raise CheckFailed(f"the {config.precision} variant of {src} fails the accuracy gate ({gate}): {acc}; "
                              f"nothing written. Fix: {hint}")
    return QuantizeResult(Path(out), config.precision, flavour, reason, report, skip, acc, gate)
