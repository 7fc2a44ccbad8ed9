"""The run report: ``report.md`` and ``report.html`` in the run folder, from the run summary (``run.json``).

    files = write_report(Path("runs/demo"), json.loads(Path("runs/demo/run.json").read_text()))
    print(files.html)          # one self-contained file: CSS inline, the plot inlined as a data URI, no scripts

Both files hold the same sections, in this order: a verdict banner (safe to ship or the failed gate, and the
served engine configuration's batch-1 p50 with its speedup over PyTorch eager), the model card, the skip-add table per variant,
the INT8 search's steps, the fusion report per engine, the parity table, the engine choice's timed table, the
latency table and plot, the stages, every artifact with its
sha256, and the versions and machine. A section whose stage did not run says so. All text is escaped.

The run summary (``run.json``), written by ``resdeploy run``
--------------------------------------------------------------
A plain JSON object. Every key below is always written; "or null" marks the ones that may be null (the report
also accepts them absent and then says the section did not run). Nested stage results are the ``to_dict()`` of
the stage's result class, unchanged::

    resdeploy_version  str                  resdeploy.__version__
    started            str                  ISO 8601 start time, e.g. "2025-05-01T12:00:00+00:00"
    wall_seconds       float                the whole run
    passed             bool                 every gate passed (the run's exit status is 0 exactly when true)
    failed_gate        str or null          the first failed gate, in words (null when passed)
    run_dir            str                  the run folder as given on the command line
    config             object or null       the run config as a dict (RunConfig.to_dict(); one row per section)
    machine            object               {"cpu": str (CPU model), "isa": [str] (SIMD flags, e.g. machine.SIMD_FLAGS
                                             found in /proc/cpuinfo), "cores": int, "python": str,
                                             "versions": {"torch": str, "onnx": str, "onnxruntime": str,
                                                          "openvino": str or null, ...more libraries allowed}}
    model              object               {"architecture": str, "parameters": int, "data": str,
                                             "data_fingerprint": str, "accuracy": {"test": float (0..1) or null
                                             (not measured), ...}, "labels": [str], "checkpoint": str; optional:
                                             "source": "registry"|"checkpoint"|"factory"|"onnx", "reference": str,
                                             "factory": str, "factory_kwargs": object, "weights": str,
                                             "weights_sha256": str, "onnx": str, "onnx_sha256": str}
    stages             [object]             in run order: {"name": str, "status": "ran"|"cached"|"failed"|"skipped",
                                             "seconds": float, "summary": str (the stage's one-line result),
                                             "key": str (its cache key)}
    skipadd            object or null       precision ("fp32"|"fp16"|"int8") -> SkipAddReport.to_dict()
                                            (resdeploy.export.skipadd); a variant not made is left out
    fusion             object or null       engine name (e.g. "onnxruntime-fp32", "tensorrt-int8") ->
                                            engines.onnxruntime_build.FusionReport.to_dict() (ONNX Runtime) or
                                            engines.tensorrt_fusion.FusionReport.to_dict() (TensorRT)
    int8_search        object or null       the INT8 variant's accuracy-aware search: quantizing.SearchResult.to_dict()
                                            (gate, steps with accuracy and action, regions kept in float and why)
    engine_choice      object or null       engine_choice.EngineChoice.to_dict() (the timed table of engine
                                            configurations, the winner per batch size, the weights and the reason)
    polygraphy         object or null       polygraphy_kit.KitResult.to_dict() (the kit's folder, files, commands)
    parity             object or null       parity.ParityReport.to_dict()
    bench              object or null       bench.BenchResult.to_dict()
    bench_plot         str or null          the latency plot, relative to run_dir, e.g. "bench/bench.png"
    artifacts          [object]             every file the run made: {"name": str, "path": str (relative to
                                             run_dir), "sha256": str, "bytes": int, "kind": str (onnx | engine |
                                             repository | bench | report ...)}
    repository         object or null       {"path": str (relative to run_dir), "model_name": str; optional:
                                             "served": {"backend": str, "precision": str, "settings": object,
                                             "name": str, "chosen_by": "measurement"|"default"}}

:func:`validate_summary` checks the keys the report reads and raises :class:`InputError` naming the first one
missing or of the wrong type (``summary.model.accuracy.test``), so a pipeline bug surfaces as one clear line.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resdeploy import atomic
from resdeploy.errors import InputError
from resdeploy.pipeline.engine_choice import winner_lines

MD_NAME = "report.md"
HTML_NAME = "report.html"
SUMMARY_NAME = "run.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRECISION_ORDER = ("fp32", "fp16", "int8")
STAGE_STATUSES = ("ran", "cached", "failed", "skipped")


@dataclass(frozen=True)
class ReportFiles:
    md: Path
    html: Path


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
_NUM = (int, float)
# key -> (type, nullable). Nested sections that are stage to_dict() outputs are checked where they are read.
_TOP: dict[str, tuple[Any, bool]] = {
    "resdeploy_version": (str, False), "started": (str, False), "wall_seconds": (_NUM, False), "passed": (bool, False),
    "failed_gate": (str, True), "machine": (dict, False), "model": (dict, False), "stages": (list, False),
    "artifacts": (list, False),
}
_OPTIONAL: dict[str, Any] = {"run_dir": str, "config": dict, "skipadd": dict, "fusion": dict, "parity": dict,
                             "int8_search": dict, "engine_choice": dict, "polygraphy": dict,
                             "bench": dict, "bench_plot": str, "repository": dict}
_MACHINE = {"cpu": str, "isa": list, "cores": int, "python": str, "versions": dict}
_MODEL = {"architecture": str, "parameters": int, "data": str, "data_fingerprint": str, "accuracy": dict,
          "labels": list, "checkpoint": str}
_STAGE = {"name": str, "status": str, "seconds": _NUM, "summary": str, "key": str}
_ARTIFACT = {"name": str, "path": str, "sha256": str, "bytes": int, "kind": str}
_TYPE_NAMES = {str: "a string", bool: "true/false", dict: "an object", list: "a list", int: "an integer",
               _NUM: "a number"}


def _need(obj: Mapping[str, Any], key: str, typ: Any, where: str, nullable: bool = False) -> Any:
    if not isinstance(obj, Mapping):
        raise InputError(f"run summary: {where} must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(f"run summary: {where}.{key} is missing (see resdeploy.pipeline.report for the schema)")
    v = obj[key]
    if v is None and nullable:
        return v
    # bool is an int subclass: a count or a number must not be true/false
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ is not bool)
    if not ok:
        raise InputError(f"run summary: {where}.{key} must be {_TYPE_NAMES.get(typ, typ)}, got {type(v).__name__} {v!r:.60}")
    return v


def validate_summary(summary: Mapping[str, Any]) -> None:
    """Raise InputError naming the first key the report needs that is missing or of the wrong type."""
    if not isinstance(summary, Mapping):
        raise InputError(f"run summary must be a JSON object, got {type(summary).__name__}")
    for key, (typ, nullable) in _TOP.items():
        _need(summary, key, typ, "summary", nullable)
    for key, typ in _OPTIONAL.items():
        if summary.get(key) is not None:
            _need(summary, key, typ, "summary")
    for key, typ in _MACHINE.items():
        _need(summary["machine"], key, typ, "summary.machine")
    for key, typ in _MODEL.items():
        _need(summary["model"], key, typ, "summary.model")
    _need(summary["model"]["accuracy"], "test", _NUM, "summary.model.accuracy", nullable=True)
    for i, st in enumerate(summary["stages"]):
        for key, typ in _STAGE.items():
            _need(st, key, typ, f"summary.stages[{i}]")
        if st["status"] not in STAGE_STATUSES:
            raise InputError(f"run summary: summary.stages[{i}].status is {st['status']!r}; use one of {', '.join(STAGE_STATUSES)}")
    for i, a in enumerate(summary["artifacts"]):
        for key, typ in _ARTIFACT.items():
            _need(a, key, typ, f"summary.artifacts[{i}]")
    for prec, rep in (summary.get("skipadd") or {}).items():
        _need(rep, "rows", list, f"summary.skipadd.{prec}")
        _need(rep, "passed", bool, f"summary.skipadd.{prec}")
    for name, rep in (summary.get("fusion") or {}).items():
        _need(rep, "adds", list, f"summary.fusion.{name}")
    if summary.get("parity") is not None:
        _need(summary["parity"], "variants", list, "summary.parity")
        _need(summary["parity"], "passed", bool, "summary.parity")
    if summary.get("bench") is not None:
        _need(summary["bench"], "cases", list, "summary.bench")
        _need(_need(summary["bench"], "config", dict, "summary.bench"), "batches", list, "summary.bench.config")
    if summary.get("repository") is not None:
        _need(summary["repository"], "path", str, "summary.repository")
        _need(summary["repository"], "model_name", str, "summary.repository")


# ---------------------------------------------------------------------------------------------------------
# a tiny document model: built once, rendered to markdown and to HTML
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    text: str
    cls: str = ""  # ok | fail | warn | mono | num: colour or font in HTML, nothing in markdown


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: tuple[int, ...] = ()  # right-aligned columns


@dataclass(frozen=True)
class Para:
    text: str
    cls: str = ""  # note | missing | ok | fail


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    cls: str = ""


@dataclass(frozen=True)
class Image:
    alt: str
    rel_path: str  # relative to the run folder (markdown links it)
    data: bytes  # PNG bytes (HTML inlines them)


@dataclass(frozen=True)
class Section:
    title: str
    anchor: str
    blocks: list[Any] = field(default_factory=list)
    level: int = 2


def _c(text: Any, cls: str = "") -> Cell:
    return Cell("-" if text is None or text == "" else str(text), cls)


def _ok(passed: Any, yes: str = "pass", no: str = "FAIL") -> Cell:
    if passed is None:
        return Cell("-")
    return Cell(yes, "ok") if passed else Cell(no, "fail")


def _sci(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2e}"


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * float(v):.{digits}f}%"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ---------------------------------------------------------------------------------------------------------
# the sections
# ---------------------------------------------------------------------------------------------------------
def _speed(bench: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The served configuration at batch 1 (else the smallest batch it was measured at): name, batch, p50, speedup,
    and the fastest resdeploy engine passing parity there when that is another. Without a served case (a bench
    run on its own): the fastest engine passing parity, ``served`` False."""
    if not bench:
        return None
    batches = sorted(int(b) for b in bench["config"]["batches"])
    order = ([1] if 1 in batches else []) + [x for x in batches if x != 1]
    served = next((c for c in bench["cases"] if c.get("served")), None)
    for b in order:
        pool = [c for c in bench["cases"] if c.get("kind") == "engine" and str(b) in (c.get("stats") or {})
                and (c.get("parity") or {}).get("passed")]
        fastest = min(pool, key=lambda c: c["stats"][str(b)]["p50_ms"], default=None)
        case = served if served is not None else fastest
        if case is None or str(b) not in (case.get("stats") or {}):
            continue
        sp = (bench.get("speedup_vs_eager_p50") or {}).get(str(b), {}).get(case["name"])
        out = {"name": case["name"], "batch": b, "p50_ms": case["stats"][str(b)]["p50_ms"], "speedup": sp,
               "throughput": case["stats"][str(b)].get("throughput"), "served": served is not None}
        if served is not None and fastest is not None and fastest["name"] != case["name"]:
            out["fastest"] = {"name": fastest["name"], "p50_ms": fastest["stats"][str(b)]["p50_ms"]}
        return out
    return None


def _gates(summary: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Every gate the report can see: skip-add per variant, parity per backend x precision, failed stages."""
    out: list[tuple[str, bool]] = []
    for prec, rep in _by_precision(summary.get("skipadd") or {}):
        out.append((f"skip-add {prec}", bool(rep["passed"])))
    for v in (summary.get("parity") or {}).get("variants", []):
        if v.get("skipped"):
            continue
        out.append((f"parity {v['backend']} {v['precision']}", bool(v.get("passed"))))
    for st in summary["stages"]:
        if st["status"] == "failed":
            out.append((f"stage {st['name']}", False))
    return out


def _by_precision(d: Mapping[str, Any]) -> list[tuple[str, Any]]:
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(d.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def _verdict(summary: Mapping[str, Any]) -> tuple[bool, str, list[str], list[tuple[str, bool]]]:
    passed = bool(summary["passed"])
    model = summary["model"]["architecture"]
    gates = _gates(summary)
    if passed:
        head = f"SAFE TO SHIP: {model} passed every gate ({len(gates)} checked)"
    else:
        head = f"NOT SAFE TO SHIP: {model} failed the gate {summary.get('failed_gate') or '(not named)'}"
    lines = []
    failures = [g for g, ok in gates if not ok]
    if not passed and failures:
        lines.append("failed: " + ", ".join(failures))
    for f in (summary.get("parity") or {}).get("failures", []):
        lines.append(str(f))
    sp = _speed(summary.get("bench"))
    if sp is None:
        why = "bench skipped" if not summary.get("bench") else "no engine passing parity was measured"
        lines.append(f"speed: not measured ({why})")
    else:
        no_torch = (summary["model"].get("source") == "onnx")
        ratio = (f", {sp['speedup']:.2f}x PyTorch eager" if sp.get("speedup") is not None else
                 ", no PyTorch baseline (the model came as ONNX)" if no_torch else ", PyTorch eager not measured")
        busy = any(str(n).startswith("the machine was busy") for n in summary["bench"].get("notes") or [])
        who = "served engine" if sp.get("served") else "best engine"
        faster = sp.get("fastest")
        other = (f"; {faster['name']} measured {faster['p50_ms']:.3f} ms at this batch size in the bench (the engine "
                 "choice weighs every batch size: see Engine choice)" if faster else "")
        lines.append(f"speed: {who} {sp['name']} p50 {sp['p50_ms']:.3f} ms at batch {sp['batch']}{ratio}{other}"
                     + (" (measured on a busy machine: noisy, see Latency)" if busy else ""))
    served = (summary.get("repository") or {}).get("served")
    if served and (sp is None or not sp.get("served")):
        lines.append(f"served: {served.get('name')} ({'chosen by measurement' if served.get('chosen_by') == 'measurement' else 'the default engine'})")
    return passed, head, lines, gates


def _model_card(s: Mapping[str, Any]) -> Section:
    m = s["model"]
    acc = ", ".join(f"{k} {_pct(v)}" for k, v in m["accuracy"].items() if isinstance(v, (int, float)))
    acc = acc or "not measured (no data with labels that match the model's classes)"
    labels = [str(x) for x in m["labels"]]
    shown = ", ".join(labels[:20]) + (f" ... ({len(labels)} in all)" if len(labels) > 20 else f" ({len(labels)})")
    rows = [("architecture", m["architecture"], ""), ("parameters", f"{m['parameters']:,}", ""),
            ("data", m["data"], ""), ("data fingerprint", m["data_fingerprint"], "mono"), ("accuracy", acc, ""),
            ("labels", shown, ""), ("checkpoint" if m.get("source", "registry") in ("registry", "checkpoint") else
                                    "from", m["checkpoint"], "mono")]
    extra = (("source", m.get("source"), ""), ("factory", m.get("factory"), "mono"),
             ("factory kwargs", json.dumps(m["factory_kwargs"], sort_keys=True) if m.get("factory_kwargs") else None, "mono"),
             ("weights sha256", m.get("weights_sha256"), "mono"), ("ONNX sha256", m.get("onnx_sha256"), "mono"),
             ("reference", m.get("reference"), ""))
    rows += [row for row in extra if row[1]]
    return Section("Model card", "model", [Table(("", ""), tuple((Cell(k), _c(v, cls)) for k, v, cls in rows))])


def _skipadd(s: Mapping[str, Any]) -> Section:
    sec = Section("Skip-add check", "skipadd")
    reports = s.get("skipadd")
    if not reports:
        sec.blocks.append(Para("The skip-add check did not run in this run.", "missing"))
        return sec
    missing = [p for p in PRECISION_ORDER if p not in reports]
    if missing:
        sec.blocks.append(Para(f"No skip-add report for {', '.join(missing)}: that variant was not made in this run.", "missing"))
    for prec, rep in _by_precision(reports):
        sub = Section(f"{prec}: {'passed' if rep['passed'] else 'FAILED'}", f"skipadd-{prec}", level=3)
        what = (f"{rep.get('residual_adds', len(rep['rows']))} residual Adds in {rep.get('model', '?')}"
                + (", compared with the PyTorch reference" if rep.get("reference") else ", no reference (well-formedness only)")
                + (" on real images" if rep.get("numeric") else "")
                + ("; quantized graph" if rep.get("quantized") else ""))
        sub.blocks.append(Para(what, "ok" if rep["passed"] else "fail"))
        rows = []
        for i, r in enumerate(rep["rows"]):
            st = str(r.get("status", "?"))
            rows.append((Cell(str(i)), _c(r.get("block")), _c(r.get("node"), "mono"), _c(r.get("kind")),
                         _c(r.get("shape"), "mono"), _c(r.get("fork"), "mono"),
                         Cell(st, "ok" if st == "ok" else "fail"), Cell(_sci(r.get("max_abs_err"))),
                         Cell(_sci(r.get("rel_err"))),
                         Cell("-" if r.get("cosine") is None else f"{float(r['cosine']):.6f}")))
        sub.blocks.append(Table(("#", "block", "ONNX node", "shortcut", "shape", "fork", "status", "max abs err",
                                 "rel err", "cosine"), tuple(rows), numeric=(0, 7, 8, 9)))
        if rep.get("first_divergent"):
            sub.blocks.append(Para(f"first block whose Add output diverges: {rep['first_divergent']}", "fail"))
        defects = [f"{d.get('block') or '?'} / {d.get('node') or '?'}: {d.get('message', '')}" for d in rep.get("defects", [])]
        if defects:
            sub.blocks.append(Bullets(tuple(defects), "fail"))
        if rep.get("notes"):
            sub.blocks.append(Bullets(tuple(f"note: {n}" for n in rep["notes"]), "note"))
        sec.blocks.append(sub)
    return sec


def _fusion(s: Mapping[str, Any]) -> Section:
    sec = Section("Engine fusion", "fusion")
    reports = s.get("fusion")
    if not reports:
        sec.blocks.append(Para("No engine was built in this run, so there is no fusion report.", "missing"))
        return sec
    sec.blocks.append(Para("Where each residual Add of the source graph ended up in the engine. ONNX Runtime: conv_sum "
                           "= absorbed into a convolution as its sum input, qlinear_add = integer QLinearAdd kernel, "
                           "standalone = its own Add node. TensorRT: fused into a convolution layer, or standalone.", "note"))
    for name, rep in reports.items():
        adds = rep["adds"]
        trt = "layer_count" in rep  # engines.tensorrt_fusion.FusionReport; else engines.onnxruntime_build.FusionReport
        fused = sum(1 for a in adds if (a.get("status") == "fused" if trt else a.get("fused")))
        head = f"{name}: {fused}/{len(adds)} residual Adds fused"
        if not trt and rep.get("summary", {}).get("by_form"):
            head += " (" + ", ".join(f"{k} {v}" for k, v in sorted(rep["summary"]["by_form"].items())) + ")"
        sub = Section(head, f"fusion-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}", level=3)
        if trt:
            rows = tuple((Cell(str(i)), _c(a.get("block") or a.get("add"), "mono"), _c(a.get("kind")),
                          Cell(a.get("status", "?"), "ok" if a.get("status") == "fused" else "warn"),
                          _c(a.get("conv_role")), _c(a.get("dtype")), _c(a.get("layer"), "mono"), _c(a.get("layer_type")))
                         for i, a in enumerate(adds))
            sub.blocks.append(Table(("#", "residual Add", "shortcut", "status", "conv", "dtype", "engine layer", "type"),
                                    rows, numeric=(0,)))
            sub.blocks.append(Para(f"{rep.get('layer_count', '?')} engine layers ({rep.get('reformat_count', '?')} "
                                   f"reformat); by output dtype: "
                                   + (", ".join(f"{k} {v}" for k, v in sorted((rep.get("dtype_counts") or {}).items())) or "-")))
        else:
            rows = tuple((Cell(str(i)), _c(a.get("block") or a.get("node"), "mono"), _c(a.get("kind")),
                          Cell(a.get("form", "?"), "ok" if a.get("fused") else "warn"), _c(a.get("activation")),
                          _c(a.get("op"), "mono"), _c(a.get("into"), "mono"))
                         for i, a in enumerate(adds))
            sub.blocks.append(Table(("#", "residual Add", "shortcut", "form", "activation", "optimised op", "optimised node"),
                                    rows, numeric=(0,)))
            sub.blocks.append(Para(f"{rep.get('precision', '?')} model {rep.get('model', '?')}, optimization "
                                   f"{rep.get('optimization', '?')}: BatchNorm folded {rep.get('bn_folded', '?')}, "
                                   f"conv+activation fused {rep.get('conv_activation_fused', '?')}, NCHWc nodes "
                                   f"{rep.get('nchwc_nodes', '?')}, QLinear nodes {rep.get('qlinear_nodes', '?')}"))
        notes = list(rep.get("warnings") or []) + [f"note: {n}" for n in rep.get("notes") or []]
        if notes:
            sub.blocks.append(Bullets(tuple(notes), "note"))
        sec.blocks.append(sub)
    return sec


def _int8_search(s: Mapping[str, Any]) -> Section:
    sec = Section("INT8 search", "int8-search")
    d = s.get("int8_search")
    if not d:
        sec.blocks.append(Para("No INT8 search ran in this run (no INT8 variant, or the search was turned off).", "missing"))
        return sec
    kept = d.get("kept_float") or []
    verdict = (f"passed with {d.get('method') or '?'} calibration"
               + (f", SmoothQuant {d['smoothquant']}" if d.get("smoothquant") else "")
               + (f", {len(kept)} region(s) kept in float" if kept else ", every region INT8")) if d.get("passed") else "FAILED"
    sec.blocks.append(Para(f"Gate: {d.get('gate', '?')} on the test split (FP32 accuracy {_pct(d.get('fp32_accuracy'))}); "
                           f"calibration on the val split only. Search {verdict}. One change per step: calibration "
                           "methods, then SmoothQuant scaling, then the most sensitive block kept in float.",
                           "ok" if d.get("passed") else "fail"))
    rows = []
    for st in d.get("steps") or []:
        verdict_cell = ("PASS" if st.get("gate_passed") and st.get("skipadd_passed", True)
                        else "fails skip-add" if st.get("gate_passed") else "fails gate")
        rows.append((Cell(str(st.get("step", "?"))), _c(st.get("action")), _c(", ".join(st.get("kept") or []) or "-"),
                     Cell(_pct(st.get("accuracy"))), Cell(f"{float(st.get('drop_points', 0)) + 0.0:+.2f} pt"),
                     _c(st.get("first_divergent") or "-", "mono"), Cell(verdict_cell, "ok" if verdict_cell == "PASS" else "warn"),
                     Cell(f"{float(st.get('seconds', 0)):.1f}")))
    sec.blocks.append(Table(("step", "action", "kept in float", "accuracy", "drop", "first divergent block", "verdict",
                             "seconds"), tuple(rows), numeric=(0, 3, 4, 7)))
    if kept:
        sec.blocks.append(Bullets(tuple(f"{k.get('region', '?')} kept in float ({len(k.get('nodes') or [])} nodes): "
                                        f"{k.get('why', '')}" for k in kept), "note"))
    return sec


def _engine_choice(s: Mapping[str, Any]) -> Section:
    sec = Section("Engine choice", "engine-choice")
    d = s.get("engine_choice")
    if not d:
        sec.blocks.append(Para("No engine was chosen by measurement in this run (engines.choose = off, or no CPU "
                               "engine passed parity); the repository serves ONNX Runtime.", "missing"))
        return sec
    batches = [str(b) for b in d.get("batches") or []]
    weights = d.get("weights") or []
    how = ("batch sizes weighed equally" if len(set(weights)) <= 1 else "weights " + ", ".join(
        f"b{b} {float(w):.2f}" for b, w in zip(batches, weights))) + " ([engines] choice_weights)"
    sec.blocks.append(Para(f"Served: {d.get('name') or d.get('backend', '?') + ' ' + d.get('precision', '?')}, "
                           f"settings {json.dumps(d.get('settings') or {}, sort_keys=True)}; {d.get('reason', '')}. "
                           "Every CPU engine x precision x settings was judged by the parity gates on the test images; "
                           "those that passed were timed here, interleaved, one untimed run after each switch of "
                           f"engine. The score is the geometric mean over batch sizes of p50 / fastest p50, {how}.",
                           "ok"))
    sec.blocks.append(Bullets(tuple(winner_lines(d))))
    rows = []
    for t in sorted(d.get("table") or [], key=lambda t: (t.get("score") is None, t.get("score") or 0.0)):
        rows.append((_c(t.get("name") or f"{t.get('backend')} {t.get('precision')}"), _ok(t.get("parity_passed")),
                     *(Cell(_ms((t.get("p50_ms") or {}).get(b))) for b in batches),
                     *(Cell(_ms((t.get("min_ms") or {}).get(b))) for b in batches),
                     Cell("-" if t.get("score") is None else f"{float(t['score']):.2f}x"),
                     _c("; ".join(x for x in (t.get("parity"), t.get("note")) if x))))
    sec.blocks.append(Table(("engine configuration", "parity", *(f"p50 ms b{b}" for b in batches),
                             *(f"min ms b{b}" for b in batches), "vs fastest", "parity verdict, note"), tuple(rows),
                            numeric=tuple(range(2, 3 + 2 * len(batches)))))
    return sec


def _polygraphy(s: Mapping[str, Any]) -> Section:
    sec = Section("Check it with Polygraphy", "polygraphy")
    d = s.get("polygraphy")
    if not d:
        sec.blocks.append(Para("No Polygraphy kit was written in this run (parity.polygraphy = false, or an earlier "
                               "stage failed).", "missing"))
        return sec
    sec.blocks.append(Para(f"`{d.get('folder', 'polygraphy')}/` holds parity's inputs ({d.get('images')} images) and "
                           f"the reference's outputs ({d.get('reference', '?')}) in Polygraphy's formats, a probe graph "
                           "per variant whose extra outputs are named after its blocks, and the commands below, with "
                           "tolerances matched to the parity gates. Run them inside that folder on a GPU with TensorRT "
                           "(`pip install polygraphy`); `--onnxrt` in place of `--trt` and its flags runs the same check "
                           "on the CPU. A probe check's first FAILED output is the first block that departs."))
    rows = tuple((_c(c.get("variant")), _c(c.get("check")), _c(c.get("gate")), _c(c.get("difference") or "the same"),
                  _c(c.get("line"), "mono")) for c in d.get("commands") or [])
    sec.blocks.append(Table(("variant", "checks", "parity gate", "how Polygraphy's check differs", "command"), rows))
    if d.get("notes"):
        sec.blocks.append(Bullets(tuple(d["notes"]), "note"))
    return sec


def _gate_text(g: Mapping[str, Any]) -> str:
    metric, v, lim = g.get("metric", "?"), g.get("value"), g.get("limit")
    if "agreement" in metric:
        fmt = _pct
    elif "points" in metric:
        fmt = lambda x: "-" if x is None else f"{float(x) + 0.0:.2f} pt"  # noqa: E731 (+ 0.0: no "-0.00")
    else:
        fmt = lambda x: "-" if x is None else f"{float(x):.3g}"  # noqa: E731
    return f"{metric} {fmt(v)} {g.get('op', '?')} {fmt(lim)}"


def _parity(s: Mapping[str, Any]) -> Section:
    p = s.get("parity")
    sec = Section("Parity with " + ("the FP32 ONNX reference" if p and "ONNX" in str(p.get("reference")) else
                                    "PyTorch FP32"), "parity")
    if not p:
        sec.blocks.append(Para("Parity did not run in this run: no parity gate was checked.", "missing"))
        return sec
    acc = "" if p.get("reference_accuracy") is None else f"; reference accuracy {_pct(p['reference_accuracy'])}"
    sec.blocks.append(Para(f"{p.get('model', '?')} vs {p.get('reference', 'PyTorch FP32 eager')} on "
                           f"{p.get('data', '?')}{acc}: {'every gate passed' if p['passed'] else 'FAILED'}",
                           "ok" if p["passed"] else "fail"))
    rows = []
    for v in p["variants"]:
        m = v.get("metrics")
        if v.get("skipped") or not m:
            rows.append((_c(v.get("backend")), _c(v.get("precision")), *(Cell("-") for _ in range(7)),
                         Cell(f"skipped: {v.get('skipped') or 'no metrics'}", "warn"), Cell("skipped", "warn")))
            continue
        gates = "; ".join(("" if g.get("passed") else "FAILED ") + _gate_text(g) for g in v.get("gates", []))
        delta = m.get("accuracy_delta_points")
        rows.append((_c(v.get("backend")), _c(v.get("precision")), Cell(_sci(m.get("max_abs"))), Cell(_sci(m.get("max_rel"))),
                     Cell(_sci(m.get("mean_abs"))),
                     Cell("-" if m.get("cosine_min") is None else f"{float(m['cosine_min']):.6f}"),
                     Cell(_pct(m.get("top1_agreement"))), Cell(_pct(m.get("accuracy"))),
                     Cell("-" if delta is None else f"{float(delta) + 0.0:+.2f} pt"),
                     Cell(gates or "-", "" if v.get("passed") else "fail"), _ok(v.get("passed"))))
    sec.blocks.append(Table(("backend", "precision", "max abs", "max rel", "mean abs", "cosine min", "top-1 agreement",
                             "accuracy", "accuracy delta", "gates", "verdict"), tuple(rows), numeric=(2, 3, 4, 5, 6, 7, 8)))
    sec.blocks.append(Para(f"images: {p['variants'][0]['metrics']['n'] if p['variants'] and p['variants'][0].get('metrics') else '?'}"
                           "; gates: " + ", ".join(f"{k} {v}" for k, v in (p.get("gates") or {}).items() if v is not None),
                           "note"))
    div = []
    for v in p["variants"]:
        d = v.get("divergence")
        if d:
            where = d.get("first_divergent") or d.get("error") or "no residual block diverges beyond tolerance"
            div.append(f"{v['backend']} {v['precision']}: skip-add localisation: first diverging block {where}")
    if div:
        sec.blocks.append(Bullets(tuple(div), "fail"))
    if p.get("failures"):
        sec.blocks.append(Bullets(tuple(str(f) for f in p["failures"]), "fail"))
    return sec


def _bench(s: Mapping[str, Any], run_dir: Path) -> Section:
    sec = Section("Latency", "latency")
    b = s.get("bench")
    if not b:
        sec.blocks.append(Para("Latency was not measured: the bench was skipped in this run.", "missing"))
    else:
        m = b.get("machine") or {}
        cfg = b["config"]
        sec.blocks.append(Para(f"{b.get('model', '?')}: {cfg.get('threads', '?')} threads, elapsed {float(b.get('elapsed_s', 0)):.1f} s "
                               f"of a {cfg.get('max_seconds', '?')} s budget; load average at start "
                               f"{(m.get('load_average_start') or ['?'])[0]}; parity sample: {b.get('data', '?')}", "note"))
        if b.get("summary"):
            sec.blocks.append(Bullets(tuple(str(x) for x in b["summary"])))
        rows = []
        for batch in cfg["batches"]:
            sp = (b.get("speedup_vs_eager_p50") or {}).get(str(batch), {})
            cases = [c for c in b["cases"] if str(batch) in (c.get("stats") or {})]
            for c in sorted(cases, key=lambda c: c["stats"][str(batch)]["p50_ms"]):
                st, par = c["stats"][str(batch)], c.get("parity") or {}
                rows.append((_c(c["name"]), _c(c.get("kind")), _c(c.get("precision")), Cell(str(batch)),
                             Cell(_ms(st.get("p50_ms"))), Cell(_ms(st.get("p90_ms"))), Cell(_ms(st.get("p99_ms"))),
                             Cell(_ms(st.get("mean_ms"))), Cell(_ms(st.get("min_ms"))),
                             Cell("-" if st.get("throughput") is None else f"{float(st['throughput']):.0f}"),
                             Cell("-" if sp.get(c["name"]) is None else f"{float(sp[c['name']]):.2f}x"),
                             Cell(_pct(par.get("top1_agreement"), 1)), Cell(_sci(par.get("max_abs"))),
                             _ok(par.get("passed") if par else None)))
        if rows:
            sec.blocks.append(Table(("case", "kind", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                                     "min ms", "img/s", "speedup vs eager (p50)", "top-1 vs torch", "max abs", "parity"),
                                    tuple(rows), numeric=tuple(range(3, 13))))
        else:
            sec.blocks.append(Para("The bench ran but measured nothing (see skipped below).", "missing"))
        extra = [f"note: {n}" for n in b.get("notes") or []] + [f"skipped: {x}" for x in b.get("skipped") or []]
        if extra:
            sec.blocks.append(Bullets(tuple(extra), "note"))
    plot = s.get("bench_plot")
    if plot:
        data, why = _read_png(run_dir, plot)
        if data is not None:
            sec.blocks.append(Image("latency and throughput against batch size", plot, data))
        else:
            sec.blocks.append(Para(f"latency plot {plot}: {why}", "missing"))
    elif b:
        sec.blocks.append(Para("No latency plot was written in this run.", "missing"))
    return sec


def _read_png(run_dir: Path, rel: str) -> tuple[bytes | None, str]:
    base = run_dir.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):  # the summary is input: never inline a file from outside the run folder
        return None, "is outside the run folder, not inlined"
    if not path.is_file():
        return None, "missing from the run folder"
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None, "is not a PNG file, not inlined"
    return data, ""


def _stages(s: Mapping[str, Any]) -> Section:
    rows = tuple((_c(st["name"], "nowrap"), Cell(st["status"], {"failed": "fail", "skipped": "warn"}.get(st["status"], "")),
                  Cell(f"{float(st['seconds']):.1f}"), _c(st["summary"]), _c(st["key"][:12], "mono"))
                 for st in s["stages"])
    ran = sum(1 for st in s["stages"] if st["status"] == "ran")
    cached = sum(1 for st in s["stages"] if st["status"] == "cached")
    sec = Section("Stages", "stages", [Para(f"{len(rows)} stages: {ran} ran, {cached} reused from the cache; "
                                            f"wall time {float(s['wall_seconds']):.1f} s", "note")])
    if rows:
        sec.blocks.append(Table(("stage", "status", "seconds", "result", "cache key"), rows, numeric=(2,)))
    else:
        sec.blocks.append(Para("No stage ran.", "missing"))
    return sec


def _artifacts(s: Mapping[str, Any]) -> Section:
    sec = Section("Artifacts", "artifacts")
    repo = s.get("repository")
    if repo:
        served = repo.get("served") or {}
        engine = (f"; resdeploy serve runs it with {served.get('name')}, settings "
                  f"{json.dumps(served.get('settings') or {}, sort_keys=True)}" if served else "")
        sec.blocks.append(Para(f"Triton model repository: {repo['path']} (model {repo['model_name']}{engine}); serve it "
                               f"with: resdeploy serve {repo['path']}"))
    else:
        sec.blocks.append(Para("No model repository was written in this run.", "missing"))
    arts = s["artifacts"]
    if arts:
        sec.blocks.append(Para("The same file has the same sha256 wherever it appears: the engines and the repository "
                               "hold exactly the variants that parity and the bench judged.", "note"))
        # the name only when it says more than the path does (names are usually the path's tail)
        sec.blocks.append(Table(("artifact", "kind", "size", "bytes", "sha256"),
                                tuple((_c(a["path"] if a["path"].endswith(a["name"]) else f"{a['name']}: {a['path']}", "mono"),
                                       _c(a["kind"]), Cell(_size(int(a["bytes"]))), Cell(f"{int(a['bytes']):,}"),
                                       Cell(a["sha256"], "mono hash")) for a in arts),
                                numeric=(2, 3)))
    else:
        sec.blocks.append(Para("The run recorded no artifacts.", "missing"))
    return sec


def _machine(s: Mapping[str, Any]) -> Section:
    m = s["machine"]
    vers = {"resdeploy": s["resdeploy_version"], "python": m["python"], **m["versions"]}
    rows = [("CPU", m["cpu"]), ("cores", str(m["cores"])), ("ISA flags", " ".join(map(str, m["isa"])) or "-")]
    rows += [(k, "not installed" if v is None else str(v)) for k, v in vers.items()]
    sec = Section("Versions and machine", "machine", [Table(("", ""), tuple((Cell(k), _c(v)) for k, v in rows))])
    cfg = s.get("config")
    if cfg:
        # one row per config table, compact JSON: the whole config stays readable at a glance
        sec.blocks.append(Section("Run config", "config", [Table(("", ""), tuple(
            (Cell(str(k)), Cell(json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v), "mono"))
            for k, v in cfg.items()))], level=3))
    else:
        sec.blocks.append(Para("The run config was not recorded.", "missing"))
    return sec


def build_sections(summary: Mapping[str, Any], run_dir: Path) -> list[Section]:
    return [_model_card(summary), _skipadd(summary), _int8_search(summary), _fusion(summary), _parity(summary),
            _polygraphy(summary), _engine_choice(summary), _bench(summary, run_dir),
            _stages(summary), _artifacts(summary), _machine(summary)]


# ---------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------
_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def _md(text: str) -> str:
    """Text safe in markdown: no raw HTML tag can open (``<script>`` -> ``&lt;script>``), ``<=`` stays readable."""
    return _MD_TAG.sub("&lt;", text.replace("&", "&amp;"))


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Any) -> list[str]:
    if isinstance(b, Section):
        out = ["#" * b.level + " " + _md(b.title), ""]
        for x in b.blocks:
            out += _md_block(x)
        return out
    if isinstance(b, Para):
        return [("**" + _md(b.text) + "**") if b.cls == "fail" else ("_" + _md(b.text) + "_") if b.cls == "missing"
                else _md(b.text), ""]
    if isinstance(b, Bullets):
        return [f"- {_md(x)}" for x in b.items] + [""]
    if isinstance(b, Image):
        return [f"![{_md(b.alt)}]({b.rel_path})", ""]
    if isinstance(b, Table):
        headers = [_md_cell(h) or " " for h in b.headers]
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if i in b.numeric else "---" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(_md_cell(c.text) for c in row) + " |" for row in b.rows]
        return lines + [""]
    raise TypeError(type(b))


def render_markdown(summary: Mapping[str, Any], run_dir: Path) -> str:
    validate_summary(summary)
    passed, head, lines, gates = _verdict(summary)
    out = [f"# resdeploy run report: {_md(summary['model']['architecture'])}", "",
           f"> **{'✅' if passed else '❌'} {_md(head)}**", ">"]
    out += [f"> - {_md(x)}" for x in lines]
    if gates:
        out += [">", "> gates: " + ", ".join(f"{_md(g)} {'✓' if ok else '✗ FAILED'}" for g, ok in gates)]
    out += ["", f"resdeploy {_md(summary['resdeploy_version'])}, started {_md(summary['started'])}, "
            f"{float(summary['wall_seconds']):.1f} s, run folder `{_md(str(summary.get('run_dir') or run_dir))}`", ""]
    for sec in build_sections(summary, run_dir):
        out += _md_block(sec)
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------
CSS = """
:root { --ok:#1a7f37; --ok-bg:#dafbe1; --fail:#b42318; --fail-bg:#ffebe9; --warn:#9a6700; --muted:#57606a;
        --line:#d0d7de; --head:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:#1f2328; margin:0;
       background:#fff; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
.meta { color: var(--muted); margin: 0 0 14px; }
nav { margin: 12px 0 0; font-size: 13px; }
nav a { color: #0969da; text-decoration: none; margin-right: 14px; }
.banner { border-radius: 8px; padding: 16px 20px; margin: 14px 0 6px; border: 2px solid; }
.banner.pass { background: var(--ok-bg); border-color: var(--ok); }
.banner.fail { background: var(--fail-bg); border-color: var(--fail); }
.banner .verdict { font-size: 22px; font-weight: 700; margin: 0 0 6px; }
.banner.pass .verdict { color: var(--ok); } .banner.fail .verdict { color: var(--fail); }
.banner ul { margin: 4px 0 8px; padding-left: 20px; }
.banner .speed { font-size: 16px; font-weight: 600; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; }
.chip { font-size: 12px; padding: 2px 8px; border-radius: 10px; border: 1px solid; background: #fff; }
.chip.ok { color: var(--ok); border-color: var(--ok); } .chip.fail { color: #fff; background: var(--fail); border-color: var(--fail); }
.scroll { overflow-x: auto; margin: 6px 0 10px; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
td.hash, td.nowrap { white-space: nowrap; }
td.ok { color: var(--ok); font-weight: 600; } td.fail { color: var(--fail); font-weight: 600; background: var(--fail-bg); }
td.warn { color: var(--warn); }
table.kv td:first-child { font-weight: 600; background: var(--head); white-space: nowrap; }
p.note, ul.note { color: var(--muted); } p.missing { color: var(--warn); font-style: italic; }
p.ok { color: var(--ok); } p.fail, ul.fail { color: var(--fail); font-weight: 600; }
pre { background: var(--head); border: 1px solid var(--line); padding: 8px 10px; font-size: 12px; overflow-x: auto; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
footer { color: var(--muted); margin-top: 30px; font-size: 12px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_block(b: Any) -> list[str]:
    if isinstance(b, Section):
        out = [f'<section id="{_e(b.anchor)}">', f"<h{b.level}>{_e(b.title)}</h{b.level}>"]
        for x in b.blocks:
            out += _html_block(x)
        return out + ["</section>"]
    if isinstance(b, Para):
        return [f'<p class="{_e(b.cls)}">{_e(b.text)}</p>' if b.cls else f"<p>{_e(b.text)}</p>"]
    if isinstance(b, Bullets):
        return [f'<ul class="{_e(b.cls)}">' + "".join(f"<li>{_e(x)}</li>" for x in b.items) + "</ul>"]
    if isinstance(b, Image):
        uri = "data:image/png;base64," + base64.b64encode(b.data).decode("ascii")
        return [f'<p><img class="plot" alt="{_e(b.alt)}" src="{uri}"></p>']
    if isinstance(b, Table):
        kv = b.headers == ("", "")
        out = ['<div class="scroll"><table' + (' class="kv">' if kv else ">")]
        if not kv:
            out.append("<thead><tr>" + "".join(f'<th class="num">{_e(h)}</th>' if i in b.numeric else f"<th>{_e(h)}</th>"
                                                 for i, h in enumerate(b.headers)) + "</tr></thead>")
        out.append("<tbody>")
        for row in b.rows:
            cells = []
            for i, c in enumerate(row):
                cls = " ".join(x for x in (c.cls, "num" if i in b.numeric else "") if x)
                cells.append(f'<td class="{_e(cls)}">{_e(c.text)}</td>' if cls else f"<td>{_e(c.text)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        return out + ["</tbody></table></div>"]
    raise TypeError(type(b))


def render_html(summary: Mapping[str, Any], run_dir: Path) -> str:
    validate_summary(summary)
    passed, head, lines, gates = _verdict(summary)
    sections = build_sections(summary, run_dir)
    arch = summary["model"]["architecture"]
    speed = [x for x in lines if x.startswith("speed:")]
    other = [x for x in lines if not x.startswith("speed:")]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           # nothing may load from elsewhere: the file must stand alone (and a hostile label cannot phone home)
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
           f"<title>{_e(('PASS' if passed else 'FAIL') + ': ' + arch)} - resdeploy run report</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
           f"<h1>resdeploy run report: {_e(arch)}</h1>",
           f'<p class="meta">resdeploy {_e(summary["resdeploy_version"])} &middot; started {_e(summary["started"])} '
           f'&middot; {float(summary["wall_seconds"]):.1f} s &middot; run folder <code>{_e(summary.get("run_dir") or run_dir)}</code></p>',
           f'<div class="banner {"pass" if passed else "fail"}" id="verdict">',
           f'<p class="verdict">{"&#10004;" if passed else "&#10008;"} {_e(head)}</p>']
    out += [f'<p class="speed">{_e(x)}</p>' for x in speed]
    if other:
        out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in other) + "</ul>")
    if gates:
        out.append('<div class="chips">' + "".join(f'<span class="chip {"ok" if ok else "fail"}">{_e(g)}: '
                                                   f'{"pass" if ok else "FAILED"}</span>' for g, ok in gates) + "</div>")
    out.append("</div>")
    out.append("<nav>" + "".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in sections) + "</nav>")
    for sec in sections:
        out += _html_block(sec)
    out += [f"<footer>written by resdeploy {_e(summary['resdeploy_version'])} from {SUMMARY_NAME}</footer>",
            "</main>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------
def write_report(run_dir: Path, summary: Mapping[str, Any]) -> ReportFiles:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` (atomically); InputError on a bad summary."""
    run_dir = Path(run_dir)
    validate_summary(summary)
    md = render_markdown(summary, run_dir)
    page = render_html(summary, run_dir)
    files = ReportFiles(run_dir / MD_NAME, run_dir / HTML_NAME)
    atomic.write_text(files.md, md)
    atomic.write_text(files.html, page)
    return files


def report_from_run_json(run_dir: Path) -> ReportFiles:
    """(Re)write the report of a finished run from its ``run.json``."""
    path = Path(run_dir) / SUMMARY_NAME
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; give a run folder that `resdeploy run` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is unreadable: {exc}") from None
    return write_report(Path(run_dir), summary)


__all__ = ["ReportFiles", "render_html", "render_markdown", "report_from_run_json", "validate_summary", "write_report"]


def _main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m resdeploy.pipeline.report RUN_DIR   (rewrites RUN_DIR/report.{md,html} from run.json)",
              file=sys.stderr)
        return 2
    try:
        files = report_from_run_json(Path(args[0]))
    except InputError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {files.md} and {files.html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
