"""Latency harness: every backend x precision x batch size, interleaved round by round, within a time budget.

    result = run_bench(BenchConfig(arch="resnet18", batches=(1,), max_seconds=60), out_dir="runs/bench")
    print(result)                  # the table: p50/p90/p99/mean/min, img/s, speedup over PyTorch eager, parity

How it measures:

* Cases: resdeploy engines (ONNX Runtime, OpenVINO x FP32/FP16/INT8, with the runners' default settings, or with
  ``settings="all"`` every configuration the engine choice searches) and anchors measured in the same run as
  users would compare them: PyTorch eager (the reference), ``torch.compile``, OpenVINO FP32 (f32 hint) and
  OpenVINO's own defaults (no hints: bf16 on CPUs with avx512_bf16/AMX) on the FP32 file and on resdeploy's INT8
  file. ``served`` (the configuration the repository serves) is always a case, set up, checked and timed first
  and dropped last when the budget is short. ``gpu=True`` adds, where CUDA is present, PyTorch eager FP16 with
  CUDA graphs (the GPU baseline) and the ONNX Runtime CUDA / TensorRT engines.
* Every case runs on the same real images (the model's test split, resized/replicated for ImageNet nets), and
  its parity with PyTorch FP32 on that sample is shown next to its speed.
* Per batch size: warm-up runs (whose median estimates each case's cost), then timed rounds; in each round every
  case runs a short block of consecutive calls (~``block_seconds``, after one untimed settle call),
  in a fresh random order, so machine noise hits all of them alike. Blocks, not single calls: switching models
  on every call evicts each one's weights from the caches, which doubled resnet20's ONNX Runtime latency
  (0.22 -> 0.45 ms) in a measurement here, and a server runs one model back to back. Threads: torch, ORT
  intra-op and OpenVINO INFERENCE_NUM_THREADS are all set to ``threads``.
* Budget: ``max_seconds`` covers everything (export, quantization, compilation, warm-up, timing). Each setup step
  is skipped when its estimate does not fit; timed rounds are planned from the warm-up estimates and stopped at
  the deadline; cases that cannot get ``min_runs`` runs are dropped (slowest first) and reported as skipped.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import InputError, ResdeployError
from resdeploy.pipeline import workbench as wb
from resdeploy.pipeline.gates import ParityGates
from resdeploy.pipeline.parity import gate_precision, judge
from resdeploy.pipeline.machine import fraction_of_peak, isa_line, load_average, machine_info
from resdeploy.pipeline.stats import Budget, LatencyStats, speedup

ANCHORS = ("eager", "compile", "openvino")
REFERENCE = "torch eager fp32"
GPU_REFERENCE = "torch eager fp16 cuda-graphs"  # the GPU section's baseline
TRT_BUILD_SECONDS = 60.0  # a TensorRT plan build (tactic timing) for a ResNet, order of magnitude
COMPILE_SECONDS = 25.0  # torch.compile's fixed cost per new shape on a 2-core CPU (measured: ~24 s for resnet20)


@dataclass
class BenchConfig:
    checkpoint: str | None = None  # a trained checkpoint folder; or
    arch: str | None = None  # an architecture with random weights (seed 0); or
    reference: wb.Reference | None = None  # a loaded reference (a user's network, or an FP32 ONNX graph)
    batches: tuple[int, ...] = (1, 8, 32)  # batch sizes
    warmup: int = 5  # untimed runs per case and batch size (the first also compiles/allocates)
    runs: int | None = 100  # timed runs per case and batch size; None: use ``duration``
    duration: float | None = None  # seconds of timed rounds per batch size (all cases together), instead of runs
    max_seconds: float = 300.0  # the whole bench, setup included, never runs longer than this
    threads: int = 2  # torch, ONNX Runtime intra-op and OpenVINO threads
    backends: tuple[str, ...] = ("onnxruntime", "openvino")  # resdeploy engines (unavailable ones are skipped)
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    anchors: tuple[str, ...] = ANCHORS  # eager (always, it is the reference), compile, openvino (f32 + its default)
    gpu: bool = False  # add the GPU section where CUDA is present
    parity_samples: int = 64  # real images each case is checked on (``resdeploy parity`` runs the full split)
    calibration_size: int = 64  # val-split images for INT8 calibration
    min_runs: int = 10  # a case that cannot get this many timed runs within the budget is dropped
    block_seconds: float = 0.02  # per round, each case runs ~this long back to back (0: one call per case and round)
    settle_below_seconds: float = 60.0  # cases faster than this (by default all) get one untimed call before each
    # block: the case before it leaves spinning threads (ORT spins after each run) and its own data in cache. Timed
    # right after another engine, resnet50 224x224 OpenVINO INT8 read p50 15.7 ms; after a settle call, 11.3 ms
    reserve_seconds: float = 4.0  # kept free for writing the JSON, markdown and plot
    gates: ParityGates = field(default_factory=ParityGates)
    ort_session_config: dict[str, str] = field(default_factory=dict)  # extra ORT session entries (all ORT cases)
    variants: dict[str, str] = field(default_factory=dict)  # precision -> ONNX path already built
    seed: int = 0  # round order shuffles and random weights
    settings: str = "default"  # engine settings timed: default (each runner's) | all (engine_choice.candidate_settings)
    served: dict[str, Any] | None = None  # {"backend", "precision", "settings"}: the configuration the repository serves

    def validate(self) -> None:
        if sum(map(bool, (self.checkpoint, self.arch, self.reference))) != 1:
            raise InputError("bench: give a CHECKPOINT or --arch NAME (random weights) or your network (--model, or "
                             "--fp32 alone): exactly one")
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise InputError(f"bench: batch sizes must be >= 1, got {self.batches}")
        if self.runs is None and self.duration is None:
            raise InputError("bench: give --runs N or --duration SECONDS")
        if self.runs is not None and self.runs < 1 or self.duration is not None and self.duration <= 0:
            raise InputError(f"bench: runs must be >= 1 and duration > 0 (got runs={self.runs}, duration={self.duration})")
        if self.threads < 1:
            raise InputError(f"bench: threads must be >= 1, got {self.threads}")
        if self.max_seconds <= self.reserve_seconds:
            raise InputError(f"bench: --max-seconds {self.max_seconds} leaves no time to measure (keep > {self.reserve_seconds})")
        unknown = [a for a in self.anchors if a not in ANCHORS]
        if unknown:
            raise InputError(f"bench: unknown anchors {unknown}; use some of {', '.join(ANCHORS)}")
        for b in self.backends:
            if b not in wb.BACKENDS:
                raise InputError(f"bench: unknown backend {b!r}; use some of {', '.join(wb.BACKENDS)}")
        for p in self.precisions:
            if p not in wb.PRECISIONS:
                raise InputError(f"bench: unknown precision {p!r}; use some of {', '.join(wb.PRECISIONS)}")
        if self.settings not in ("default", "all"):
            raise InputError(f"bench: settings {self.settings!r}; use default or all")
        if self.served is not None and not {"backend", "precision"} <= set(self.served):
            raise InputError(f"bench: served {self.served!r} must name backend and precision (and settings)")


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time: a runner factory plus what it is."""

    name: str  # e.g. "onnxruntime int8"
    kind: str  # engine (resdeploy's own) | anchor (comparison point) | gpu
    backend: str
    precision: str  # fp32 | fp16 | bf16 | int8
    factory: Callable[[], Any]  # -> an inactive runner
    runner: Any = None
    description: str = ""
    parity: dict[str, Any] | None = None
    samples: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per timed run
    estimate: dict[int, float] = field(default_factory=dict)  # batch -> seconds per run from the warm-up
    skipped: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # the runner's engine settings (CPU engines)
    served: bool = False  # the configuration the repository serves


@dataclass(frozen=True)
class CaseResult:
    name: str
    kind: str
    backend: str
    precision: str
    description: str
    parity: dict[str, Any] | None  # top1_agreement, max_abs, gate, passed (vs torch FP32 on the sample)
    stats: dict[int, LatencyStats]  # batch -> stats
    skipped: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    served: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "backend": self.backend, "precision": self.precision,
                "settings": self.settings, "served": self.served, "description": self.description, "parity": self.parity,
                "stats": {str(b): s.to_dict() for b, s in sorted(self.stats.items())}, "skipped": list(self.skipped)}


@dataclass(frozen=True)
class BenchResult:
    model: str
    data: str
    config: dict[str, Any]
    machine: dict[str, Any]
    cases: tuple[CaseResult, ...]
    skipped: tuple[str, ...]  # what the budget or the machine left out, with why
    elapsed_s: float
    outputs: dict[str, str] = field(default_factory=dict)
    macs: int = 0  # multiply-accumulates per image (Conv + Gemm), for the fraction-of-peak column

    def fraction_of_peak(self, case: CaseResult, batch: int, precision: str | None = None) -> float | None:
        """The case's p50 throughput over the CPU's theoretical peak for ``precision`` (default: the case's own;
        "int8": the machine's ceiling), None for GPU cases or when the peak is unknown."""
        if case.kind == "gpu" or batch not in case.stats:
            return None
        return fraction_of_peak(self.macs, batch, case.stats[batch].p50_ms, precision or case.precision,
                                self.machine.get("isa", {}), int(self.config.get("threads", 1)), self.machine.get("usable_cpus"))

    def served(self) -> CaseResult | None:
        """The case of the configuration the repository serves (None when the bench was not told it)."""
        return next((c for c in self.cases if c.served), None)

    def case(self, name: str) -> CaseResult:
        for c in self.cases:
            if c.name == name:
                return c
        raise InputError(f"no case {name!r}; cases: {', '.join(c.name for c in self.cases)}")

    def speedups(self, batch: int) -> dict[str, float]:
        """Case -> p50 speedup at ``batch`` over PyTorch eager (CPU cases) or over PyTorch eager FP16 with CUDA
        graphs (the GPU section); only cases measured at that batch, and only where the baseline was too."""
        out: dict[str, float] = {}
        for name, kinds in ((REFERENCE, ("engine", "anchor")), (GPU_REFERENCE, ("gpu",))):
            ref = next((c.stats.get(batch) for c in self.cases if c.name == name), None)
            if ref is not None:
                out.update({c.name: speedup(ref.p50_ms, c.stats[batch].p50_ms) for c in self.cases
                            if batch in c.stats and c.kind in kinds})
        return out

    def best(self, batch: int, kind: str = "engine", passed_only: bool = True) -> CaseResult | None:
        """The fastest (p50) case of ``kind`` at ``batch``, among those that passed parity when ``passed_only``."""
        pool = [c for c in self.cases if c.kind == kind and batch in c.stats
                and (not passed_only or (c.parity or {}).get("passed"))]
        return min(pool, key=lambda c: c.stats[batch].p50_ms, default=None)

    def served_line(self, b: int) -> str | None:
        """The served configuration at batch ``b``: its p50, speedup and the fastest anchor that passed parity; or why
        it was not measured. None when the bench was not told what is served."""
        c = self.served()
        if c is None:
            return None
        if b not in c.stats:
            why = "; ".join(x for x in c.skipped if f"batch {b}" in x) or "; ".join(
                x for x in self.skipped if x.startswith(c.name)) or "not measured"
            return f"batch {b}: the served {c.name} was not measured by the bench ({why})"
        sp = self.speedups(b).get(c.name)
        p = c.parity or {}
        verdict = "parity pass" if p.get("passed") else f"parity FAIL ({p.get('failed')})" if p else "parity not checked"
        line = (f"batch {b}: served {c.name}: p50 {c.stats[b].p50_ms:.3f} ms"
                + (f", {sp:.2f}x PyTorch eager" if sp is not None else "") + f", {verdict}")
        anchor = self.best(b, "anchor")
        if anchor is not None and anchor.name != REFERENCE:
            line += (f"; fastest anchor passing parity: {anchor.name} {anchor.stats[b].p50_ms:.3f} ms "
                     f"(served is {anchor.stats[b].p50_ms / c.stats[b].p50_ms:.2f}x its speed)")
        return line

    def summary(self) -> list[str]:
        lines = [x for x in (self.served_line(b) for b in self.config["batches"]) if x]
        for b in self.config["batches"]:
            eng = self.best(b)
            anchor_any = self.best(b, "anchor", passed_only=False)
            anchor_ok = self.best(b, "anchor")
            sp = self.speedups(b)
            if not sp and eng is not None and not any(c.name == REFERENCE for c in self.cases):
                lines.append(f"batch {b}: fastest resdeploy CPU engine passing parity: {eng.name} p50 "
                             f"{eng.stats[b].p50_ms:.3f} ms (no PyTorch model: no eager baseline)")
                continue
            if not sp:
                lines.append(f"batch {b}: nothing measured against PyTorch eager (see skipped)")
                continue
            if eng is None:
                lines.append(f"batch {b}: no resdeploy engine that passed its parity gate was measured")
                continue
            s = eng.stats[b]
            line = (f"batch {b}: fastest resdeploy CPU engine passing parity: {eng.name} p50 {s.p50_ms:.3f} ms, "
                    f"{sp.get(eng.name, float('nan')):.2f}x PyTorch eager")
            for label, a in (("fastest anchor", anchor_any), ("fastest anchor passing parity", anchor_ok)):
                if a is not None:
                    ratio = a.stats[b].p50_ms / s.p50_ms
                    line += f"; {label}: {a.name} {a.stats[b].p50_ms:.3f} ms (engine is {ratio:.2f}x its speed)"
            lines.append(line)
        for b in self.config["batches"]:
            gpu = [c for c in self.cases if c.kind == "gpu" and c.name != GPU_REFERENCE and b in c.stats
                   and (c.parity or {}).get("passed")]
            if gpu:
                best, sp = min(gpu, key=lambda c: c.stats[b].p50_ms), self.speedups(b)
                lines.append(f"GPU batch {b}: fastest engine passing parity: {best.name} p50 {best.stats[b].p50_ms:.3f} ms, "
                             f"{sp.get(best.name, float('nan')):.2f}x PyTorch eager FP16 with CUDA graphs")
        return lines

    def notes(self) -> list[str]:
        """Caveats a reader must see next to the figures."""
        notes = ["speedups compare p50 latencies measured in this run, interleaved round by round; img/s is batch / mean latency"]
        m = self.machine
        busy = m.get("cpu_busy_start")
        if busy is None:  # no /proc/stat: fall back to the 1-minute load average
            busy = (m.get("load_average_start") or [0])[0] / (m.get("usable_cpus") or 1)
        if busy >= 0.25:
            notes.append(f"the machine was busy ({busy:.0%} of its CPUs in use by others at the start): every figure is noisy, and PyTorch "
                         "eager suffers most (its OpenMP threads spin-wait at every layer; OMP_WAIT_POLICY=PASSIVE or a "
                         "quiet machine gives its real speed)")
        if any((c.parity or {}).get("degenerate") for c in self.cases):
            notes.append("the reference predicts very few classes on these images (random weights), so top-1 agreement is "
                         "trivially high; 'centered top-1' (agreement after removing the reference's mean logits) shows "
                         "whether an engine keeps the image-dependent part of the logits")
        return notes

    def __bool__(self) -> bool:
        """True when at least one resdeploy engine was measured and passed its parity gate."""
        return any(c.kind == "engine" and c.stats and (c.parity or {}).get("passed") for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "resdeploy-bench/1", "model": self.model, "data": self.data, "config": self.config,
                "machine": self.machine, "elapsed_s": round(self.elapsed_s, 3), "reference": REFERENCE,
                "macs_per_image": self.macs,
                "cases": [{**c.to_dict(), "fraction_of_peak": {str(b): self.fraction_of_peak(c, b) for b in sorted(c.stats)},
                           "fraction_of_int8_peak": {str(b): self.fraction_of_peak(c, b, "int8") for b in sorted(c.stats)}}
                          for c in self.cases],
                "speedup_vs_eager_p50": {str(b): self.speedups(b) for b in self.config["batches"]},
                "summary": self.summary(), "notes": self.notes(), "skipped": list(self.skipped), "passed": bool(self)}

    def markdown(self) -> str:
        m = self.machine
        out = [f"# Latency: {self.model}", "",
               f"- machine: {m.get('cpu_model')} ({m.get('logical_cpus')} logical CPUs), SIMD: {' '.join(m.get('simd', []))}",
               f"- ISA: {isa_line(m)}",
               f"- load average at start/end: {m.get('load_average_start')} / {m.get('load_average_end')} "
               "(a busy machine makes every figure noisy; ratios within the run stay comparable)",
               f"- threads: {self.config['threads']}; versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
               f"- parity sample: {self.data}", f"- elapsed {self.elapsed_s:.1f} s of a {self.config['max_seconds']:g} s budget", "",
               "| case | kind | precision | batch | p50 ms | p90 ms | p99 ms | mean ms | min ms | img/s | speedup vs eager (p50; GPU: vs its baseline) "
               "| % of peak (own precision / int8) | top-1 vs torch | centered top-1 | max abs | parity |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for b in self.config["batches"]:
            sp = self.speedups(b)
            for c in sorted((c for c in self.cases if b in c.stats), key=lambda c: c.stats[b].p50_ms):
                s, p = c.stats[b], c.parity or {}
                agree = f"{100 * p['top1_agreement']:.1f}%" if p.get("top1_agreement") is not None else "-"
                mabs = f"{p['max_abs']:.1e}" if p.get("max_abs") is not None else "-"
                cent = f"{100 * p['centered_top1_agreement']:.1f}%" if p.get("centered_top1_agreement") is not None else "-"
                verdict = "-" if not p else ("pass" if p.get("passed") else f"**FAIL** ({p.get('failed', '')})")
                ratio = f"{sp[c.name]:.2f}x" if c.name in sp else "-"
                pk = " / ".join(f"{100 * f:.1f}%" if f is not None else "-"
                                for f in (self.fraction_of_peak(c, b), self.fraction_of_peak(c, b, "int8")))
                out.append(f"| {c.name}{' (served)' if c.served else ''} | {c.kind} | {c.precision} | {b} | {s.p50_ms:.3f} | {s.p90_ms:.3f} | {s.p99_ms:.3f} | "
                           f"{s.mean_ms:.3f} | {s.min_ms:.3f} | {s.throughput:,.1f} | {ratio} | {pk} | {agree} | {cent} | {mabs} | {verdict} |")
        out += [""] + [f"> {n}" for n in self.notes()]
        out += ["", "## Summary", ""] + [f"- {line}" for line in self.summary()]
        out += ["", "## What ran", ""] + [f"- **{c.name}**: {c.description or '-'}" for c in self.cases]
        if self.skipped:
            out += ["", "## Skipped", ""] + [f"- {s}" for s in self.skipped]
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        lines = [f"bench of {self.model} ({self.elapsed_s:.1f} s; {self.config['threads']} threads; "
                 f"load avg {self.machine.get('load_average_start')})",
                 f"{'case':<36} {'batch':>5} {'p50 ms':>9} {'p90':>9} {'p99':>9} {'mean':>9} {'min':>9} {'img/s':>10} "
                 f"{'vs eager':>8} {'%int8':>6} {'top-1':>7} parity"]
        for b in self.config["batches"]:
            sp = self.speedups(b)
            for c in sorted((c for c in self.cases if b in c.stats), key=lambda c: c.stats[b].p50_ms):
                s, p = c.stats[b], c.parity or {}
                agree = f"{100 * p['top1_agreement']:6.1f}%" if p.get("top1_agreement") is not None else f"{'-':>7}"
                verdict = "-" if not p else ("pass" if p.get("passed") else "FAIL")
                ratio = f"{sp[c.name]:7.2f}x" if c.name in sp else f"{'-':>8}"
                frac = self.fraction_of_peak(c, b, "int8")
                pk = f"{100 * frac:5.1f}%" if frac is not None else f"{'-':>6}"
                lines.append(f"{c.name + (' *' if c.served else ''):<36} {b:>5} {s.p50_ms:9.3f} {s.p90_ms:9.3f} {s.p99_ms:9.3f} {s.mean_ms:9.3f} "
                             f"{s.min_ms:9.3f} {s.throughput:10.1f} {ratio} {pk} {agree} {verdict}")
        lines.append(f"ISA: {isa_line(self.machine)}; %int8 = fraction of the int8 peak; * = the served configuration")
        lines += self.summary()
        lines += [f"note: {n}" for n in self.notes()[1:]]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"wrote {k}: {v}" for k, v in self.outputs.items()]
        return "\n".join(lines)


def model_macs(onnx_path: str | Path) -> int:
    """Multiply-accumulates of one image through the model's Conv and Gemm/MatMul nodes (from shape inference)."""
    from resdeploy.artifact import load_onnx
    from resdeploy.export.onnx_graph import shapes_of

    model = load_onnx(onnx_path)
    shapes = shapes_of(model)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:  # Q/DQ graphs: a weight reaches its conv through DequantizeLinear
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            out = shapes.get(n.output[0])
            if not out or any(not isinstance(d, int) for d in out[1:]):
                continue
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            total += int(np.prod(w))
    return total


# ---------------------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------------------
class Progress:
    """Progress lines on stderr, with elapsed / budget, at most one 'still running' line per ``every`` seconds."""

    def __init__(self, budget: Budget, stream: Any = None, every: float = 2.0) -> None:
        self.budget, self.stream, self.every, self._last = budget, stream, every, -math.inf

    def __call__(self, msg: str, throttle: bool = False) -> None:
        now = self.budget.elapsed
        if throttle and now - self._last < self.every:
            return
        self._last = now
        total = f"/{self.budget.seconds:g}" if self.budget.seconds is not None else ""
        print(f"[bench {now:6.1f}{total} s] {msg}", file=self.stream or sys.stderr, flush=True)


def plan_rounds(estimates: dict[str, float], wanted: int | None, seconds: float, min_runs: int,
                protect: tuple[str, ...] = (REFERENCE, GPU_REFERENCE)) -> tuple[int, list[str]]:
    """How many interleaved rounds fit in ``seconds``, and which cases to drop (slowest first) to get ``min_runs``.

    ``estimates``: case -> seconds per run. ``wanted``: rounds asked for (None: as many as fit). Cases in
    ``protect`` are dropped last. Returns (rounds, dropped); rounds is 0 when nothing fits.
    """
    keep = dict(estimates)
    dropped: list[str] = []
    while keep:
        cost = sum(keep.values())
        fit = int(seconds / cost * (1 + 1e-9)) if cost > 0 else (wanted or min_runs)  # 1e-9: 1.0/0.02 is 50
        rounds = fit if wanted is None else min(wanted, fit)
        if rounds >= min(min_runs, wanted or min_runs):
            return rounds, dropped
        victim = max(keep, key=lambda k: (k not in protect, keep[k]))
        dropped.append(victim)
        del keep[victim]
    return 0, dropped


def _sample(images: np.ndarray, batch: int) -> np.ndarray:
    reps = math.ceil(batch / len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def _time_call(runner: Any, feed: dict[str, np.ndarray], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    runner.infer(feed)
    return clock() - t0


def build_cases(cfg: BenchConfig, ref: wb.Reference, paths: dict[str, Path], skipped: list[str],
                workdir: Path | None = None, calibration: np.ndarray | None = None) -> list[Case]:
    """The cases this config asks for that can run here (the others go to ``skipped`` with the reason), in the order
    they get the budget: the PyTorch baselines, the served configuration, then the others."""
    from resdeploy.engines import open_runner

    if ref.model is None:
        skipped.append(f"PyTorch anchors: no PyTorch model (the reference is {ref.kind}); the engines are timed side "
                       "by side without a PyTorch eager baseline")
        cases: list[Case] = []
    else:
        cases = [Case(REFERENCE, "anchor", "torch", "fp32", lambda: open_runner(ref.model, backend="torch"))]
    if "compile" in cfg.anchors and ref.model is not None:
        cases.append(Case("torch.compile fp32", "anchor", "torch", "fp32",
                          lambda: open_runner(ref.model, backend="torch", compile=True)))
    cases += _engine_cases(cfg, ref, paths, skipped, workdir, calibration)
    cases += _openvino_anchors(cfg, paths, skipped)
    if cfg.gpu:
        from resdeploy.device import cuda_device_present

        if not cuda_device_present():
            skipped.append("--gpu: no CUDA device here; the GPU section is empty")
        else:
            cases.insert(0, Case(GPU_REFERENCE, "gpu", "torch", "fp16",
                                 lambda: open_runner(ref.model, backend="torch", device="cuda", half=True, cuda_graphs=True)))
    return sorted(cases, key=lambda c: 0 if c.name in (REFERENCE, GPU_REFERENCE) else 1 if c.served else 2)


def _engine_cases(cfg: BenchConfig, ref: wb.Reference, paths: dict[str, Path], skipped: list[str],
                  workdir: Path | None, calibration: np.ndarray | None) -> list[Case]:
    """resdeploy's engines: backend x precision x settings (each runner's defaults, or with ``settings="all"`` every
    configuration the engine choice searches), and the served configuration (marked, added when not among them)."""
    from resdeploy.engines import check_settings
    from resdeploy.pipeline.engine_choice import CPU_ENGINES, candidate_settings, config_name

    ort_cfg = dict(cfg.ort_session_config)
    served = cfg.served or {}
    serve_key = ((served["backend"], served["precision"], check_settings(served["backend"], dict(served.get("settings") or {})))
                 if served and served.get("backend") in CPU_ENGINES else None)
    backends = tuple(cfg.backends)
    if cfg.gpu and not set(backends) & set(wb.GPU_BACKENDS):
        backends += wb.GPU_BACKENDS  # --gpu alone: the GPU engines next to the GPU baseline
    wanted = [(b, p, s) for b in backends for p in cfg.precisions
              for s in (candidate_settings(b) if cfg.settings == "all" and b in CPU_ENGINES else
                        [check_settings(b, {})] if b in CPU_ENGINES else [{}])]
    if serve_key is not None and serve_key not in wanted:
        wanted.append(serve_key)
    cases = []
    for backend, prec, settings in wanted:
        why = wb.backend_available(backend)
        if backend in wb.GPU_BACKENDS and not cfg.gpu:
            why = why or "GPU engines run in the --gpu section only"
        name = config_name(backend, prec, settings)
        if why or prec not in paths:
            skipped.append(f"{name}: {why or f'no {prec} model (its preparation was skipped or failed)'}")
            continue
        extra = {**settings, **({"session_config": ort_cfg} if backend.startswith("onnxruntime") and ort_cfg else {})}

        def factory(b: str = backend, p: str = prec, e: dict[str, Any] = extra) -> Any:
            artifact = wb.engine_for(b, p, paths, Path(workdir or "."), calibration, max(int(x) for x in cfg.batches),
                                      reference=ref)
            return wb.open_backend(b, artifact, cfg.threads, **e)

        cases.append(Case(name, "gpu" if backend in wb.GPU_BACKENDS else "engine", backend, prec, factory,
                          settings=dict(settings), served=(backend, prec, settings) == serve_key))
    return cases


def _openvino_anchors(cfg: BenchConfig, paths: dict[str, Path], skipped: list[str]) -> list[Case]:
    """OpenVINO as users run it: the f32 runner on the FP32 file (when OpenVINO is not among the engines), and
    OpenVINO's own defaults (no precision or performance hint) on the FP32 file and on resdeploy's INT8 file."""
    if "openvino" not in cfg.anchors or "fp32" not in paths:
        return []
    why = wb.backend_available("openvino")
    if why:
        skipped.append(f"openvino anchors: {why}")
        return []
    own = {"precision_hint": "default", "performance_hint": "default"}
    cases = []
    if "openvino" not in cfg.backends:
        cases.append(Case("openvino fp32", "anchor", "openvino", "fp32",
                          lambda: wb.open_backend("openvino", paths["fp32"], cfg.threads)))
    cases.append(Case("openvino default", "anchor", "openvino", "fp32",
                      lambda: wb.open_backend("openvino", paths["fp32"], cfg.threads, **own), settings=own))
    if "int8" in paths:
        cases.append(Case("openvino default int8", "anchor", "openvino", "int8",
                          lambda: wb.open_backend("openvino", paths["int8"], cfg.threads, **own), settings=own))
    return cases


def _activate(case: Case, say: Progress, skipped: list[str]) -> bool:
    try:
        case.runner = case.factory()
        case.runner.activate()
        case.description = case.runner.description
        # OpenVINO's own choice on an FP32 file: bf16 on CPUs with avx512_bf16/AMX, f32 elsewhere; gated (and its
        # peak taken) as what it runs
        case.precision = gate_precision(case.precision, case.runner)
        say(f"{case.name}: {case.description}")
        return True
    except (ResdeployError, RuntimeError) as exc:  # one broken backend (CUDA, TensorRT build...) must not sink the bench
        skipped.append(f"{case.name}: could not start: {exc}")
        say(f"{case.name}: could not start: {exc}")
        case.runner = None
        return False


def _parity(case: Case, data: wb.ParityData, ref_logits: np.ndarray, gates: ParityGates) -> dict[str, Any]:
    m, checks = judge(case.runner, case.precision, ref_logits, data, gates, 16)
    failed = [g for g in checks if not g]
    return {"n": m.n, "top1_agreement": m.top1_agreement, "centered_top1_agreement": m.centered_top1_agreement,
            "reference_classes": m.reference_classes, "degenerate": m.degenerate, "max_abs": m.max_abs, "max_rel": m.max_rel,
            "cosine_min": m.cosine_min, "accuracy_delta_points": m.accuracy_delta, "passed": not failed,
            "gates": [str(g) for g in checks], "failed": "; ".join(f"{g.metric} {g.value:.4g} vs {g.op} {g.limit:g}" for g in failed)}


def run_bench(config: BenchConfig, out_dir: str | Path | None = None, *, stream: Any = None,
              clock: Callable[[], float] = time.perf_counter) -> BenchResult:
    """Run the bench; write ``bench.json``, ``bench.md`` and ``bench.png`` to ``out_dir`` when given."""
    budget = Budget(config.max_seconds, clock)  # first: importing torch and the engines counts too
    config.validate()
    cfg = config

    import torch

    say = Progress(budget, stream)
    skipped: list[str] = []
    machine = machine_info()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    macs = 0
    tmp = tempfile.TemporaryDirectory(prefix="resdeploy-bench-")
    try:
        ref = cfg.reference or wb.load_reference(cfg.checkpoint, cfg.arch, cfg.seed)
        data = wb.load_parity_data(ref, cfg.parity_samples, cfg.calibration_size)
        say(f"{ref.name}; parity sample: {data.description}")
        ref_logits = ref.logits(data.images)
        fwd = _forward_seconds(ref, data.images[:1])
        paths = _prepare(cfg, ref, data, Path(tmp.name), budget, fwd, say, skipped)
        if "fp32" in paths:  # counted now: the temp folder goes at the end
            try:
                macs = model_macs(paths["fp32"])
            except Exception:  # noqa: BLE001 - the column is a courtesy; an odd graph leaves it empty
                macs = 0
        cases = build_cases(cfg, ref, paths, skipped, Path(tmp.name), data.calibration)
        live: list[Case] = []
        for case in cases:
            est = 2.0 + (COMPILE_SECONDS + 100 * fwd if case.name.startswith("torch.compile") else 5 * fwd)
            est += TRT_BUILD_SECONDS if case.backend == "tensorrt" else 0.0
            if not budget.allows(est, cfg.reserve_seconds):
                skipped.append(f"{case.name}: not started, its set-up (~{est:.0f} s) does not fit the budget")
                continue
            if _activate(case, say, skipped):
                if budget.allows(len(data.images) * fwd, cfg.reserve_seconds):
                    case.parity = _parity(case, data, ref_logits, cfg.gates)
                    say(f"{case.name}: parity {'pass' if case.parity['passed'] else 'FAIL ' + case.parity['failed']}")
                else:
                    skipped.append(f"{case.name}: parity not checked, the budget ran out")
                live.append(case)
        measure(cfg, live, data.images, budget, fwd, say, skipped)
    finally:
        torch.set_num_threads(old_threads)
        for case in locals().get("cases", []):
            if case.runner is not None:
                case.runner.deactivate()
        tmp.cleanup()
    machine["load_average_end"] = load_average()
    results = tuple(CaseResult(c.name, c.kind, c.backend, c.precision, c.description, c.parity,
                               {b: LatencyStats.from_seconds(s, b) for b, s in c.samples.items() if s},
                               tuple(c.skipped), c.settings, c.served) for c in cases)
    cfg_dict = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("gates", "reference")}
    cfg_dict["gates"] = dataclasses.asdict(cfg.gates)
    cfg_dict["batches"] = [int(b) for b in cfg.batches]
    result = BenchResult(ref.name, data.description, cfg_dict, machine, results, tuple(skipped), budget.elapsed, macs=macs)
    if out_dir is not None:
        result = write_outputs(result, out_dir)
    return result


def _forward_seconds(ref: wb.Reference, x1: np.ndarray) -> float:
    """One warm batch-1 call of the reference: sizes the setup estimates (export ~ tens of forwards, calibration
    ~ a few per image)."""
    import torch

    if ref.model is None:
        ref.logits(x1)
        t0 = time.perf_counter()
        ref.logits(x1)  # opens a session each time: an over-estimate, on the safe side
        return time.perf_counter() - t0
    with torch.inference_mode():
        ref.model(torch.from_numpy(x1))
        t0 = time.perf_counter()
        ref.model(torch.from_numpy(x1))
        return time.perf_counter() - t0


def _prepare(cfg: BenchConfig, ref: wb.Reference, data: wb.ParityData, work: Path, budget: Budget, fwd: float,
             say: Progress, skipped: list[str]) -> dict[str, Path]:
    """Build (or take) the ONNX variants the engines need, each step only when its estimate fits the budget."""
    need = set(cfg.precisions) if cfg.backends else set()
    if "openvino" in cfg.anchors:
        need.add("fp32")
    paths = {k: Path(v) for k, v in cfg.variants.items() if k in need}
    if ref.onnx is not None and "fp32" in need:
        paths.setdefault("fp32", ref.onnx)  # an ONNX reference is the FP32 model itself
    for k, p in paths.items():
        if not p.is_file():
            raise InputError(f"bench: {k} model {p} does not exist; drop it to build it from the model")
    estimates = {"fp32": 3.0 + 30 * fwd, "fp16": 3.0 + 10 * fwd, "int8": 5.0 + 4 * cfg.calibration_size * fwd}
    if "fp32" not in paths and need - set(paths):
        if budget.allows(estimates["fp32"], cfg.reserve_seconds + 10):
            say("exporting FP32 ONNX")
            paths["fp32"] = wb.export_fp32(ref.model, work / "fp32.onnx", data.images[:16])
        else:
            skipped.append(f"ONNX export: ~{estimates['fp32']:.0f} s does not fit the budget; only PyTorch cases run")
            return {}
    if "int8" in need and "int8" not in paths and "fp32" in paths:
        # calibration runs ONNX Runtime: size it by one ORT forward (PyTorch eager suffers far more on a busy machine)
        try:
            with wb.open_backend("onnxruntime", paths["fp32"], cfg.threads) as r:
                one = {r.inputs[0].name: data.images[:1]}
                r.infer(one)
                t0 = time.perf_counter()
                r.infer(one)
                estimates["int8"] = 5.0 + 3 * cfg.calibration_size * (time.perf_counter() - t0)
        except InputError:
            pass
    for prec in ("fp16", "int8"):
        if prec not in need or prec in paths:
            continue
        if not budget.allows(estimates[prec], cfg.reserve_seconds + 10):
            skipped.append(f"{prec} model: preparing it (~{estimates[prec]:.0f} s) does not fit the budget")
            continue
        say(f"building the {prec} model" + (f" ({len(data.calibration)} calibration images, val split)" if prec == "int8" else ""))
        paths[prec] = wb.make_variant(ref, paths["fp32"], work / f"{prec}.onnx", prec,
                                       flavour="u8s8" if prec == "int8" else None, calibration_images=len(data.calibration))
    return paths


def measure(cfg: BenchConfig, cases: list[Case], images: np.ndarray, budget: Budget, fwd: float,
            say: Progress, skipped: list[str]) -> None:
    """Warm up and time ``cases`` (active runners) batch size by batch size, interleaved, within the budget.

    Timing uses ``budget.clock`` (``time.perf_counter`` unless a test injects one). ``fwd``: seconds of one
    batch-1 forward, the first guess of each case's cost before its warm-up measures it."""
    rng = random.Random(cfg.seed)
    batches = [int(b) for b in cfg.batches]
    for bi, batch in enumerate(batches):
        x = _sample(images, batch)
        active = [c for c in cases if c.runner is not None]
        if not active:
            return
        # warm-up: untimed, its median (after the first call) estimates each case's cost
        warm: list[Case] = []
        for case in active:
            per_run = case.estimate.get(batches[bi - 1], fwd) * batch / (batches[bi - 1] if bi else 1)
            once = COMPILE_SECONDS + 100 * fwd if case.name.startswith("torch.compile") else 0.0  # a new shape recompiles
            guess = once + per_run * (max(1, cfg.warmup) + cfg.min_runs)
            if not budget.allows(guess, cfg.reserve_seconds):
                msg = f"batch {batch}: warm-up and {cfg.min_runs} runs (~{guess:.1f} s) do not fit the budget"
                case.skipped.append(msg)
                skipped.append(f"{case.name} {msg}")
                continue
            feed = _feed(case.runner, x)
            times = [_time_call(case.runner, feed, budget.clock) for _ in range(max(1, cfg.warmup))]
            case.estimate[batch] = float(np.median(times[1:] if len(times) > 1 else times))
            warm.append(case)
        say(f"batch {batch}: warmed up " + ", ".join(f"{c.name} ~{1e3 * c.estimate[batch]:.2f} ms" for c in warm))
        if not warm:
            continue
        # plan: an equal share of what is left for each remaining batch size. Each round runs every case as a
        # block of consecutive calls (~block_seconds; one untimed settle call first), so a case is
        # timed with its own weights in cache, as a server runs it, while rounds still share the machine's noise.
        share = max(0.0, budget.remaining - cfg.reserve_seconds) / (len(batches) - bi)
        seconds = share if cfg.duration is None else min(share, cfg.duration)
        want = cfg.runs if cfg.duration is None else None
        block = {c.name: block_size(c.estimate[batch], cfg.block_seconds, want) for c in warm}
        settle = {c.name: int(c.estimate[batch] < cfg.settle_below_seconds) for c in warm}
        cost = {c.name: (block[c.name] + settle[c.name]) * c.estimate[batch] for c in warm}
        wanted_rounds = None if want is None else max(math.ceil(want / block[n]) for n in block)
        min_rounds = max(math.ceil(cfg.min_runs / block[n]) for n in block)
        protect = (REFERENCE, GPU_REFERENCE, *(c.name for c in warm if c.served))  # dropped last
        rounds, dropped = plan_rounds(cost, wanted_rounds, seconds, min_rounds, protect)
        for name in dropped:
            msg = f"batch {batch}: dropped, {cfg.min_runs} timed runs do not fit the {seconds:.1f} s left for this batch size"
            next(c for c in warm if c.name == name).skipped.append(msg)
            skipped.append(f"{name} {msg}")
        timed = [c for c in warm if c.name not in dropped]
        if rounds == 0 or not timed:
            continue
        say(f"batch {batch}: {rounds} interleaved rounds of {len(timed)} cases, blocks of "
            + ", ".join(f"{block[c.name]}" for c in timed) + f" runs (~{rounds * sum(cost[c.name] for c in timed):.1f} s)")
        for c in timed:
            c.samples[batch] = []
        # stop at this batch size's share even when the machine slows down after the warm-up, so that later
        # batch sizes keep theirs (and never past the deadline)
        deadline = budget.start + (budget.seconds - cfg.reserve_seconds if budget.seconds else math.inf)
        stop_at = min(deadline, budget.clock() + seconds)
        for r in range(rounds):
            order = timed[:]
            rng.shuffle(order)
            for c in order:
                todo = block[c.name] if want is None else min(block[c.name], want - len(c.samples[batch]))
                if todo <= 0:
                    continue
                feed = _feed(c.runner, x)
                for _ in range(settle[c.name]):
                    c.runner.infer(feed)
                c.samples[batch].extend(_time_call(c.runner, feed, budget.clock) for _ in range(todo))
            say(f"batch {batch}: round {r + 1}/{rounds}", throttle=True)
            if budget.clock() >= stop_at:
                if cfg.duration is None and r + 1 < rounds:
                    skipped.append(f"batch {batch}: stopped after {r + 1} of {rounds} planned rounds: the runs took longer "
                                   f"than the warm-up predicted (a busy machine?) and this batch size's {seconds:.1f} s were up")
                break
        say(f"batch {batch}: done, " + ", ".join(f"{c.name} p50 {1e3 * float(np.median(c.samples[batch])):.3f} ms" for c in timed))


def _feed(runner: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """The runner's own input name (from the artifact it loaded), never an assumed one."""
    return {runner.inputs[0].name: x}


def block_size(estimate: float, block_seconds: float, runs: int | None) -> int:
    """Consecutive calls per case and round: about ``block_seconds`` of work, at least 1, at most ``runs``."""
    k = max(1, int(block_seconds / estimate + 1e-6)) if estimate > 0 else 1  # 1e-6: 0.02 / 0.001 is 20
    return min(k, runs) if runs else k


def write_outputs(result: BenchResult, out_dir: str | Path) -> BenchResult:
    """bench.json (every figure + machine info), bench.md (the table) and bench.png (the plot), atomically."""
    from resdeploy.pipeline.plots import plot_bench

    out = Path(out_dir)
    files = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    result = dataclasses.replace(result, outputs={k: str(v) for k, v in files.items()})
    data = result.to_dict()
    data["outputs"] = result.outputs
    atomic.write_json(files["json"], data)
    atomic.write_text(files["markdown"], result.markdown())
    plot_bench(data, files["plot"])
    return result
