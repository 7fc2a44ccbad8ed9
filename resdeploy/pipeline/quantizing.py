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
from resdeploy.pipeline.gates import points
from resdeploy.artifact import load_onnx, open_artifact, precision_of, staged_onnx
from resdeploy.export.precision import (
    FLAVOURS, Fp16Config, Int8Config, QuantizeReport, flavour_for_backend, flavour_reason, fp16_variant,
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
    search: "SearchConfig | None" = None  # INT8: accuracy-driven search until the gate passes (None = one try)


@dataclass
class SearchConfig:
    """The accuracy-aware INT8 search (``quantize --accuracy-drop``): each step quantizes, judges the gate on the test
    split, and changes one thing. Order: calibration methods -> SmoothQuant scaling -> keep regions in float, the
    first divergent block first, then the region with the largest measured error, one at a time."""

    methods: tuple[str, ...] = ("minmax", "percentile", "entropy")  # tried in this order; the first to pass wins
    smooth_alpha: float | None = 0.5  # SmoothQuant migration strength; None: no smoothing step
    max_kept: int = 8  # regions kept in float before the search gives up
    localise_images: int = 8  # val images for the per-block localisation (never the test split)


@dataclass(frozen=True)
class Accuracy:
    images: int
    fp32: float  # top-1 accuracy of the FP32 source
    variant: float  # top-1 accuracy of the variant
    agreement: float  # fraction of images where both predict the same class

    @property
    def drop_points(self) -> float:
        return points(self.fp32 - self.variant)

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
    search: "SearchReport | None" = None  # the accuracy-driven search's steps (quantize --accuracy-drop)

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
        if self.search is not None:
            lines.append("  " + str(self.search).replace("\n", "\n  "))
        if self.accuracy is not None:
            lines.append(f"  {self.accuracy}; gate: {self.gate}")
        lines.append("  " + str(self.skipadd).replace("\n", "\n  "))
        return "\n".join(lines)


@dataclass(frozen=True)
class SearchStep:
    """One try of the INT8 search, judged on the test split."""

    step: int
    action: str  # what this step changed, and why
    method: str  # calibration method
    smooth: bool  # SmoothQuant scaling applied
    kept: tuple[str, ...]  # regions (blocks, stem, head) kept in float so far
    accuracy: float  # top-1 of the variant on the test split
    drop_points: float  # FP32 minus variant, points
    gate_passed: bool
    skipadd_passed: bool  # no residual Add diverges (cosine >= 0.9 on the localisation images)
    first_divergent: str | None  # first block whose Add output diverges (localisation on val images)
    block_errors: dict[str, float] = field(default_factory=dict)  # region -> added error (1 - cosine) over its input
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.gate_passed and self.skipadd_passed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kept"] = list(self.kept)
        d["block_errors"] = {k: round(v, 6) for k, v in self.block_errors.items()}
        return d

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else ("fails skip-add" if self.gate_passed else "fails gate")
        div = f", first divergent {self.first_divergent}" if self.first_divergent else ""
        return (f"step {self.step}: {self.action}: accuracy {self.accuracy:.2%} (drop {self.drop_points:+.2f} points) "
                f"{verdict}{div} [{self.seconds:.0f} s]")


@dataclass(frozen=True)
class KeptRegion:
    name: str  # block module path, stem or head
    nodes: tuple[str, ...]  # ONNX nodes left out of INT8
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.name, "nodes": list(self.nodes), "why": self.why}


@dataclass(frozen=True)
class SearchReport:
    """What the accuracy-driven search tried and what it chose (also written to the variant's metadata)."""

    gate: str
    fp32_accuracy: float
    steps: tuple[SearchStep, ...]
    chosen: int | None  # index into steps of the variant written; None when no step passed
    kept: tuple[KeptRegion, ...]  # of the chosen step
    smooth: str = ""  # SmoothReport of the chosen step, in words

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        c = self.steps[self.chosen] if self.chosen is not None else None
        return {"gate": self.gate, "fp32_accuracy": self.fp32_accuracy, "passed": self.passed,
                "method": c.method if c else None, "smoothquant": self.smooth if c and c.smooth else "",
                "kept_float": [k.to_dict() for k in self.kept],
                "int8_regions_kept_float": len(self.kept), "steps": [s.to_dict() for s in self.steps]}

    def metadata(self) -> dict[str, Any]:
        """The variant's ``mixed_precision`` metadata: kept regions with nodes and why, the steps' accuracies."""
        d = self.to_dict()
        d["steps"] = [{"step": s.step, "action": s.action, "method": s.method, "smooth": s.smooth, "kept": list(s.kept),
                       "accuracy": round(s.accuracy, 6), "drop_points": round(s.drop_points, 3), "passed": s.passed,
                       "first_divergent": s.first_divergent} for s in self.steps]
        return d

    def __str__(self) -> str:
        head = (f"accuracy-driven INT8 search ({self.gate}; FP32 {self.fp32_accuracy:.2%} on the test split): "
                + (f"chose step {self.steps[self.chosen].step}" if self.chosen is not None else "no step passed"))
        lines = [head, *(f"  {s}" for s in self.steps)]
        if self.kept:
            lines.append("kept in float: " + "; ".join(f"{k.name} ({len(k.nodes)} nodes: {k.why})" for k in self.kept))
        elif self.chosen is not None:
            lines.append("kept in float: nothing (every conv and residual Add is INT8)")
        return "\n".join(lines)


def _block_errors(skip: Any, head_cosine: float | None) -> dict[str, float]:
    """Per region: how much (1 - cosine) its residual Add output adds over the previous one (the head: the logits
    over the last Add). The error at an Add is cumulative; its increase is what the block itself contributes."""
    out: dict[str, float] = {}
    prev = 0.0
    for row in skip.rows:
        if row.cosine is None or not row.block:
            continue
        err = 1.0 - float(row.cosine)
        out[row.block] = max(0.0, err - prev)
        prev = err
    if head_cosine is not None:
        out["head"] = max(0.0, (1.0 - head_cosine) - prev)
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def search_int8(src: Path, out: Path, *, flavour: str, config: QuantizeConfig, search: SearchConfig,
                calibration: CalibrationSet, localise_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                ref_model: Any, extra_meta: dict[str, Any], say: Any = None) -> tuple[QuantizeReport, SearchReport]:
    """Quantize ``src`` step by step until the accuracy gate passes (see :class:`SearchConfig`); write the chosen
    variant to ``out`` with the search in its ``mixed_precision`` metadata. Raises CheckFailed when no step passes
    (nothing written), with every step's accuracy in the message."""
    import tempfile
    import time

    from resdeploy.artifact import load_onnx as _load, read_metadata, save_onnx, write_metadata
    from resdeploy.export.mixed import activation_ranges, quantizable_nodes, regions, smooth_activations
    from resdeploy.export.skipadd import check_skip_adds

    say = say or (lambda _m: None)
    for m in search.methods:
        if m not in ("minmax", "percentile", "entropy"):
            raise InputError(f"search method {m!r} unknown; use minmax, percentile, entropy")
    if not search.methods:
        raise InputError("the INT8 search needs at least one calibration method")
    fp32_pred = _predict(src, test_x, config.threads)
    fp32_acc = float((fp32_pred == test_y).mean())
    gate = f"accuracy drop <= {config.max_int8_drop:g} points"
    source = _load(src, weights=True)
    regs = {r.name: r for r in regions(source)}
    src_sha = atomic.sha256_file(src)
    ref_logits = None
    if ref_model is not None and len(localise_x):
        import torch

        with torch.inference_mode():
            ref_logits = ref_model(torch.from_numpy(np.ascontiguousarray(localise_x))).numpy()
    steps: list[SearchStep] = []
    files: dict[int, Path] = {}
    reports: dict[int, QuantizeReport] = {}
    smooth_desc = ""
    with tempfile.TemporaryDirectory(prefix="resdeploy-int8-search-") as tmp:
        work = Path(tmp)
        smoothed: Path | None = None

        def attempt(action: str, method: str, smooth: bool, kept: tuple[str, ...]) -> SearchStep:
            t0 = time.perf_counter()
            k = len(steps) + 1
            path = work / f"step{k}.onnx"
            exclude = tuple(n for name in kept for n in quantizable_nodes(source, regs[name]))
            cfg = dataclasses.replace(config.int8, method=method, nodes_to_exclude=exclude)
            rep = quantize_int8(smoothed if smooth else src, path, calibration, flavour=flavour, config=cfg,
                                metadata={**extra_meta, "source_sha256": src_sha})
            pred = _predict(path, test_x, config.threads)
            acc = float((pred == test_y).mean())
            drop = points(fp32_acc - acc)
            first, skip_ok, errors = None, True, {}
            if ref_model is not None and len(localise_x):
                skip = check_skip_adds(path, ref_model, localise_x, max_images=len(localise_x))
                first, skip_ok = skip.first_divergent, bool(skip)
                head_cos = None
                if ref_logits is not None:
                    head_cos = _cosine_rows(_logits(path, localise_x, config.threads), ref_logits)
                errors = _block_errors(skip, head_cos)
            step = SearchStep(k, action, method, smooth, kept, acc, drop, drop <= config.max_int8_drop, skip_ok, first,
                              errors, time.perf_counter() - t0)
            steps.append(step)
            files[k] = path
            reports[k] = rep
            say(str(step))
            return step

        best: SearchStep | None = None
        for i, method in enumerate(search.methods):
            why = "the default calibration" if i == 0 else f"{steps[-1].method} calibration failed"
            st = attempt(f"{method} calibration ({why})", method, False, ())
            if best is None or st.accuracy > best.accuracy:
                best = st
            if st.passed:
                break
        assert best is not None
        if not best.passed and search.smooth_alpha is not None:
            ranges = activation_ranges(source, calibration.images, threads=config.threads)
            sm, sm_rep = smooth_activations(source, ranges, alpha=search.smooth_alpha)
            smooth_desc = str(sm_rep)
            if sm_rep.pairs:
                smoothed = work / "smoothed.onnx"
                save_onnx(sm, smoothed)
                st = attempt(f"{best.method} + {sm_rep}", best.method, True, ())
                if st.accuracy > best.accuracy:
                    best = st
        why_kept: dict[str, str] = {}
        while not best.passed and len(best.kept) < min(search.max_kept, len(regs)):
            candidates = {k: v for k, v in best.block_errors.items() if k in regs and k not in best.kept}
            pick, why = None, ""
            if best.first_divergent and best.first_divergent in regs and best.first_divergent not in best.kept:
                pick = best.first_divergent
                why = (f"first divergent block at step {best.step} (its Add output's cosine with PyTorch below 0.9; "
                       f"added error {best.block_errors.get(pick, 0.0):.3g})")
            elif candidates:
                pick = max(candidates, key=candidates.__getitem__)
                why = f"largest measured error at step {best.step} (adds {candidates[pick]:.3g} to 1 - cosine)"
            if pick is None:
                break
            why_kept[pick] = why
            st = attempt(f"keep {pick} in float: {why}", best.method, best.smooth, (*best.kept, pick))
            best = st  # go on from here: one more region in float at each step
        passing = [s for s in steps if s.passed]
        # the fastest passing variant: fewest nodes left in float, then the best accuracy
        chosen = min(passing, key=lambda s: (len(s.kept), -s.accuracy)) if passing else None
        kept = tuple(KeptRegion(name, quantizable_nodes(source, regs[name]), why_kept.get(name, ""))
                     for name in (chosen.kept if chosen else ()))
        report = SearchReport(gate, fp32_acc, tuple(steps), steps.index(chosen) if chosen else None, kept,
                              smooth_desc if chosen and chosen.smooth else "")
        if chosen is None:
            raise CheckFailed(f"the INT8 search on {src} found no variant that passes ({gate} and the skip-add check); "
                              f"nothing written. Steps:\n{report}\nFix: allow more regions in float "
                              "(SearchConfig.max_kept), calibrate on more val images, or ship the FP16 variant")
        model = _load(files[chosen.step], weights=True)
        meta = read_metadata(model)
        write_metadata(model, dataclasses.replace(meta, mixed_precision=report.metadata(),
                                                  calibration={**(meta.calibration or {}), "method": chosen.method}))
        save_onnx(model, out)
        return reports[chosen.step], report


def _logits(path: str | Path, images: np.ndarray, threads: int | None, batch: int = 256) -> np.ndarray:
    """Logits of ``images`` from ONNX Runtime CPU (full optimisation), in batches."""
    from resdeploy.engines import open_runner

    out = []
    with open_runner(str(path), backend="onnxruntime", provider="cpu", threads=threads, optimization="all") as r:
        name = r.inputs[0].name
        for i in range(0, len(images), batch):
            out.append(np.asarray(next(iter(r.infer({name: np.ascontiguousarray(images[i:i + batch])}).values()))))
    return np.concatenate(out)


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
    return _logits(path, images, threads, batch).argmax(axis=1)


def evaluate(fp32_path: str | Path, variant_path: str | Path, images: np.ndarray, labels: np.ndarray,
             threads: int | None = None) -> Accuracy:
    """Top-1 accuracy of both models and their agreement, in ONNX Runtime CPU."""
    a = _predict(fp32_path, images, threads)
    b = _predict(variant_path, images, threads)
    return Accuracy(len(labels), float((a == labels).mean()), float((b == labels).mean()), float((a == b).mean()))


def quantize_model(model_path: str | Path, out: str | Path, *, config: QuantizeConfig | None = None,
                   reference: str | Path | Any | None = None, say: Any = None) -> QuantizeResult:
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
                                ref_model, extra_meta, say)
        return dataclasses.replace(result, rewrite=rewrite)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _write_variant(src: Path, variant_src: Path, out: Path, config: QuantizeConfig, data: Any, spec: Any,
                   source_name: str, flavour: str | None, reason: str, ref_model: Any,
                   extra_meta: dict[str, Any], say: Any = None) -> QuantizeResult:
    from resdeploy.export.shortpath import check_short_paths
    from resdeploy.models import normalize
    from resdeploy.models.data import fit_images

    test_x = normalize(fit_images(data.test.images[: config.eval_images], spec.shape), spec.mean, spec.std)
    test_y = data.test.labels[: config.eval_images]
    search: SearchReport | None = None
    with staged_onnx(out) as tmp:  # model + <name>.data checked where they are, then moved into place
        if config.precision == "fp16":
            report = fp16_variant(variant_src, tmp, config=config.fp16, metadata=extra_meta)
        else:
            cal_x = fit_images(data.val.images[: config.calibration_images], spec.shape)
            cal = CalibrationSet(normalize(cal_x, spec.mean, spec.std), source_name, "val", data.fingerprint)
            if config.search is not None:
                n_loc = config.search.localise_images if ref_model is not None else 0
                loc_x = normalize(fit_images(data.val.images[:n_loc], spec.shape), spec.mean, spec.std)
                report, search = search_int8(variant_src, tmp, flavour=flavour, config=config, search=config.search,
                                             calibration=cal, localise_x=loc_x, test_x=test_x, test_y=test_y,
                                             ref_model=ref_model, extra_meta=extra_meta, say=say)
            else:
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
    return QuantizeResult(Path(out), config.precision, flavour, reason, report, skip, acc, gate, search=search)
