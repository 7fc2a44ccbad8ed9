"""Parity: every backend x precision against the FP32 reference on held-out real images.

The reference is the PyTorch FP32 model; for a user's own ONNX file (``run --onnx``) it is that FP32 graph, run
by ONNX Runtime on the CPU with graph optimisations off (:class:`Reference`), and every report says which.

    report = run_parity("tests/data/resnet20-mnist", backends=("onnxruntime",))
    assert report, report          # prints the table and the failing gates

Metrics (``compare``) per variant: max abs error, max rel error (per image: max |engine - torch| over the
logits divided by max |torch|, then the worst image), mean abs error, cosine similarity of the logits
(mean and worst image), top-1 agreement with PyTorch, accuracy and accuracy delta (points).

Gates (``ParityGates``) by precision: FP32 max abs error and top-1 agreement; FP16/BF16 top-1 agreement;
INT8 accuracy drop in points on a trained model, or top-1 agreement with the FP32 reference on a
random-weight model (whose accuracy means nothing). A failed gate carries backend, metric, value and limit.
When a variant fails, the skip-add check (``resdeploy.export.skipadd``) localises the first residual block
whose output diverges from PyTorch, and the report names it with its errors.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import BackendUnavailable, CheckFailed, InputError, ResdeployError

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


# ---------------------------------------------------------------------------------------------------------
# metrics and gates
# ---------------------------------------------------------------------------------------------------------

def points(fraction: float) -> float:
    """A difference of two accuracies in percentage points, rounded past float noise: on 1000 images
    0.964 - 0.954 is 1.0000000000000009 points, which must meet a 1-point gate as the 10 images it is."""
    return round(100.0 * fraction, 9)

@dataclass(frozen=True)
class ParityMetrics:
    """How far an engine's logits are from the reference logits on the same images."""

    n: int  # images compared
    max_abs: float  # max |engine - reference| over all logits
    max_rel: float  # worst image's max |engine - reference| / max |reference|
    mean_abs: float  # mean |engine - reference|
    cosine_mean: float  # mean per-image cosine similarity of the logit vectors
    cosine_min: float  # worst image's cosine similarity
    top1_agreement: float  # fraction of images where argmax agrees with the reference
    centered_top1_agreement: float = 1.0  # the same after subtracting the reference's mean logits over the sample
    accuracy: float | None = None  # engine accuracy on the labels (None without labels)
    reference_accuracy: float | None = None  # reference accuracy on the same labels
    reference_classes: int = 0  # distinct classes the reference predicts (1 = degenerate sample)
    num_classes: int = 0  # logits per image

    @property
    def degenerate(self) -> bool:
        """True when the reference predicts so few classes that top-1 agreement says little (random weights)."""
        return self.n >= 10 and self.reference_classes < min(10, self.num_classes)

    @property
    def accuracy_delta(self) -> float | None:
        """Engine minus reference accuracy, in percentage points (negative = the engine loses accuracy)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return points(self.accuracy - self.reference_accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_delta_points": self.accuracy_delta, "degenerate": self.degenerate}

    def __str__(self) -> str:
        acc = "" if self.accuracy is None else f"  acc {100 * self.accuracy:.2f}% ({self.accuracy_delta:+.2f} pt)"
        return (f"max abs {self.max_abs:.2e}  max rel {self.max_rel:.2e}  mean abs {self.mean_abs:.2e}  "
                f"cos {self.cosine_min:.6f}  top-1 {100 * self.top1_agreement:.2f}%{acc}  (n={self.n})")


def compare(reference_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> ParityMetrics:
    """Compare ``logits`` (N, K) with ``reference_logits`` (N, K); ``labels`` (N,) adds accuracy."""
    ref = np.asarray(reference_logits, np.float64)
    out = np.asarray(logits, np.float64)
    if ref.shape != out.shape or ref.ndim != 2 or len(ref) == 0:
        raise InputError(f"parity: logits shape {out.shape} vs reference {ref.shape}; both must be the same (N, classes), N > 0")
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise CheckFailed(f"parity: the engine produced NaN/inf logits for {bad} of {len(out)} images (an FP16 overflow?)")
    diff = np.abs(out - ref)
    scale = np.maximum(np.abs(ref).max(axis=1), np.finfo(np.float32).tiny)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, (ref * out).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    ref_top, top = ref.argmax(axis=1), out.argmax(axis=1)
    # A random-weight net's logits are dominated by a per-class offset shared by every image, so every image gets
    # the same top-1 and agreement is trivially 100%. Removing the reference's mean logits leaves the
    # image-dependent part; its top-1 agreement shows whether an engine keeps that part.
    mu = ref.mean(axis=0, keepdims=True)
    centered = float(((out - mu).argmax(axis=1) == (ref - mu).argmax(axis=1)).mean())
    acc = ref_acc = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(ref),):
            raise InputError(f"parity: labels shape {labels.shape}; expected ({len(ref)},)")
        acc, ref_acc = float((top == labels).mean()), float((ref_top == labels).mean())
    return ParityMetrics(n=len(ref), max_abs=float(diff.max()), max_rel=float((diff.max(axis=1) / scale).max()),
                         mean_abs=float(diff.mean()), cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                         top1_agreement=float((top == ref_top).mean()), centered_top1_agreement=centered,
                         accuracy=acc, reference_accuracy=ref_acc, reference_classes=int(len(np.unique(ref_top))),
                         num_classes=int(ref.shape[1]))


@dataclass(frozen=True)
class ParityGates:
    """Release gates by precision. Agreements are fractions; accuracy drops are percentage points."""

    fp32_max_abs: float = 1e-4  # FP32 engine vs PyTorch FP32: max abs logit error
    fp32_max_rel: float | None = None  # set: gate FP32 on max rel error instead (scale-free: random nets' big logits)
    fp32_min_agreement: float = 1.0  # FP32: every image's top-1 must agree
    fp16_min_agreement: float = 0.995  # FP16 and BF16: top-1 agreement with PyTorch FP32
    int8_max_accuracy_drop: float = 1.0  # INT8 on a trained model: accuracy may drop at most this many points
    int8_min_agreement: float = 0.95  # INT8 on a random-weight model (accuracy meaningless): top-1 agreement
    random_weights_metric: str = "top1_agreement"  # or "centered_top1_agreement" (stricter: see ParityMetrics)

    def check(self, backend: str, precision: str, m: ParityMetrics, labels_meaningful: bool) -> tuple["GateResult", ...]:
        """The gates that apply to ``precision``, evaluated on ``m``."""
        def gate(metric: str, value: float, limit: float, op: str) -> GateResult:
            ok = value <= limit if op == "<=" else value >= limit
            return GateResult(backend, precision, metric, value, limit, op, bool(ok))

        if precision == "fp32":
            if self.fp32_max_rel is not None:
                return (gate("max_rel_error", m.max_rel, self.fp32_max_rel, "<="),
                        gate("top1_agreement", m.top1_agreement, self.fp32_min_agreement, ">="))
            return (gate("max_abs_error", m.max_abs, self.fp32_max_abs, "<="),
                    gate("top1_agreement", m.top1_agreement, self.fp32_min_agreement, ">="))
        if precision in ("fp16", "bf16"):
            return (gate("top1_agreement", m.top1_agreement, self.fp16_min_agreement, ">="),)
        if precision == "int8":
            if labels_meaningful and m.accuracy_delta is not None:
                return (gate("accuracy_drop_points", -m.accuracy_delta, self.int8_max_accuracy_drop, "<="),)
            if self.random_weights_metric not in ("top1_agreement", "centered_top1_agreement"):
                raise InputError(f"random_weights_metric {self.random_weights_metric!r}: use top1_agreement or centered_top1_agreement")
            metric = self.random_weights_metric
            return (gate(metric, getattr(m, metric), self.int8_min_agreement, ">="),)
        raise InputError(f"parity: no gate for precision {precision!r}; use one of fp32, fp16, bf16, int8")


@dataclass(frozen=True)
class GateResult:
    backend: str
    precision: str
    metric: str
    value: float
    limit: float
    op: str  # "<=" or ">="
    passed: bool

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        fmt = (lambda v: f"{100 * v:.2f}%") if "agreement" in self.metric else (
            (lambda v: f"{v:.2f} points") if "points" in self.metric else (lambda v: f"{v:.3g}"))
        verdict = "ok" if self.passed else "FAILED"
        want = {"<=": "<=", ">=": ">="}[self.op]
        return f"{verdict}: {self.backend} {self.precision}: {self.metric} {fmt(self.value)} (limit {want} {fmt(self.limit)})"


# ---------------------------------------------------------------------------------------------------------
# reference, data, variants
# ---------------------------------------------------------------------------------------------------------
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
        from resdeploy.device import cuda_device_present
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


# ---------------------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ParityConfig:
    backends: tuple[str, ...] = tuple(BACKENDS)  # every backend; unavailable ones are reported as skipped
    precisions: tuple[str, ...] = PRECISIONS  # variants to compare
    limit: int | None = None  # test images to use; None = the whole test split
    batch_size: int = 32  # images per engine call
    calibration_size: int = 128  # val-split images to calibrate INT8 with
    threads: int | None = None  # intra-op threads per engine; None = the engine's default
    gates: ParityGates = field(default_factory=ParityGates)
    localize: bool = True  # run the skip-add check on failing variants to name the first diverging block
    seed: int = 0  # random weights (with --arch only)


@dataclass(frozen=True)
class VariantParity:
    backend: str
    precision: str
    onnx: str
    description: str  # what actually ran
    metrics: ParityMetrics | None
    gates: tuple[GateResult, ...] = ()
    skipped: str | None = None  # why it did not run
    divergence: dict[str, Any] | None = None  # skip-add localisation for a failing variant
    sha256: str = ""  # of the file judged (the ONNX variant, or the engine built from it)

    @property
    def passed(self) -> bool:
        return self.skipped is not None or all(self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "onnx": self.onnx, "description": self.description,
                "metrics": self.metrics.to_dict() if self.metrics else None, "gates": [asdict(g) for g in self.gates],
                "passed": self.passed, "skipped": self.skipped, "divergence": self.divergence, "sha256": self.sha256}


@dataclass(frozen=True)
class ParityReport:
    model: str
    data: str
    reference_accuracy: float | None
    rows: tuple[VariantParity, ...]
    gates: ParityGates
    reference: str = "PyTorch FP32 eager"  # what the engines were compared with (Reference.kind)

    def __bool__(self) -> bool:
        return all(r.passed for r in self.rows) and any(r.skipped is None for r in self.rows)

    def failures(self) -> list[GateResult]:
        return [g for r in self.rows for g in r.gates if not g]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "reference": self.reference,
                "reference_accuracy": self.reference_accuracy, "passed": bool(self), "gates": asdict(self.gates),
                "failures": [str(g) for g in self.failures()], "variants": [r.to_dict() for r in self.rows]}

    def __str__(self) -> str:
        acc = "" if self.reference_accuracy is None else f"; reference accuracy {100 * self.reference_accuracy:.2f}%"
        lines = [f"parity of {self.model} vs {self.reference} on {self.data}{acc}",
                 f"{'backend':<17} {'prec':<5} {'max abs':>9} {'max rel':>9} {'mean abs':>9} {'cos min':>9} "
                 f"{'top-1':>8} {'c-top-1':>8} {'accuracy':>9} {'delta':>8}  gate"]
        for r in self.rows:
            if r.metrics is None:
                lines.append(f"{r.backend:<17} {r.precision:<5} skipped: {r.skipped}")
                continue
            m = r.metrics
            acc_s = f"{100 * m.accuracy:8.2f}%" if m.accuracy is not None else f"{'-':>9}"
            delta = f"{m.accuracy_delta:+7.2f}pt" if m.accuracy_delta is not None else f"{'-':>9}"
            lines.append(f"{r.backend:<17} {r.precision:<5} {m.max_abs:9.2e} {m.max_rel:9.2e} {m.mean_abs:9.2e} "
                         f"{m.cosine_min:9.6f} {100 * m.top1_agreement:7.2f}% {100 * m.centered_top1_agreement:7.2f}% "
                         f"{acc_s} {delta}  {'pass' if r.passed else 'FAIL'}")
        ran = [r.metrics for r in self.rows if r.metrics is not None]
        if ran and ran[0].degenerate:
            lines.append(f"note: the reference predicts only {ran[0].reference_classes} of {ran[0].num_classes} classes on "
                         "these images, so top-1 agreement is trivially high; c-top-1 (agreement after removing the "
                         "reference's mean logits) shows whether the image-dependent part survives")
        for r in self.rows:
            if r.divergence:
                d = r.divergence
                where = d.get("first_divergent") or "no residual block diverges beyond tolerance (look after the last add)"
                errs = d.get("first_row") or {}
                detail = (f" (Add output max abs {errs['max_abs_err']:.2e}, rel {errs['rel_err']:.2e})"
                          if errs.get("max_abs_err") is not None and errs.get("rel_err") is not None else "")
                lines.append(f"{r.backend} {r.precision}: skip-add check: first diverging block {where}{detail}")
        lines += [str(g) for g in self.failures()]
        lines.append("PASSED" if self else ("FAILED" if self.failures() else "FAILED: no backend ran"))
        return "\n".join(lines)

    def require_pass(self) -> "ParityReport":
        """Raise CheckFailed (exit 1) naming every failing gate unless the report passed."""
        if not self:
            fails = self.failures()
            msg = "; ".join(str(g) for g in fails) if fails else "no backend ran (all were skipped); install one or pick another"
            raise CheckFailed(f"parity gate: {msg}")
        return self


def _localize(onnx_path: Path, model: Any, sample: np.ndarray) -> dict[str, Any]:
    """The skip-add check's numeric localisation, reduced to what the parity report prints (structure only when
    ``model`` is None: an ONNX reference has no PyTorch blocks to compare with)."""
    try:
        from resdeploy.export.shortpath import check_short_paths
    except ImportError as exc:
        return {"error": f"skip-add check unavailable: {exc}"}
    try:
        rep = check_short_paths(str(onnx_path), reference=model, sample=sample if model is not None else None)
    except Exception as exc:  # the localisation is a diagnosis aid: never let it hide the gate result
        return {"error": f"skip-add check failed to run: {type(exc).__name__}: {exc}"}
    rows = [dict(r.__dict__) for r in rep.rows]
    first = next((r for r in rows if r["block"] == rep.first_divergent), None) if rep.first_divergent else None
    return {"first_divergent": rep.first_divergent, "first_row": first, "passed": bool(rep),
            "defects": [str(d) for d in rep.defects], "rows": rows}


def run_parity(checkpoint: str | Path | Reference | None = None,
               variants: Mapping[str, str | Path] | None = None,
               backends: Iterable[str] | None = None,
               config: ParityConfig | None = None,
               *, arch: str | None = None, workdir: str | Path | None = None,
               progress: Callable[[str], None] | None = None,
               engines: Mapping[str, str | Path] | None = None) -> ParityReport:
    """Compare every available backend x precision with the reference (PyTorch FP32, or an FP32 ONNX graph run by
    ONNX Runtime: see :class:`Reference`) on the test split.

    ``checkpoint``: a checkpoint folder (or a :class:`Reference`); with ``arch`` instead, a random-weight model.
    ``variants``: precision -> ONNX path for variants already built; missing ones are built in ``workdir``
    (a temporary folder when not given). ``engines``: ``"<backend> <precision>"`` -> engine file already built
    (a TensorRT plan), judged as given. Every row records the sha256 of the file it judged. Never raises for a
    failed gate: read the report.
    """
    config = config or ParityConfig()
    if backends is not None:
        config.backends = tuple(backends)
    say = progress or (lambda msg: print(f"[parity] {msg}", file=sys.stderr, flush=True))
    for b in config.backends:
        backend_available(b)  # raises InputError on an unknown name
    ref = checkpoint if isinstance(checkpoint, Reference) else load_reference(checkpoint, arch, config.seed)
    data = load_parity_data(ref, config.limit, config.calibration_size)
    say(f"reference {ref.name} on {data.description}")
    ref_logits = ref.logits(data.images)
    labels = data.labels
    ref_acc = float((ref_logits.argmax(1) == labels).mean()) if data.labels_meaningful else None
    with tempfile.TemporaryDirectory(prefix="resdeploy-parity-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        paths = prepare_variants(ref, work, config.precisions, data.calibration, variants, say, data.images[:16])
        rows: list[VariantParity] = []
        localized: dict[Path, dict[str, Any]] = {}
        for backend in config.backends:
            why = backend_available(backend)
            for prec in config.precisions:
                path = paths[prec]
                if why:
                    rows.append(VariantParity(backend, prec, str(path), "", None, skipped=why))
                    continue
                # A GPU backend that fails to build or start (CUDA, TensorRT) is a skipped row with its reason;
                # a CPU engine that fails is a real failure and propagates.
                tolerated = (ResdeployError, RuntimeError) if backend in GPU_BACKENDS else (BackendUnavailable,)
                try:
                    path = engine_for(backend, prec, paths, work, data.calibration, config.batch_size, engines, ref)
                    with open_backend(backend, path, config.threads) as runner:
                        say(f"{backend} {prec}: {runner.description}")
                        logits = run_batches(runner, data.images, config.batch_size)
                        desc = runner.description
                except tolerated as exc:
                    rows.append(VariantParity(backend, prec, str(path), "", None, skipped=f"{type(exc).__name__}: {exc}"))
                    continue
                m = compare(ref_logits, logits, labels if data.labels_meaningful else None)
                gates = config.gates.check(backend, prec, m, data.labels_meaningful)
                div = None
                if config.localize and not all(gates):
                    onnx_path = paths[prec]  # the skip-add check reads the ONNX variant the engine was made from
                    if onnx_path not in localized:
                        say(f"{backend} {prec} failed a gate: localising with the skip-add check")
                        localized[onnx_path] = _localize(onnx_path, ref.model, data.images[:4])
                    div = localized[onnx_path]
                rows.append(VariantParity(backend, prec, str(path), desc, m, gates, divergence=div,
                                          sha256=atomic.sha256_file(path)))
    return ParityReport(ref.name, data.description, ref_acc, tuple(rows), config.gates, ref.kind)

