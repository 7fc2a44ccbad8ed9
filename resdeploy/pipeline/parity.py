"""Parity: every backend x precision against the FP32 reference on held-out real images.

    report = run_parity("tests/data/resnet20-mnist", backends=("onnxruntime",))
    assert report, report          # prints the table and the failing gates

What is compared (the reference, the data, the variants, the engines) comes from the workbench
(:mod:`resdeploy.pipeline.workbench`); how it is judged (metrics and gates by precision) from
:mod:`resdeploy.pipeline.gates`. Every report says what the reference was (PyTorch FP32, or the user's FP32 ONNX
graph). When a variant fails, the skip-add check (``resdeploy.export.shortpath``) localises the first residual
block whose output diverges from the reference, and the report names it with its errors.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import BackendUnavailable, CheckFailed, ResdeployError
from resdeploy.pipeline.gates import GateResult, ParityGates, ParityMetrics, compare
from resdeploy.pipeline.workbench import (BACKENDS, GPU_BACKENDS, PRECISIONS, ParityData, Reference, backend_available,
                                          engine_for, load_parity_data, load_reference, open_backend, prepare_variants,
                                          run_batches)


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


def gate_precision(precision: str, runner: Any) -> str:
    """The gate for what runs: an FP32 file that OpenVINO runs in bf16 or f16 (its precision hint) is judged by the
    bf16/fp16 gate; anything else by its file's precision (an INT8 file's float parts in bf16 stay under INT8's)."""
    runs = getattr(runner, "inference_precision", "")
    return {"bf16": "bf16", "f16": "fp16"}.get(runs, precision) if precision == "fp32" else precision


def judge(runner: Any, precision: str, ref_logits: np.ndarray, data: ParityData, gates: ParityGates,
          batch_size: int = 32) -> tuple[ParityMetrics, tuple[GateResult, ...]]:
    """An active runner's logits on ``data``'s images against ``ref_logits``, and the gates of ``precision`` (see
    :func:`gate_precision`): what parity, the engine choice's configurations and the bench's cases are judged by."""
    logits = run_batches(runner, data.images, batch_size)
    m = compare(ref_logits, logits, data.labels if data.labels_meaningful else None)
    return m, gates.check(runner.name, gate_precision(precision, runner), m, data.labels_meaningful)


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
                        m, gates = judge(runner, prec, ref_logits, data, config.gates, config.batch_size)
                        desc = runner.description
                except tolerated as exc:
                    rows.append(VariantParity(backend, prec, str(path), "", None, skipped=f"{type(exc).__name__}: {exc}"))
                    continue
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
