"""Pipeline glue for ``resdeploy build``: an ONNX variant -> an engine artifact, dispatched on the backend.

* ``onnxruntime``: :func:`resdeploy.engines.onnxruntime_build.build_onnxruntime` (optimised graph + fusion report), fed
  real test images (normalised with the model's input spec) for its optimised-vs-reference check when the model
  carries its input spec, and the residual Adds that the short-path check finds (export's ``residual_adds``).
* ``tensorrt``: :func:`resdeploy.engines.tensorrt_build.build_engine`, imported only when asked for (it needs a
  CUDA device and refuses cleanly without one).
* ``auto``: TensorRT where it is usable; on a CPU machine the ONNX Runtime build, then every CPU engine
  (ONNX Runtime, OpenVINO when installed) that agrees with the model on real images is timed on this machine
  at ``choice_batches`` and the fastest is recorded in ``engine-choice.json`` in the build folder
  (:mod:`resdeploy.pipeline.engine_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy.artifact import open_artifact
from resdeploy.errors import InputError

BUILD_BACKENDS = ("auto", "onnxruntime", "tensorrt")


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
    choice_batches: tuple[int, ...] = (1,)  # auto on a CPU: batch sizes the engines are timed at
    choice_seconds: float = 10.0  # auto on a CPU: time spent timing the engines
    choice_min_agreement: float = 0.99  # auto on a CPU: top-1 agreement with the model (ONNX Runtime, unoptimised)


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
    from resdeploy.artifact import external_tensors, load_onnx, precision_of, save_onnx
    from resdeploy.engines.onnxruntime_build import build_onnxruntime
    from resdeploy.export.precision import residual_adds
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
        return build_onnxruntime(src, out, adds=residual_adds(rewritten), threads=config.threads,
                                 optimization=config.optimization, provider=config.provider, sample=sample,
                                 build_info=info)


def build(model_path: str | Path, out: str | Path, *, config: BuildConfig | None = None) -> Any:
    """Build ``model_path`` for ``config.backend``; returns that backend's build report (str() prints it)."""
    config = config or BuildConfig()
    path = Path(model_path)
    if config.backend == "auto":
        from resdeploy.device import require_tensorrt
        from resdeploy.errors import BackendUnavailable

        try:
            require_tensorrt()
        except BackendUnavailable:
            return build_auto_cpu(path, out, config)
        return build(path, out, config=replace(config, backend="tensorrt"))
    if config.backend == "onnxruntime":
        from resdeploy.artifact import load_onnx
        from resdeploy.engines.onnxruntime_build import build_onnxruntime
        from resdeploy.export.precision import residual_adds

        sample = _real_sample(path, config.sample_images, config.data)
        if not config.rewrite_option_a:
            return build_onnxruntime(path, out, adds=residual_adds(load_onnx(path)), threads=config.threads,
                                     optimization=config.optimization, provider=config.provider, sample=sample)
        return _build_rewritten(path, out, config, sample)
    if config.backend == "tensorrt":
        # Lazy: TensorRT is optional and must never start without a CUDA device (build_engine checks first).
        from resdeploy.engines.tensorrt_build import build_engine

        out_path = Path(out)
        if out_path.suffix not in (".plan", ".engine"):
            out_path = out_path / (path.stem + ".plan")
        return build_engine(path, out_path, config.trt)
    raise InputError(f"build backend {config.backend!r} unknown; use one of {', '.join(BUILD_BACKENDS)}")


@dataclass(frozen=True)
class AutoBuildReport:
    """``build --backend auto`` on a CPU: the ONNX Runtime build plus the engine chosen by measurement."""

    ort: Any  # OrtBuildReport
    choice: Any  # EngineChoice
    choice_path: Path

    @property
    def fusion(self) -> Any:
        return self.ort.fusion

    @property
    def build(self) -> Any:
        return self.ort.build

    def __str__(self) -> str:
        return f"{self.ort}\n{self.choice}\nwrote {self.choice_path}"


def cpu_engine_candidates(model_path: Path, sample: np.ndarray | None, min_agreement: float,
                          threads: int | None) -> list[Any]:
    """ONNX Runtime and (when installed) OpenVINO on ``model_path``, each with every setting the engine choice
    searches (engine_choice.configurations), each checked against the model run by ONNX Runtime without graph
    optimisation on ``sample`` (top-1 agreement >= ``min_agreement``)."""
    from dataclasses import replace as with_fields

    from resdeploy.pipeline import workbench as wb
    from resdeploy.pipeline.gates import compare
    from resdeploy.pipeline.engine_choice import configurations
    from resdeploy.artifact import precision_of
    from resdeploy.artifact import load_onnx

    precision = precision_of(load_onnx(model_path))
    backends = ["onnxruntime"] + (["openvino"] if wb.backend_available("openvino") is None else [])
    cands = configurations([(b, precision, model_path) for b in backends])
    if sample is None:
        return [with_fields(c, parity="no real images to check on") for c in cands]
    from resdeploy.engines import open_runner

    with open_runner(str(model_path), backend="onnxruntime", provider="cpu", optimization="disable", threads=threads) as r:
        ref = wb.run_batches(r, sample, 16)
    out = []
    for c in cands:
        with wb.open_backend(c.backend, model_path, threads, **dict(c.settings)) as r:
            m = compare(ref, wb.run_batches(r, sample, 16))
        ok = m.top1_agreement >= min_agreement
        out.append(with_fields(c, parity_passed=ok, parity=f"top-1 agreement {m.top1_agreement:.1%} with the model on "
                                                            f"{m.n} images, max abs {m.max_abs:.2g}"))
    return out


def build_auto_cpu(path: Path, out: str | Path, config: BuildConfig) -> AutoBuildReport:
    """The ONNX Runtime build of ``path`` into ``out``, then the CPU engines timed and the choice written there."""
    from resdeploy.pipeline.engine_choice import choose_engine, write_choice

    ort_cfg = replace(config, backend="onnxruntime")
    rep = build(path, out, config=ort_cfg)
    sample = _real_sample(path, max(config.sample_images, 32), config.data)
    images = next(iter(sample.values())) if sample else None
    cands = cpu_engine_candidates(path, images, config.choice_min_agreement, config.threads)
    choice = choose_engine(cands, batches=config.choice_batches, threads=config.threads, seconds=config.choice_seconds,
                           image=images[:1] if images is not None else None)
    return AutoBuildReport(rep, choice, write_choice(choice, out))
