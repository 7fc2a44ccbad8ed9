"""The workbench: what parity, bench and engine choice compare: the reference, the data, the variants, the engines.

    ref = load_reference("tests/data/resnet20-mnist")
    data = load_parity_data(ref, limit=256)
    paths = prepare_variants(ref, workdir, ("fp32", "int8"), data.calibration)
    with open_backend("onnxruntime", engine_for("onnxruntime", "int8", paths, workdir)) as runner:
        logits = run_batches(runner, data.images, 32)

The reference (:class:`Reference`) is the PyTorch FP32 model; for a user's own ONNX file (``run --onnx``) it is
that FP32 graph, run by ONNX Runtime on the CPU with graph optimisations off. A random-weight model gets its
BatchNorm statistics from real images first (:func:`recalibrate_batchnorm`). The data is the model's test split
(:func:`load_parity_data`), the val split for INT8 calibration. Variants are made through the export and quantize
stages themselves, so their own checks run (:func:`export_fp32`, :func:`make_variant`); engines are opened through
the engines room (:func:`open_backend`), a TensorRT plan built once per work folder (:func:`engine_for`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy.device import cuda_device_present
from resdeploy.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8")
# Backends parity (and bench) knows: name -> (open_runner backend, options). GPU ones need CUDA; tensorrt runs
# a plan built from the ONNX variant (INT8: from an s8s8 variant, the flavour TensorRT needs).
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnxruntime": ("onnxruntime", {"provider": "cpu"}),
    "openvino": ("openvino", {"precision_hint": "f32"}),
    "onnxruntime-cuda": ("onnxruntime", {"provider": "cuda"}),
    "tensorrt": ("tensorrt", {}),
}
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")


@dataclass(frozen=True)
class ParityData:
    """Normalised images with labels, and what they are (said in every report)."""

    images: np.ndarray  # float32 (N, C, H, W), normalised with the model's mean/std
    labels: np.ndarray  # int64 (N,)
    calibration: np.ndarray  # float32, from the val split: INT8 calibration, never the test split
    description: str
    labels_meaningful: bool  # False for random weights: accuracy is reported but not gated


@dataclass
class Reference:
    """What every engine is judged against: a PyTorch FP32 module, or (``onnx``) the user's FP32 ONNX graph."""

    model: Any  # nn.Module in eval mode, FP32, with input_spec and labels; None when the reference is ``onnx``
    name: str  # arch (+ checkpoint path), the factory, or the ONNX file
    trained: bool  # False: random weights
    data: str = "mnist"  # the data the model was trained on; "" = none given (MNIST digits fitted to its input)
    onnx: Path | None = None  # the reference is this FP32 graph, run by ONNX Runtime on the CPU, optimisations off
    spec: Any = None  # the ONNX reference's InputSpec (a module carries its own)
    onnx_labels: tuple[str, ...] = ()  # the ONNX reference's class names

    @property
    def input_spec(self) -> Any:
        return self.model.input_spec if self.model is not None else self.spec

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "labels", ()) or ()) if self.model is not None else self.onnx_labels

    @property
    def kind(self) -> str:
        """The reference in words (every report says what the engines were compared with)."""
        if self.onnx is None:
            return "PyTorch FP32 eager"
        return f"ONNX Runtime FP32 on the given graph {self.onnx.name} (CPU, graph optimisations off)"

    def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The reference's logits for normalised ``images``."""
        if self.onnx is None:
            return reference_logits(self.model, images, batch_size)
        from resdeploy.engines import open_runner

        with open_runner(str(self.onnx), backend="onnxruntime", provider="cpu", optimization="disable",
                         name="reference") as runner:
            return run_batches(runner, images, batch_size)


def load_reference(checkpoint: str | Path | None = None, arch: str | None = None, seed: int = 0) -> Reference:
    """A trained checkpoint, or (with ``arch`` alone) a random-weight model with a fixed seed."""
    import torch

    from resdeploy.models import create_model, load_checkpoint

    if checkpoint is not None:
        model, info = load_checkpoint(checkpoint)
        return Reference(model.eval(), f"{info.arch} ({checkpoint})", True, str(info.metrics.get("data", "mnist")))
    if not arch:
        raise InputError("give a CHECKPOINT folder or --arch NAME (random weights)")
    torch.manual_seed(seed)
    model = create_model(arch)
    n = recalibrate_batchnorm(model)
    return Reference(model.eval(), f"{arch} (random weights, seed {seed}, BN statistics from {n} real images)", False)


def recalibrate_batchnorm(model: Any, images: int = 64, data: str = "mnist", batch_size: int = 16) -> int:
    """Set a random-weight model's BatchNorm statistics from real images (train split), then back to eval.

    With the default statistics (mean 0, var 1) a deep random ResNet's activations grow block by block (logits
    reach ~1e10) and it predicts one class for every image, so FP16/INT8 parity against it says nothing. Measured
    statistics keep every layer at a realistic scale, as training would. Returns the number of images used.
    """
    import torch

    from resdeploy.models import load_data, normalize

    spec = model.input_spec
    train = load_data(data).train
    x, _ = _fit_images(train.images[_spread(len(train), images)], spec.shape)
    x = torch.from_numpy(normalize(x, spec.mean, spec.std))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches, not an exponential one
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    for m in bns:
        m.momentum = 0.1
    model.eval()
    return len(x)


def _fit_images(x: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    from resdeploy.models.data import describe_fit, fit_images

    return fit_images(x, shape), describe_fit(tuple(x.shape[1:]), shape)


def _spread(total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced indices of ``range(total)`` (all of them when n >= total)."""
    if n >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, max(1, n)).round().astype(np.int64)


def load_parity_data(ref: Reference, limit: int | None = None, calibration_size: int = 128) -> ParityData:
    """The test split of the model's data (all of it unless ``limit``), normalised as the model expects."""
    from resdeploy.models import load_data, normalize

    spec = ref.input_spec
    bundle = load_data(ref.data or "mnist")
    test, val = bundle.test, bundle.val
    n = len(test) if limit is None else max(1, min(int(limit), len(test)))
    # Splits are ordered by class: take evenly spaced images so a subset still covers every class.
    pick, cpick = _spread(len(test), n), _spread(len(val), calibration_size)
    images, note = _fit_images(test.images[pick], spec.shape)
    calib, _ = _fit_images(val.images[cpick], spec.shape)
    num_classes = len(ref.labels) or None
    # A checkpoint trained at another size was trained on these same resized digits (models.data.fit_images).
    meaningful = ref.trained and bool(ref.data) and (num_classes is None or num_classes == len(bundle.classes))
    desc = (f"{bundle.name} test split, {n} real images" + (", evenly spaced over the split" if n < len(test) else "")
            + (f", {note}" if note else ""))
    if not ref.trained:
        desc += "; random weights: accuracy is meaningless, INT8 is gated on top-1 agreement with FP32"
    elif not ref.data:
        desc += "; no data was given (--data): these digits only exercise the model, accuracy is not gated"
    elif not meaningful:
        desc += "; the labels do not match the model's classes: accuracy is not gated"
    return ParityData(normalize(images, spec.mean, spec.std), test.labels[pick].copy(),
                      normalize(calib, spec.mean, spec.std), desc, meaningful)


def export_fp32(model: Any, path: Path, sample: np.ndarray | None = None) -> Path:
    """FP32 ONNX through the export stage itself (``resdeploy export``'s code path: checker, parity, skip-add check,
    the artifact's metadata)."""
    import resdeploy
    from resdeploy.artifact import ArtifactMetadata
    from resdeploy.pipeline.exporting import export_model

    images = sample if sample is not None else np.random.default_rng(0).standard_normal(
        (4, *model.input_spec.shape)).astype(np.float32)
    meta = ArtifactMetadata(architecture=str(getattr(model, "arch", "")), input_spec=model.input_spec,
                            labels=tuple(getattr(model, "labels", ()) or ()), precision="fp32",
                            resdeploy_version=resdeploy.__version__, exporter="dynamo")
    return Path(export_model(model, path, metadata=meta, images=images).export.path)


def make_variant(ref: Reference, fp32_path: Path, path: Path, precision: str, *, flavour: str | None = None,
                 calibration_images: int = 128) -> Path:
    """An FP16 or INT8 variant through the quantize stage itself (``resdeploy quantize``'s code path: the variant's
    graph check and the skip-add check against the reference). Its accuracy gate is left to parity, which
    judges every variant on the whole test split (and on random weights, where accuracy means nothing)."""
    from resdeploy.pipeline.quantizing import QuantizeConfig, quantize_model

    config = QuantizeConfig(precision=precision, flavour=flavour, data=ref.data, calibration_images=calibration_images,
                            eval_images=64, max_int8_drop=100.0, min_fp16_agreement=0.0, check_images=0)
    quantize_model(fp32_path, path, config=config, reference=ref.model)
    return Path(path)


def prepare_variants(ref: Reference, workdir: Path, precisions: Sequence[str], calibration: np.ndarray,
                     given: Mapping[str, str | Path] | None = None,
                     progress: Callable[[str], None] | None = None, sample: np.ndarray | None = None) -> dict[str, Path]:
    """ONNX files per precision: the ``given`` ones as they are, the others made in ``workdir``.

    ``calibration``: normalised val-split images for INT8; ``sample``: held-out images for the export's own check."""
    say = progress or (lambda _msg: None)
    given = {k: Path(v) for k, v in (given or {}).items() if v}
    for k, p in given.items():
        if k not in PRECISIONS:
            raise InputError(f"variant precision {k!r} unknown; use one of {', '.join(PRECISIONS)}")
        if not p.is_file():
            raise InputError(f"{k} model {p} does not exist; drop the option to build it from the checkpoint")
    out: dict[str, Path] = {}
    workdir = Path(workdir)
    fp32 = given.get("fp32") or ref.onnx  # an ONNX reference is the FP32 model itself
    if fp32 is None and any(p not in given for p in precisions):
        say(f"exporting FP32 ONNX to {workdir / 'fp32.onnx'}")
        fp32 = export_fp32(ref.model, workdir / "fp32.onnx", sample)
    for prec in precisions:
        if prec in given:
            out[prec] = given[prec]
        elif prec == "fp32":
            out[prec] = fp32
        elif prec == "fp16":
            say("converting to FP16")
            out[prec] = make_variant(ref, fp32, workdir / "fp16.onnx", "fp16")
        elif prec == "int8":
            say(f"quantizing to INT8 u8s8 (Q/DQ, per-channel) with {len(calibration)} calibration images from the val split")
            out[prec] = make_variant(ref, fp32, workdir / "int8.onnx", "int8", flavour="u8s8",
                                     calibration_images=len(calibration))
        else:
            raise InputError(f"precision {prec!r} unknown; use one of {', '.join(PRECISIONS)}")
    return out


def backend_available(backend: str) -> str | None:
    """None when ``backend`` can run here, else the reason it cannot (said in the report, not an error)."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} unknown; use one of {', '.join(BACKENDS)}")
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (`pip install 'resdeploy[openvino]'`)"
    if backend in GPU_BACKENDS:
        from resdeploy.engines.onnxruntime import PROVIDERS, available_providers

        if not cuda_device_present():
            return "no CUDA device"
        if backend == "tensorrt":
            return None if importlib.util.find_spec("tensorrt") else "TensorRT is not installed (the gpu extra)"
        provider = PROVIDERS[BACKENDS[backend][1]["provider"]]
        if provider not in available_providers():
            return f"onnxruntime has no {provider} (install the gpu extra)"
    return None


def engine_for(backend: str, precision: str, paths: Mapping[str, Path], workdir: Path,
               calibration: np.ndarray | None = None, max_batch: int = 32,
               engines: Mapping[str, str | Path] | None = None, reference: Reference | None = None) -> Path:
    """What ``backend`` runs for ``precision``: an engine given in ``engines`` (key ``"<backend> <precision>"``, the
    pipeline's own build), else the ONNX variant, or for tensorrt a plan built from it here (once, ad hoc)."""
    given = (engines or {}).get(f"{backend} {precision}")
    if given is not None:
        if not Path(given).is_file():
            raise InputError(f"{backend} {precision} engine {given} does not exist; rebuild it or drop it to build one")
        return Path(given)
    src = Path(paths[precision])
    if backend != "tensorrt":
        return src
    if precision == "int8":  # TensorRT needs symmetric int8 activations: an s8s8 variant of the FP32 model
        if "fp32" not in paths or calibration is None or reference is None:
            raise InputError("TensorRT INT8 needs an s8s8 model: give the FP32 model (--fp32) so resdeploy can quantize it")
        src = Path(workdir) / "int8-s8s8.onnx"
        if not src.is_file():
            make_variant(reference, Path(paths["fp32"]), src, "int8", flavour="s8s8", calibration_images=len(calibration))
    plan = Path(workdir) / f"{src.stem}.b{max_batch}.plan"
    if not plan.is_file():
        from resdeploy.engines.tensorrt_build import TrtBuildConfig, build_engine

        build_engine(src, plan, TrtBuildConfig(min_batch=1, opt_batch=min(8, max_batch), max_batch=max_batch))
    return plan


def open_backend(backend: str, onnx_path: Path, threads: int | None = None, **extra: Any) -> Any:
    """A runner (not yet active) for ``backend`` on ``onnx_path`` with ``threads`` intra-op threads."""
    from resdeploy.engines import open_runner

    kind, opts = BACKENDS[backend]
    opts = {**opts, **extra}
    if threads and kind != "tensorrt":
        opts["threads"] = threads
    return open_runner(str(onnx_path), backend=kind, name=backend, **opts)


def run_batches(runner: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for ``images`` in batches of ``batch_size``."""
    name, out = runner.inputs[0].name, runner.outputs[0].name  # what the artifact calls them
    outs = [runner.infer({name: np.ascontiguousarray(images[i:i + batch_size])})[out]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def reference_logits(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).float().numpy()
                               for i in range(0, len(images), batch_size)])
