"""Pipeline glue for export and the skip-add check: checkpoint -> model -> held-out images -> export -> check.

Held-out images: the test split of the data the checkpoint was trained on (``metrics["data"]``, default
mnist). When the model's input differs from that data (random-weight ImageNet/CIFAR models), the real MNIST
test digits are resized (bilinear) to the model's H x W and repeated over its channels: real image statistics
instead of noise, so parity and the per-block comparison see realistic activations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import resdeploy
from resdeploy import atomic
from resdeploy.errors import InputError
from resdeploy.export import ExportConfig, ExportReport, SkipAddReport, check_skip_adds, export_onnx, load_onnx, require_pass

# metadata_props keys written into every exported model (the serving side reads these)
META_ARCH, META_KWARGS, META_INPUT_SPEC, META_LABELS = "architecture", "arch_kwargs", "input_spec", "labels"
META_CHECKPOINT_SHA, META_VERSION, META_EXPORTER = "checkpoint_sha256", "resdeploy_version", "exporter"


@dataclass(frozen=True)
class ExportResult:
    export: ExportReport
    check: SkipAddReport | None

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


def build_metadata(model: Any, info: Any, checkpoint_sha256: str | None, exporter: str) -> dict[str, str]:
    return {
        META_ARCH: str(getattr(model, "arch", "") or info.arch),
        META_KWARGS: json.dumps(dict(info.kwargs), sort_keys=True),
        META_INPUT_SPEC: json.dumps(model.input_spec.to_dict(), sort_keys=True),
        META_LABELS: json.dumps(list(model.labels)),
        META_CHECKPOINT_SHA: checkpoint_sha256 or "",
        META_VERSION: resdeploy.__version__,
        META_EXPORTER: exporter,
    }


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
    metadata: dict[str, str],
    images: np.ndarray,
    config: ExportConfig = ExportConfig(),
    check: bool = True,
    check_images: int = 2,
) -> ExportResult:
    """Export an in-memory resdeploy model, then run the skip-add check against it (raises CheckFailed on a defect)."""
    report = export_onnx(model, out, input_shape=tuple(model.input_spec.shape), metadata=metadata, sample=images,
                         config=config)
    skip = None
    if check:
        skip = require_pass(check_skip_adds(report.path, model, images[:check_images]))
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


def check_onnx(
    onnx_path: str | Path,
    reference: str | Path | None = None,
    *,
    arch: str | None = None,
    images: int = 2,
) -> SkipAddReport:
    """``resdeploy check``: the skip-add report of an ONNX file, against a checkpoint when given."""
    proto = load_onnx(onnx_path)
    if reference is None:
        return check_skip_adds(onnx_path)
    model, info = load_reference(reference, arch)
    sample, _ = held_out_images(model.input_spec, images, info.metrics.get("data"))
    inits = {t.name for t in proto.graph.initializer}
    graph_in = [i for i in proto.graph.input if i.name not in inits]
    if graph_in:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_in[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and all(dims[1:]) and tuple(dims[1:]) != tuple(model.input_spec.shape):
            raise InputError(f"{onnx_path} takes input {tuple(dims[1:])} but {reference} is a model for "
                             f"{tuple(model.input_spec.shape)}; give the checkpoint this ONNX file was exported from")
    return check_skip_adds(onnx_path, model, sample)
