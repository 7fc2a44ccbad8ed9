"""Pipeline glue for export and the skip-add check: checkpoint -> model -> held-out images -> export -> check.

Held-out images: the test split of the data the checkpoint was trained on (``metrics["data"]``, default
mnist). When the model's input differs from that data (random-weight ImageNet/CIFAR models), the real MNIST
test digits are resized (bilinear) to the model's H x W and repeated over its channels: real image statistics
instead of noise, so parity and the per-block comparison see realistic activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import resdeploy
from resdeploy import atomic
from resdeploy.errors import InputError
from resdeploy.artifact import ArtifactMetadata, open_artifact
from resdeploy.export import ExportConfig, ExportReport, SkipAddReport, export_onnx
from resdeploy.export.shortpath import ShortPathReport, check_short_paths, require_short_paths_pass



@dataclass(frozen=True)
class ExportResult:
    export: ExportReport
    check: SkipAddReport | ShortPathReport | None  # the skip-add report; the short-path report for other families

    def __bool__(self) -> bool:
        return bool(self.export) and (self.check is None or bool(self.check))

    def __str__(self) -> str:
        return str(self.export) + ("" if self.check is None else "\n" + str(self.check))


def load_reference(checkpoint: str | Path, arch: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, CheckpointInfo) from a checkpoint folder, or a bare state_dict with ``arch``."""
    from resdeploy.models import load_checkpoint

    return load_checkpoint(checkpoint, arch=arch)


def held_out_images(spec: Any, n: int, data: str | None = "mnist") -> tuple[np.ndarray, str]:
    """``n`` normalised test-split images shaped for ``spec`` (an InputSpec) and a description of them."""
    from resdeploy.models import load_data, normalize
    from resdeploy.models.data import fit_images

    source = data or "mnist"
    try:
        bundle = load_data(source)
    except InputError:
        source, bundle = "mnist", load_data("mnist")
    x = bundle.test.images[:n]
    described = f"{source} test split"
    if tuple(x.shape[1:]) != tuple(spec.shape):
        x = fit_images(x, spec.shape)
        described = f"{source} test digits resized to {spec.channels}x{spec.height}x{spec.width}"
    return normalize(np.ascontiguousarray(x, np.float32), spec.mean, spec.std), described


def build_metadata(model: Any, info: Any, checkpoint_sha256: str | None, exporter: str) -> ArtifactMetadata:
    """What every exported model says about itself (the serving side and later stages read it)."""
    return ArtifactMetadata(architecture=str(getattr(model, "arch", "") or info.arch), arch_kwargs=dict(info.kwargs),
                            input_spec=model.input_spec, labels=tuple(model.labels), precision="fp32",
                            checkpoint_sha256=checkpoint_sha256 or "", resdeploy_version=resdeploy.__version__,
                            exporter=exporter)


def checkpoint_sha256(checkpoint: str | Path, info: Any) -> str:
    """sha256 of the weights file the model was loaded from."""
    p = Path(checkpoint)
    if p.is_dir():
        p = p / "model.safetensors"
    elif p.name == "model.json":
        p = p.parent / "model.safetensors"
    return atomic.sha256_file(p) if p.is_file() else (info.weights_sha256 or "")


def export_model(
    model: Any,
    out: str | Path,
    *,
    metadata: ArtifactMetadata,
    images: np.ndarray,
    config: ExportConfig = ExportConfig(),
    check: bool = True,
    check_images: int = 2,
) -> ExportResult:
    """Export an in-memory resdeploy model, then run the skip-add check against it (the short-path check for
    families with other short paths; raises CheckFailed on a defect)."""
    report = export_onnx(model, out, input_shape=tuple(model.input_spec.shape), metadata=metadata, sample=images,
                         config=config)
    skip = None
    if check:
        skip = require_short_paths_pass(check_short_paths(report.path, model, images[:check_images]))
    return ExportResult(report, skip)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    config: ExportConfig = ExportConfig(),
    check: bool = True,
    check_images: int = 2,
) -> ExportResult:
    """``resdeploy export``: load, export with self-checks, then the skip-add check against the checkpoint."""
    model, info = load_reference(checkpoint, arch)
    images, _ = held_out_images(model.input_spec, config.parity_images, info.metrics.get("data"))
    meta = build_metadata(model, info, checkpoint_sha256(checkpoint, info), config.exporter)
    return export_model(model, out, metadata=meta, images=images, config=config, check=check, check_images=check_images)


def export_user_model(src: Any, out: str | Path, *, config: ExportConfig = ExportConfig(), check: bool = True,
                      check_images: int = 2) -> ExportResult:
    """``resdeploy export --model``: the user's network (a sources.ModelSource of kind factory) exported with
    self-checks and metadata naming the factory, its kwargs and the weights' sha256, then the short-path check."""
    model = src.reference().model
    images, _ = held_out_images(model.input_spec, config.parity_images, src.data or None)
    return export_model(model, out, metadata=src.metadata(config.exporter), images=images, config=config, check=check,
                        check_images=check_images)


def check_onnx(
    onnx_path: str | Path,
    reference: str | Path | Any | None = None,
    *,
    arch: str | None = None,
    images: int = 2,
    data: str | None = None,
) -> SkipAddReport | ShortPathReport:
    """``resdeploy check``: the skip-add (short-path) report of an ONNX file, against a reference when given: a
    checkpoint folder (or state_dict with ``arch``), or an in-memory module with ``input_spec`` (``--model``)."""
    art = open_artifact(onnx_path)
    if reference is None:
        return check_short_paths(onnx_path)
    if isinstance(reference, (str, Path)):
        model, info = load_reference(reference, arch)
        data = info.metrics.get("data")
    else:
        model = reference
    sample, _ = held_out_images(model.input_spec, images, data)
    if art.inputs:
        dims = art.inputs[0].shape
        if len(dims) == 4 and all(dims[1:]) and tuple(dims[1:]) != tuple(model.input_spec.shape):
            raise InputError(f"{onnx_path} takes input {tuple(dims[1:])} but the reference is a model for "
                             f"{tuple(model.input_spec.shape)}; give the model this ONNX file was exported from")
    return check_short_paths(onnx_path, model, sample)
