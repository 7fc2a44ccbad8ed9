"""The release gates' arithmetic: how far an engine's logits are from the reference, and the gate by precision.

Metrics (:func:`compare`) per variant: max abs error, max rel error (per image: max |engine - reference| over the
logits divided by max |reference|, then the worst image), mean abs error, cosine similarity of the logits (mean and
worst image), top-1 agreement with the reference, accuracy and accuracy delta (points).

Gates (:class:`ParityGates`) by precision: FP32 max abs error and top-1 agreement; FP16/BF16 top-1 agreement;
INT8 accuracy drop in points on a trained model, or top-1 agreement with the FP32 reference on a random-weight
model (whose accuracy means nothing). A failed gate (:class:`GateResult`) carries backend, metric, value and limit.

Pure numpy, no I/O: parity, bench, engine choice and the INT8 search judge with these same functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from resdeploy.errors import CheckFailed, InputError


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
