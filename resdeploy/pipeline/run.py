"""``resdeploy run``: every stage, one run folder, cached by content, one report.

    result = run_pipeline(load_config("resdeploy.toml"))
    print(result)          # one line per stage; result.passed says whether every gate passed

Stages, each consuming the artifact the one before wrote (never a sibling copy):

    train (or the given checkpoint) -> export (+ skip-add check) -> variant-fp16 / variant-int8 (each re-checked
    and gated; INT8 searched until its gate passes with ``variants.int8_search``) -> engine-<backend>-<precision>
    (fusion reports) -> parity (the very files of the repository) -> engine-choice (every CPU engine x precision
    that passed parity timed here; ``engines.choose``) -> bench -> repository (serves the chosen engine) -> report

**Cache.** A stage's key is the sha256 of its name, its config section, the sha256 of every input file and the
library versions. After a stage has written its outputs (each atomically) it writes ``stages/<name>.json`` with
the key and the sha256 of every output, last. A stage is skipped ("cached") only when that record exists, its key
matches and every output still has the recorded sha256; the record is deleted before a stage reruns. So a run
interrupted anywhere leaves no artifact that a rerun would trust, and changing one option reruns only the stages
whose key it changes and those downstream of their outputs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import resdeploy
from resdeploy import atomic
from resdeploy.errors import BackendUnavailable, CheckFailed, InputError
from resdeploy.pipeline.config import RunConfig
from resdeploy.pipeline.sources import ModelSource, key_of, resolve_source

RUN_FORMAT = 1  # bump when stage records change meaning: every cached stage then reruns
_VERSIONED = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")


@dataclass(frozen=True)
class StageRecord:
    """One stage of a run: what it did, how long, and what it left behind (sha256 per output file)."""

    name: str
    status: str  # ran | cached | failed | skipped
    seconds: float
    summary: str  # one line: the stage's result
    key: str = ""  # the cache key (sha256)
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the run folder -> sha256
    result: dict[str, Any] = field(default_factory=dict)  # the stage's report as data (for run.json and the report)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self, index: int, total: int) -> str:
        secs = f"{self.seconds:6.1f} s" if self.status in ("ran", "failed") else f"{'':>8}"
        return f"[{index:>2}/{total}] {self.name:<24} {self.status:<7} {secs}  {self.summary}"


@dataclass(frozen=True)
class RunResult:
    """What ``resdeploy run`` did. True when every stage ran or was cached and every gate passed."""

    run_dir: Path
    stages: tuple[StageRecord, ...]
    failed_gate: str | None
    wall_seconds: float
    report: tuple[Path, ...] = ()

    @property
    def passed(self) -> bool:
        return self.failed_gate is None

    def __bool__(self) -> bool:
        return self.passed

    def stage(self, name: str) -> StageRecord:
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"no stage {name!r} in this run; stages: {', '.join(s.name for s in self.stages)}")

    def verdict(self) -> str:
        """The closing lines: pass/fail, what ran, where the report is (the stage lines were printed as they ran)."""
        ran = sum(s.status == "ran" for s in self.stages)
        cached = sum(s.status == "cached" for s in self.stages)
        head = "PASSED: every gate passed" if self.passed else f"FAILED: {self.failed_gate}"
        lines = [f"{head}. {ran} stage(s) ran, {cached} cached"
                 + (" (nothing changed: nothing redone)" if ran == 0 and cached else "")
                 + f", {self.wall_seconds:.1f} s. Run folder: {self.run_dir}"]
        return "\n".join(lines + [f"report: {p}" for p in self.report])

    def __str__(self) -> str:
        return "\n".join([*(s.line(i + 1, len(self.stages)) for i, s in enumerate(self.stages)), self.verdict()])


class _StageFailed(Exception):
    """A stage's check or gate failed: the run stops there (downstream stages are skipped) and exits 1."""


def library_versions() -> dict[str, str | None]:
    """Versions that change what a stage produces (they are part of every cache key)."""
    out: dict[str, str | None] = {"resdeploy": resdeploy.__version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _files(path: Path) -> list[Path]:
    """The files a stage output names: the file (with its ONNX external data beside it), or every file of a folder."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    extra = [path.with_name(path.name + ".data")] if path.suffix == ".onnx" else []
    return [path, *[e for e in extra if e.is_file()]]


class _Runner:
    """Runs stages in order with the cache rule of the module docstring; prints one line per stage."""

    def __init__(self, cfg: RunConfig, root: Path, total: int, say: Callable[[str], None]) -> None:
        self.cfg, self.root, self.total, self.say = cfg, root, total, say
        self.versions = library_versions()
        self.records: list[StageRecord] = []
        (root / "stages").mkdir(parents=True, exist_ok=True)

    def rel(self, p: Path) -> str:
        return p.resolve().relative_to(self.root.resolve()).as_posix()

    def sha(self, *paths: Path) -> str:
        """One sha256 over the files of ``paths`` (names and contents): a stage input."""
        h = hashlib.sha256()
        for p in paths:
            for f in _files(p):  # names relative to the input itself: the key does not depend on where it lives
                name = f.relative_to(p).as_posix() if p.is_dir() else f.name
                h.update(name.encode() + b"\0" + atomic.sha256_file(f).encode() + b"\0")
        return h.hexdigest()

    def _emit(self, rec: StageRecord) -> StageRecord:
        self.records.append(rec)
        self.say(rec.line(len(self.records), self.total))
        return rec

    def skip(self, name: str, why: str) -> StageRecord:
        (self.root / "stages" / f"{name}.json").unlink(missing_ok=True)
        return self._emit(StageRecord(name, "skipped", 0.0, why))

    def stage(self, name: str, config: Any, inputs: dict[str, str],
              fn: Callable[[], tuple[str, dict[str, Any], list[Path]]]) -> StageRecord:
        key = hashlib.sha256(json.dumps({"format": RUN_FORMAT, "stage": name, "config": config, "inputs": inputs,
                                         "versions": self.versions}, sort_keys=True, default=str).encode()).hexdigest()
        rec_path = self.root / "stages" / f"{name}.json"
        cached = self._cached(rec_path, key)
        if cached is not None:
            return self._emit(dataclasses.replace(cached, status="cached", seconds=0.0))
        rec_path.unlink(missing_ok=True)  # from here on, the old outputs are not to be trusted
        t0 = time.perf_counter()
        try:
            summary, result, outputs = fn()
        except (CheckFailed, BackendUnavailable) as exc:
            self._emit(StageRecord(name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}", key))
            raise _StageFailed(f"stage {name}: {exc}") from None
        files = {self.rel(f): atomic.sha256_file(f) for p in outputs for f in _files(p)}
        rec = StageRecord(name, "ran", time.perf_counter() - t0, summary, key, files, result)
        atomic.write_json(rec_path, rec.to_dict())  # last: the outputs are trusted from now on
        return self._emit(rec)

    def _cached(self, rec_path: Path, key: str) -> StageRecord | None:
        try:
            data = json.loads(rec_path.read_text())
            rec = StageRecord(**data)
        except (OSError, ValueError, TypeError):
            return None
        if rec.key != key or rec.status != "ran" or not rec.outputs:
            return None
        for rel, sha in rec.outputs.items():
            f = self.root / rel
            if not f.is_file() or atomic.sha256_file(f) != sha:
                return None
        return rec

    def output(self, name: str) -> StageRecord:
        return next(r for r in self.records if r.name == name)


# -- the stages --------------------------------------------------------------------------------------------
def _tensorrt_usable() -> str | None:
    """None when TensorRT can build here, else why not (asked of the driver, never of TensorRT itself)."""
    from resdeploy.device import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _engine_backends(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(backends that get an engine build, notes). auto: TensorRT where usable, else ONNX Runtime."""
    wanted = list(dict.fromkeys(cfg.engines.backends))
    notes = []
    out: list[str] = []
    for b in wanted:
        if b == "auto":
            why = _tensorrt_usable()
            if why is None:
                out.append("tensorrt")
            else:
                notes.append(f"auto: ONNX Runtime (TensorRT unusable here: {why.split(';')[0]})")
            out.append("onnxruntime")
        elif b in ("onnxruntime", "tensorrt"):
            out.append(b)
    return list(dict.fromkeys(out)), notes


def _parity_backends(cfg: RunConfig, engines: list[str]) -> list[str]:
    out = list(engines)
    if "openvino" in cfg.engines.backends or ("auto" in cfg.engines.backends and importlib.util.find_spec("openvino")):
        out.append("openvino")
    return list(dict.fromkeys(out))


def _model_key(r: _Runner, src: ModelSource) -> dict[str, str]:
    """Cache-key inputs that name the reference model and its data: the checkpoint's files, the factory's code and
    kwargs with the weights' sha256, or the ONNX file's sha256."""
    out = {"data": src.data, "model": key_of(src)}
    if src.checkpoint is not None:
        out["checkpoint"] = r.sha(src.checkpoint)
    return out


def _train(r: _Runner, cfg: RunConfig, src: ModelSource) -> None:
    """Train a registry architecture or the user's factory on the data (sets ``src.checkpoint``); skipped when the
    model came with its weights (a checkpoint, the factory's weights, or an ONNX file)."""
    if src.given:
        r.skip("train", src.given)
        return
    out = r.root / "checkpoint"
    m, t = cfg.model, cfg.train

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.models.train import TrainConfig, train

        result = train(TrainConfig(arch=m.arch, data=src.data, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                   seed=t.seed, threads=t.threads or None, image_size=t.image_size or None,
                                   channels=t.channels or None, augment=t.augment, max_batches=t.max_batches or None,
                                   factory=src.factory, input_shape=tuple(m.input_shape) or None,  # type: ignore[arg-type]
                                   mean=tuple(m.mean), std=tuple(m.std), labels=tuple(m.labels)),
                       out_dir=out)
        return (f"{result.arch}: test accuracy {result.test_accuracy:.2%} after {result.epochs} epochs",
                {"test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy}, [out])

    own = ({"arch": m.arch} if src.factory is None else
           {"factory": key_of(src), "input_shape": m.input_shape, "mean": m.mean, "std": m.std, "labels": m.labels})
    r.stage("train", {**own, **dataclasses.asdict(t), "data": src.data}, {}, run)
    src.checkpoint = out


def _export(r: _Runner, cfg: RunConfig, src: ModelSource) -> Path:
    """The FP32 ONNX: exported from the checkpoint or the factory's network, or the user's ONNX imported; then the
    short-path check (against the PyTorch model; structure only for an imported ONNX)."""
    out = r.root / "onnx" / "fp32.onnx"
    e = cfg.export

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        if src.kind == "onnx":
            return _import(src, out)
        from resdeploy.export import ExportConfig
        from resdeploy.pipeline.exporting import export_checkpoint, export_user_model

        config = dataclasses.replace(ExportConfig(), exporter=e.exporter, opset=e.opset, parity_images=e.parity_images)
        if src.kind == "factory":
            res = export_user_model(src, out, config=config)
        else:
            res = export_checkpoint(src.checkpoint, out, config=config)
        rep, check = res.export, res.check
        if not res:
            raise CheckFailed(f"export of {src.name} failed its checks:\n{res}")
        adds = sum(1 for a in check.adds) if check is not None else 0
        return (f"opset {rep.opset}, max abs {rep.parity.max_abs_err:.1e} vs PyTorch, {adds} residual adds checked",
                {"sha256": rep.sha256, "opset": rep.opset, "exporter": rep.exporter, "parity": dataclasses.asdict(rep.parity),
                 "external_data": rep.external_data, "skipadd": check.to_dict() if check else None}, [out])

    m = cfg.model
    own = {"input_shape": m.input_shape, "mean": m.mean, "std": m.std, "labels": m.labels} if src.kind in ("factory", "onnx") else {}
    r.stage("export", {**dataclasses.asdict(e), **own}, _model_key(r, src), run)
    return out


def _import(src: ModelSource, out: Path) -> tuple[str, dict[str, Any], list[Path]]:
    """The export stage for the user's ONNX: copied with resdeploy's metadata, then the short-path check on its
    structure (no PyTorch model to compare numbers with)."""
    from resdeploy.export import check_short_paths
    from resdeploy.pipeline.sources import import_onnx

    info = import_onnx(src, out)
    check = check_short_paths(out)
    if not check:
        raise CheckFailed(f"the short-path check of {src.onnx} (structure only) failed:\n{check}")
    adds = len(check.adds)
    return (f"imported {src.onnx.name} (sha256 {info['source_sha256'][:12]}), opset {info['opset']}, {adds} residual "
            "adds found (structure only: the reference is this graph in ONNX Runtime)",
            {**info, "parity": None, "skipadd": check.to_dict()}, [out])


def _variant(r: _Runner, cfg: RunConfig, src: ModelSource, fp32: Path, precision: str, flavour: str | None) -> Path:
    name = f"variant-{precision}" + (f"-{flavour}" if flavour and flavour != "u8s8" else "")
    out = r.root / "onnx" / (f"{precision}.onnx" if not flavour or flavour == "u8s8" else f"{precision}-{flavour}.onnx")
    v = cfg.variants

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.quantizing import QuantizeConfig, quantize_model

        qc = QuantizeConfig(precision=precision, flavour=flavour, data=src.data or "mnist",
                            calibration_images=v.calibration_images, max_int8_drop=v.max_int8_drop,
                            min_fp16_agreement=v.min_fp16_agreement, threads=cfg.engines.threads or None)
        qc.int8.method = v.int8_method
        if precision == "int8" and v.int8_search:
            from resdeploy.pipeline.quantizing import SearchConfig

            # the configured method first, then the others
            qc.search = SearchConfig(methods=tuple(dict.fromkeys((v.int8_method, "minmax", "percentile", "entropy"))))
        res = quantize_model(fp32, out, config=qc, reference=src.reference().model)
        acc = res.accuracy
        summary = (f"{precision}" + (f" {flavour}" if flavour else "") + f": {acc}" if acc else precision)
        search = res.search
        if search is not None and (len(search.steps) > 1 or search.kept):
            kept = ", ".join(k.name for k in search.kept) or "none"
            summary += f"; search: {len(search.steps)} steps, kept in float: {kept}"
        return (summary, {"precision": precision, "flavour": flavour, "gate": res.gate,
                          "accuracy": dataclasses.asdict(acc) if acc else None, "skipadd": res.skipadd.to_dict(),
                          "search": search.to_dict() if search is not None else None}, [out])

    # Only the options this variant reads: changing the INT8 calibration must not redo the FP16 variant.
    own = ({"min_fp16_agreement": v.min_fp16_agreement} if precision == "fp16" else
           {"int8_method": v.int8_method, "calibration_images": v.calibration_images, "max_int8_drop": v.max_int8_drop,
            "int8_search": v.int8_search})
    r.stage(name, {**own, "precision": precision, "flavour": flavour, "threads": cfg.engines.threads},
            {"fp32": r.sha(fp32), **_model_key(r, src)}, run)
    return out


def _engine(r: _Runner, cfg: RunConfig, data: str, backend: str, precision: str, src: Path) -> Path:
    name = f"engine-{backend}-{precision}"

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.building import BuildConfig, build

        if backend == "onnxruntime":
            out = r.root / "engines" / f"onnxruntime-{precision}"
            rep = build(src, out, config=BuildConfig(threads=cfg.engines.threads or None, data=data or "mnist",
                                                     rewrite_option_a=cfg.variants.rewrite_option_a and precision == "fp32"))
            f = rep.fusion
            forms = ", ".join(f"{n} {form}" for form, n in sorted(f.by_form().items())) or "no residual adds"
            return (f"{f.fused}/{len(f.adds)} residual adds fused ({forms})",
                    {"fusion": f.to_dict(), "build": rep.build}, [out])
        from resdeploy.engines.tensorrt_build import TrtBuildConfig

        plan = r.root / "engines" / f"tensorrt-{precision}.plan"
        rep = build(src, plan, config=BuildConfig(backend="tensorrt", trt=TrtBuildConfig(
            min_batch=1, opt_batch=min(8, cfg.engines.trt_max_batch), max_batch=cfg.engines.trt_max_batch)))
        return (str(rep).splitlines()[0], {"build": str(rep)}, [plan, Path(f"{plan}.json")])

    own = ({"threads": cfg.engines.threads, "rewrite_option_a": cfg.variants.rewrite_option_a and precision == "fp32"}
           if backend == "onnxruntime" else {"trt_max_batch": cfg.engines.trt_max_batch})
    r.stage(name, {"backend": backend, "precision": precision, **own}, {"model": r.sha(src)}, run)
    return r.root / "engines" / (f"onnxruntime-{precision}" if backend == "onnxruntime" else f"tensorrt-{precision}.plan")


def run_pipeline(cfg: RunConfig, *, say: Callable[[str], None] | None = None) -> RunResult:
    """Run (or reuse) every stage into ``cfg.out``; write run.json and the report; return what happened.

    Raises InputError for bad input (exit 2). A failed check or gate does not raise: the run stops at that stage,
    the report is still written, and ``RunResult.failed_gate`` names it (exit 1).
    """
    cfg.validate()
    say = say or (lambda line: print(line, flush=True))
    t0 = time.perf_counter()
    # Before the run folder is touched: the factory imported and run on a batch, weights loaded, the ONNX checked.
    src = resolve_source(cfg.model, data=cfg.train.data, train=cfg.train, precisions=cfg.variants.precisions)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    engines, notes = _engine_backends(cfg)
    precisions = ["fp32", *cfg.variants.precisions]
    s8s8 = "int8" in precisions and ("tensorrt" in engines or cfg.parity.polygraphy)  # TensorRT's symmetric int8
    total = (2 + len(cfg.variants.precisions) + s8s8  # train, export, variants
             + len(engines) * len(precisions) + 3 + cfg.parity.polygraphy  # engines; parity, (polygraphy), bench, repo
             + (cfg.engines.choose == "measure"))  # (engine choice)
    r = _Runner(cfg, root, total, say)
    for n in notes:
        say(f"note: {n}")
    failed: str | None = None
    variants: dict[str, Path] = {}
    built: dict[str, Path] = {}
    try:
        _train(r, cfg, src)
        variants["fp32"] = _export(r, cfg, src)
        for p in cfg.variants.precisions:
            variants[p] = _variant(r, cfg, src, variants["fp32"], p, "u8s8" if p == "int8" else None)
        if s8s8:
            variants["int8-s8s8"] = _variant(r, cfg, src, variants["fp32"], "int8", "s8s8")
        for backend in engines:
            for p in precisions:
                model = variants["int8-s8s8"] if backend == "tensorrt" and p == "int8" else variants[p]
                built[f"{backend} {p}"] = _engine(r, cfg, src.data, backend, p, model)
        failed = _parity(r, cfg, src, variants, built, engines)
        if cfg.parity.polygraphy:  # a failed gate is when a user most needs it
            _polygraphy(r, cfg, src, variants)
        if failed is None:
            choice = _engine_choice(r, cfg, src, variants) if cfg.engines.choose == "measure" else None
            served = served_engine(choice, _served_precision(cfg, variants, choice))
            _bench(r, cfg, src, variants, served, choice)
            _repository(r, cfg, variants, choice)
        else:
            if cfg.engines.choose == "measure":
                r.skip("engine-choice", "not run: a parity gate failed")
            r.skip("bench", "not run: a parity gate failed")
            r.skip("repository", "not written: a parity gate failed (nothing unverified is served)")
    except _StageFailed as exc:
        failed = str(exc)
        done = {s.name for s in r.records}
        for name in ("parity", *(["polygraphy"] if cfg.parity.polygraphy else []),
                     *(["engine-choice"] if cfg.engines.choose == "measure" else []), "bench", "repository"):
            if name not in done:
                r.skip(name, "not run: an earlier stage failed")
    wall = time.perf_counter() - t0
    files = _write_summary(r, cfg, src, failed, started, wall)
    return RunResult(root, tuple(r.records), failed, wall, files)


def _parity_gates(cfg: RunConfig, src: ModelSource) -> Any:
    """The run's parity gates (gates.ParityGates). FP32 of a user's network is gated on relative error unless
    ``parity.fp32_max_rel`` says otherwise: an absolute bound set for the registry's logits means nothing for
    logits of another scale."""
    from resdeploy.pipeline.gates import ParityGates

    p = cfg.parity
    rel = p.fp32_max_rel or (1e-5 if src.kind in ("factory", "onnx") else None)
    return dataclasses.replace(ParityGates(), fp32_max_abs=p.fp32_max_abs, fp32_max_rel=rel,
                               fp16_min_agreement=p.fp16_min_agreement, int8_max_accuracy_drop=p.int8_max_drop)


def _parity(r: _Runner, cfg: RunConfig, src: ModelSource, variants: dict[str, Path], built: dict[str, Path],
            engines: list[str]) -> str | None:
    backends = _parity_backends(cfg, engines)
    judged = {p: variants[p] for p in ("fp32", *cfg.variants.precisions)}
    plans = {k: v for k, v in built.items() if k.startswith("tensorrt ")}
    out = r.root / "parity.json"

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.parity import ParityConfig, run_parity

        p = cfg.parity
        gates = _parity_gates(cfg, src)
        report = run_parity(src.reference(), judged, config=ParityConfig(backends=tuple(backends), precisions=tuple(judged),
                                                              limit=p.limit or None, threads=cfg.engines.threads or None,
                                                              gates=gates),
                            engines=plans, progress=lambda _m: None)
        atomic.write_json(out, report.to_dict())
        ran = [row for row in report.rows if row.metrics is not None]
        summary = (f"{len(ran)} backend x precision compared on {ran[0].metrics.n if ran else 0} test images: "
                   + ("every gate passed" if report else f"FAILED {report.failures()[0] if report.failures() else 'no backend ran'}"))
        return summary, report.to_dict(), [out]

    rec = r.stage("parity", {**dataclasses.asdict(cfg.parity), "backends": backends},
                  {**{k: r.sha(v) for k, v in {**judged, **plans}.items()}, **_model_key(r, src)}, run)
    if rec.result.get("passed"):
        return None
    fails = rec.result.get("failures") or ["no backend ran"]
    return f"parity gate: {fails[0]}" + (f" (+{len(fails) - 1} more)" if len(fails) > 1 else "")


def _polygraphy(r: _Runner, cfg: RunConfig, src: ModelSource, variants: dict[str, Path]) -> None:
    """<run>/polygraphy/: parity's check in Polygraphy's formats, for the engines this machine cannot run."""
    out = r.root / "polygraphy"
    gates = _parity_gates(cfg, src)

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.polygraphy_kit import write_run_kit

        kit = write_run_kit(out, src.reference(), variants, gates, limit=cfg.parity.limit or None,
                            calibration_size=cfg.variants.calibration_images)
        probes = {k: len(v) for k, v in kit.probes.items()}
        summary = (f"{len(kit.commands)} Polygraphy checks of {', '.join(probes)} on {kit.images} images, "
                   f"{max(probes.values(), default=0)} block probes: {out.name}/README.md")
        return summary, kit.to_dict(), [out]

    r.stage("polygraphy", {"limit": cfg.parity.limit, "calibration_images": cfg.variants.calibration_images,
                           "gates": dataclasses.asdict(gates)},
            {**{k: r.sha(v) for k, v in variants.items()}, **_model_key(r, src)}, run)


def _bench(r: _Runner, cfg: RunConfig, src: ModelSource, variants: dict[str, Path], served: dict[str, Any],
           choice: dict[str, Any] | None) -> None:
    """Latency of every engine and anchor, the served configuration first (set up, checked and timed before the
    others, dropped last)."""
    b = cfg.bench
    if not b.enabled:
        r.skip("bench", "disabled (bench.enabled = false)")
        return
    out = r.root / "bench"
    judged = {p: str(variants[p]) for p in ("fp32", *cfg.variants.precisions)}
    backends = tuple(x for x in _parity_backends(cfg, ["onnxruntime"]) if x in ("onnxruntime", "openvino"))
    serving = {k: served[k] for k in ("backend", "precision", "settings")}

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        import io

        from resdeploy.pipeline.bench import BenchConfig, run_bench

        bc = BenchConfig(reference=src.reference(), gates=_parity_gates(cfg, src), batches=tuple(b.batches),
                         max_seconds=b.max_seconds, threads=b.threads, backends=backends, precisions=tuple(judged),
                         anchors=tuple(b.anchors), variants=judged, served=serving)
        result = run_bench(bc, out_dir=out, stream=io.StringIO())
        return _bench_summary(result, min(b.batches), b.max_seconds, choice), result.to_dict(), [out]

    r.stage("bench", {**dataclasses.asdict(b), "backends": list(backends), "served": serving,
                      "gates": dataclasses.asdict(_parity_gates(cfg, src))},
            {**{k: r.sha(Path(v)) for k, v in judged.items()}, **_model_key(r, src)}, run)


def _bench_summary(result: Any, batch: int, budget: float, choice: dict[str, Any] | None) -> str:
    """The bench stage's line: the served configuration at the smallest batch size, from the bench, or (when the
    bench could not measure it) from the engine choice's timing, saying which."""
    c = result.served()
    if c is not None and batch in c.stats:
        sp = result.speedups(batch).get(c.name)
        return (f"served {c.name} at batch {batch}: p50 {c.stats[batch].p50_ms:.3f} ms"
                + (f" ({sp:.1f}x PyTorch eager)" if sp else "") + ("" if (c.parity or {}).get("passed") else
                                                                   " (its bench parity sample did not pass: see the bench)"))
    name = c.name if c is not None else "the served engine"
    line = f"{name} was not measured at batch {batch} within {budget:g} s (see bench.md's skipped list)"
    timed = next((t for t in (choice or {}).get("table") or [] if t.get("name") == (choice or {}).get("name")), None)
    p50 = ((timed or {}).get("p50_ms") or {}).get(str(batch))
    return line + (f"; the engine choice measured it at p50 {p50:.3f} ms" if p50 is not None else "")


def _engine_choice(r: _Runner, cfg: RunConfig, src: ModelSource, variants: dict[str, Path]) -> dict[str, Any] | None:
    """Every CPU engine x precision x settings (engine_choice.SEARCHED) through the parity gates, then those that
    pass timed here; the fastest is recorded (engines/engine-choice.json). With a fixed ``repository.precision`` the
    choice is among that precision's engines; with ``auto``, among all."""
    from resdeploy.pipeline.engine_choice import CPU_ENGINES, SEARCHED

    parity = r.output("parity").result
    rows = [v for v in parity.get("variants", []) if v.get("backend") in CPU_ENGINES and v.get("precision") in variants
            and v.get("metrics") is not None]
    want = cfg.repository.precision
    pool = [v for v in rows if want == "auto" or v["precision"] == want]
    if not pool:
        r.skip("engine-choice", f"no CPU engine for the {want} variant went through parity")
        return None
    out = r.root / "engines" / "engine-choice.json"
    batches = list(cfg.engines.choice_batches or cfg.bench.batches or [1])
    threads = cfg.bench.threads or cfg.engines.threads or None

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.engine_choice import check_configurations, choose_engine, configurations, write_choice
        from resdeploy.pipeline.workbench import load_parity_data

        ref = src.reference()
        data = load_parity_data(ref, cfg.parity.limit or None)
        judged = {(v["backend"], v["precision"]): v for v in pool}
        cands = [_parity_verdict(c, judged[c.backend, c.precision])
                 for c in configurations([(v["backend"], v["precision"], variants[v["precision"]]) for v in pool])]
        cands = check_configurations(cands, ref.logits(data.images), data, _parity_gates(cfg, src), threads=threads)
        choice = choose_engine(cands, batches=batches, threads=threads, seconds=cfg.engines.choice_seconds,
                               image=data.images[:1], weights=cfg.engines.choice_weights)
        write_choice(choice, out.parent)
        return (f"{choice.name}: {choice.reason}", choice.to_dict(), [out])

    rec = r.stage("engine-choice", {"choice_seconds": cfg.engines.choice_seconds, "batches": batches,
                                    "weights": cfg.engines.choice_weights, "precision": want, "searched": SEARCHED,
                                    "threads": [cfg.bench.threads, cfg.engines.threads],
                                    "parity": dataclasses.asdict(cfg.parity)},
                  {**{f"{v['backend']} {v['precision']}": f"{v.get('sha256')}:{v.get('passed')}" for v in pool},
                   **_model_key(r, src)}, run)
    return rec.result or None


def _parity_verdict(candidate: Any, row: Mapping[str, Any]) -> Any:
    """``candidate`` with the parity stage's verdict when it runs the runner's default settings (what that stage
    judged, on the same images and gates), else as it is, to be judged with its own settings."""
    from resdeploy.engines import check_settings

    if dict(candidate.settings) != check_settings(candidate.backend, {}):
        return candidate
    gates = row.get("gates") or []
    failed = [g for g in gates if not g.get("passed")]
    words = "; ".join(f"{g.get('metric')} {g.get('value') + 0.0:.4g} (limit {g.get('op')} {g.get('limit'):.4g})"
                      for g in (failed or gates))
    n = (row.get("metrics") or {}).get("n")
    return dataclasses.replace(candidate, parity_passed=bool(row.get("passed")),
                               parity=f"{'FAILED ' if failed else ''}{words} (n={n}, the parity stage)")


def _repository(r: _Runner, cfg: RunConfig, variants: dict[str, Path], choice: dict[str, Any] | None = None) -> None:
    rc = cfg.repository
    precision = _served_precision(cfg, variants, choice)
    src = variants[precision]
    out = r.root / "model_repository"
    name = cfg.model.name or _arch_of(src)

    def run() -> tuple[str, dict[str, Any], list[Path]]:
        from resdeploy.pipeline.repository import make_model_repository

        shutil.rmtree(out, ignore_errors=True)  # a repository is only ever what this stage wrote
        res = make_model_repository(src, out, model_name=name, max_batch_size=rc.max_batch_size,
                                    max_queue_delay_us=rc.max_queue_delay_us, instances=rc.instances,
                                    engine_choice=choice)
        engine = f", served by {served['name']} (chosen by measurement)" if choice else ""
        return (f"{name}: {precision} model{engine}, sha256 {atomic.sha256_file(res.model_path)[:12]}",
                {"path": r.rel(out), "model_name": name, "precision": precision, "engine": served["backend"],
                 "served": served, "model_sha256": atomic.sha256_file(res.model_path), "config": res.config_text}, [out])

    served = served_engine(choice, precision)
    key_choice = {k: served[k] for k in ("backend", "precision", "settings")} if choice else None
    r.stage("repository", {**dataclasses.asdict(rc), "name": name, "precision": precision, "engine_choice": key_choice},
            {"model": r.sha(src)}, run)


def _served_precision(cfg: RunConfig, variants: dict[str, Path], choice: dict[str, Any] | None) -> str:
    precision = cfg.repository.precision
    if precision == "auto":
        precision = str(choice["precision"]) if choice else "int8" if "int8" in variants else "fp32"
    return precision


def served_engine(choice: dict[str, Any] | None, precision: str) -> dict[str, Any]:
    """The engine configuration the repository serves: the engine choice's, else ONNX Runtime with its defaults."""
    from resdeploy.engines import check_settings
    from resdeploy.pipeline.engine_choice import config_name

    backend = str(choice["backend"]) if choice else "onnxruntime"
    settings = check_settings(backend, dict((choice or {}).get("settings") or {}))
    return {"backend": backend, "precision": precision, "settings": settings,
            "name": config_name(backend, precision, settings), "chosen_by": "measurement" if choice else "default"}


def _arch_of(onnx_path: Path) -> str:
    from resdeploy.artifact import open_artifact

    return open_artifact(onnx_path).metadata.architecture or "model"


# -- run.json and the report -------------------------------------------------------------------------------
def machine_summary() -> dict[str, Any]:
    from resdeploy.pipeline.machine import machine_info

    m = machine_info()
    return {"cpu": m.get("cpu_model") or platform.processor(), "isa": m.get("simd", []), "cores": m.get("logical_cpus"),
            "python": platform.python_version(), "platform": platform.platform(), "versions": library_versions()}


def _model_card(src: ModelSource, recs: dict[str, StageRecord]) -> dict[str, Any]:
    """The report's model card: what the model is, its accuracy (from training, else the reference's on the parity
    split, else null), and where it came from (factory and kwargs, weights or ONNX sha256, the reference)."""
    from resdeploy.models.checkpoint import read_checkpoint_meta

    try:
        ref = src.reference()
    except InputError:  # the run stopped before the model existed (training failed): the card says what is known
        ref = None
    meta: dict[str, Any] = {}
    if src.checkpoint is not None and (src.checkpoint / "model.json").is_file():
        _, meta = read_checkpoint_meta(src.checkpoint)
    metrics = meta.get("metrics") or {}
    acc = {k.removesuffix("_accuracy"): v for k, v in metrics.items() if k.endswith("_accuracy")}
    if "test" not in acc:
        acc["test"] = (recs["parity"].result or {}).get("reference_accuracy") if "parity" in recs else None
    if ref is not None and ref.model is not None:
        params = int(sum(p.numel() for p in ref.model.parameters()))
    else:
        params = int((recs["export"].result or {}).get("parameters", 0)) if "export" in recs else 0
    return {"architecture": meta.get("arch") or src.name, "parameters": params,
            "data": str(metrics.get("data") or src.data), "data_fingerprint": meta.get("data_fingerprint") or "",
            "accuracy": acc, "labels": list(ref.labels) if ref is not None else [],
            "checkpoint": str(src.checkpoint or src.weights or src.onnx or ""), **(src.card() if ref is not None else {})}


def _write_summary(r: _Runner, cfg: RunConfig, src: ModelSource, failed: str | None,
                   started: str, wall: float) -> tuple[Path, ...]:
    recs = {s.name: s for s in r.records}
    model = _model_card(src, recs)
    skipadd = {}
    if "export" in recs and recs["export"].result.get("skipadd"):
        skipadd["fp32"] = recs["export"].result["skipadd"]
    for name, rec in recs.items():
        if name.startswith("variant-") and rec.result.get("skipadd"):
            skipadd[name.removeprefix("variant-")] = rec.result["skipadd"]
    fusion = {name.removeprefix("engine-"): rec.result["fusion"] for name, rec in recs.items()
              if name.startswith("engine-") and rec.result.get("fusion")}
    artifacts = []
    for rec in r.records:
        for rel, sha in rec.outputs.items():
            artifacts.append({"name": rel, "path": rel, "sha256": sha, "bytes": (r.root / rel).stat().st_size,
                              "kind": rec.name})
    bench = recs.get("bench")
    repo = recs.get("repository")
    search = {name.removeprefix("variant-"): rec.result["search"] for name, rec in recs.items()
              if name.startswith("variant-") and rec.result.get("search")}
    choice = recs.get("engine-choice")
    kit = recs.get("polygraphy")
    summary = {
        "resdeploy_version": resdeploy.__version__, "started": started, "wall_seconds": round(wall, 2),
        "passed": failed is None, "failed_gate": failed, "run_dir": str(r.root), "config": cfg.to_dict(),
        "machine": machine_summary(), "model": model,
        "stages": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 2), "summary": s.summary, "key": s.key}
                   for s in r.records],
        "skipadd": skipadd, "fusion": fusion, "int8_search": search.get("int8"),
        "parity": recs["parity"].result if "parity" in recs and recs["parity"].result else None,
        "engine_choice": choice.result if choice is not None and choice.result else None,
        "polygraphy": kit.result if kit is not None and kit.result else None,
        "bench": bench.result if bench is not None and bench.result else None,
        "bench_plot": "bench/bench.png" if bench is not None and (r.root / "bench" / "bench.png").is_file() else None,
        "artifacts": artifacts,
        "repository": ({"path": repo.result["path"], "model_name": repo.result["model_name"],
                        "served": repo.result.get("served")}
                       if repo is not None and repo.result else None),
    }
    atomic.write_json(r.root / "run.json", summary)
    from resdeploy.pipeline.report import write_report

    files = write_report(r.root, summary)
    return (r.root / "run.json", *[Path(p) for p in dataclasses.astuple(files)])


__all__ = ["RunResult", "StageRecord", "library_versions", "run_pipeline"]
