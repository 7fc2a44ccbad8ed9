"""Pipeline glue for ``resdeploy build``: an ONNX variant -> an engine artifact, dispatched on the backend.

* ``onnxruntime``: :func:`resdeploy.export.ort_build.build_onnxruntime` (optimised graph + fusion report), fed
  real test images (normalised with the model's input spec) for its optimised-vs-reference check when the model
  carries its input spec, and the residual Adds from the skip-add check.
* ``tensorrt``: :func:`resdeploy.export.tensorrt_build.build_engine`, imported only when asked for (it needs a
  CUDA device and refuses cleanly without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy.artifact import open_artifact
from resdeploy.errors import InputError

BUILD_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class BuildConfig:
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    optimization: str = "all"  # onnxruntime graph optimisation level (all = NCHWc layout fusions on x86)
    threads: int | None = None  # onnxruntime intra-op threads; None = one per physical core
    provider: str = "cpu"  # onnxruntime execution provider for the build session: cpu | cuda
    sample_images: int = 8  # real test images for the optimised-vs-reference check (random if none available)
    data: str = "mnist"  # where the real sample images come from
    rewrite_option_a: bool = False  # onnxruntime, FP32 models: rewrite option-A shortcuts as exact 1x1 convs first
    trt: Any = None  # TrtBuildConfig for --backend tensorrt; None = its defaults


def _real_sample(model_path: Path, n: int, data: str) -> dict[str, np.ndarray] | None:
    """``n`` normalised real images when the model's metadata says how to normalise and the data fits, else None."""
    from resdeploy.pipeline.exporting import held_out_images

    if n <= 0:
        return None
    art = open_artifact(model_path)
    if art.metadata.input_spec is None:
        return None
    images, _ = held_out_images(art.metadata.input_spec, n, data)
    return {art.input_name: images}


def _build_rewritten(path: Path, out: str | Path, config: BuildConfig, sample: dict[str, np.ndarray] | None) -> Any:
    """Rewrite option-A shortcuts (exact), then build the rewritten graph; build.json says so."""
    import tempfile

    from resdeploy import atomic
    from resdeploy.export.ort_build import build_onnxruntime
    from resdeploy.artifact import external_tensors, load_onnx, save_onnx
    from resdeploy.export.precision import precision_of
    from resdeploy.export.shortcut_rewrite import rewrite_option_a

    graph = load_onnx(path)
    if precision_of(graph) != "fp32":
        raise InputError(f"--rewrite-option-a rewrites FP32 graphs; {path} is {precision_of(graph)}. Make the variant with "
                         "`resdeploy quantize --rewrite-option-a` instead (the rewrite happens before quantization)")
    external = bool(external_tensors(graph))
    rewritten, report = rewrite_option_a(load_onnx(path, weights=True))
    with tempfile.TemporaryDirectory(prefix="resdeploy-rewrite-") as tmp:
        src = Path(tmp) / path.name
        save_onnx(rewritten, src, external_data=external)
        info = {"source": str(path), "source_sha256": atomic.sha256_file(path),
                "shortcut_rewrite": {"rewritten": list(report.rewritten), "skipped": list(report.skipped),
                                     "max_abs_diff": report.max_abs_diff}}
        return build_onnxruntime(src, out, threads=config.threads, optimization=config.optimization,
                                 provider=config.provider, sample=sample, build_info=info)


def build(model_path: str | Path, out: str | Path, *, config: BuildConfig | None = None) -> Any:
    """Build ``model_path`` for ``config.backend``; returns that backend's build report (str() prints it)."""
    config = config or BuildConfig()
    path = Path(model_path)
    if config.backend == "onnxruntime":
        from resdeploy.export.ort_build import build_onnxruntime

        sample = _real_sample(path, config.sample_images, config.data)
        if not config.rewrite_option_a:
            return build_onnxruntime(path, out, threads=config.threads, optimization=config.optimization,
                                     provider=config.provider, sample=sample)
        return _build_rewritten(path, out, config, sample)
    if config.backend == "tensorrt":
        # Lazy: TensorRT is optional and must never start without a CUDA device (build_engine checks first).
        from resdeploy.export.tensorrt_build import build_engine

        out_path = Path(out)
        if out_path.suffix not in (".plan", ".engine"):
            out_path = out_path / (path.stem + ".plan")
        return build_engine(path, out_path, config.trt)
    raise InputError(f"build backend {config.backend!r} unknown; use one of {', '.join(BUILD_BACKENDS)}")
