"""The engine chosen by measurement: time every CPU engine x precision that passed parity, on this machine, at the
batch sizes the deployment will see, and pick the fastest (like TensorRT's tactic timing, but across engines).

    choice = choose_engine([EngineCandidate("onnxruntime", "int8", Path("int8.onnx")),
                            EngineCandidate("openvino", "int8", Path("int8.onnx"))], batches=(1, 8))
    write_choice(choice, "engines/")      # engines/engine-choice.json: the choice, why, and the whole table

How: every candidate is opened and warmed up; then, per batch size, rounds in which each candidate runs a short
block of consecutive calls in a fresh random order (the bench's interleaving), until ``seconds`` are spent. The
score is the geometric mean over the batch sizes of each candidate's p50 relative to the fastest p50 at that
batch size (1.0 = fastest everywhere). A candidate that failed parity is listed, never timed, never chosen.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import CheckFailed, InputError, ResdeployError

CHOICE_FILE = "engine-choice.json"
CPU_ENGINES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class EngineCandidate:
    backend: str  # onnxruntime | openvino
    precision: str  # fp32 | fp16 | int8
    model: Path  # the ONNX variant the engine runs
    parity_passed: bool = True
    parity: str = ""  # the parity verdict in words (why it may not be timed)

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class EngineTiming:
    backend: str
    precision: str
    model: str
    parity_passed: bool
    p50_ms: dict[int, float]  # batch -> p50 (empty when not timed)
    min_ms: dict[int, float]
    runs: dict[int, int]
    score: float | None  # geometric mean of p50 / fastest p50 over batch sizes (1.0 = fastest); None = not timed
    note: str = ""  # why not timed, or what went wrong

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("p50_ms", "min_ms", "runs"):
            d[k] = {str(b): v for b, v in d[k].items()}
        return d


@dataclass(frozen=True)
class EngineChoice:
    """The chosen engine and the measurements behind it."""

    backend: str
    precision: str
    model: str
    batches: tuple[int, ...]
    table: tuple[EngineTiming, ...]
    reason: str
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": "resdeploy-engine-choice/1", "backend": self.backend, "precision": self.precision,
                "model": self.model, "batches": list(self.batches), "reason": self.reason,
                "table": [t.to_dict() for t in self.table], "machine": self.machine, "seconds": round(self.seconds, 2)}

    def __str__(self) -> str:
        cols = "".join(f" {'p50 b' + str(b):>10}" for b in self.batches)
        lines = [f"engine choice: {self.name} ({self.reason})", f"  {'engine':<20}{cols} {'score':>7}  parity"]
        for t in sorted(self.table, key=lambda t: (t.score is None, t.score or 0.0)):
            vals = "".join(f" {t.p50_ms[b]:10.3f}" if b in t.p50_ms else f" {'-':>10}" for b in self.batches)
            score = f"{t.score:7.2f}" if t.score is not None else f"{'-':>7}"
            lines.append(f"  {t.name:<20}{vals} {score}  {'pass' if t.parity_passed else 'FAIL'}"
                         + (f"  ({t.note})" if t.note else ""))
        return "\n".join(lines)


def _default_open(c: EngineCandidate, threads: int | None) -> Any:
    from resdeploy.pipeline import workbench as wb

    return wb.open_backend(c.backend, c.model, threads)


def choose_engine(candidates: Sequence[EngineCandidate], *, batches: Sequence[int] = (1,), threads: int | None = None,
                  seconds: float = 10.0, warmup: int = 3, block_seconds: float = 0.2, image: np.ndarray | None = None,
                  open_fn: Callable[[EngineCandidate, int | None], Any] | None = None,
                  clock: Callable[[], float] = time.perf_counter, seed: int = 0) -> EngineChoice:
    """Time ``candidates`` (those that passed parity) interleaved at ``batches`` within about ``seconds`` and pick
    the fastest. ``image``: one normalised (1, C, H, W) input (default zeros of the model's input shape).
    ``open_fn(candidate, threads)`` returns an inactive runner (default: the parity stage's runners)."""
    batches = tuple(sorted({int(b) for b in batches}))
    if not batches or batches[0] < 1:
        raise InputError(f"engine choice: batch sizes must be >= 1, got {list(batches)}")
    if not candidates:
        raise InputError("engine choice: no candidates; build at least one CPU engine")
    for c in candidates:
        if c.backend not in CPU_ENGINES:
            raise InputError(f"engine choice times CPU engines ({', '.join(CPU_ENGINES)}); {c.backend!r} is not one")
    open_fn = open_fn or _default_open
    t_start = clock()
    notes: dict[str, str] = {}
    live: list[tuple[EngineCandidate, Any]] = []
    try:
        for c in candidates:
            if not c.parity_passed:
                notes[c.name] = f"not timed: parity failed ({c.parity})" if c.parity else "not timed: parity failed"
                continue
            try:
                r = open_fn(c, threads)
                r.activate()
            except (ResdeployError, RuntimeError, OSError) as exc:
                notes[c.name] = f"not timed: could not start ({exc})"
                continue
            live.append((c, r))
        if not live:
            raise CheckFailed("engine choice: no candidate engine passed parity and started here:\n"
                              + "\n".join(f"  {k}: {v}" for k, v in notes.items()))
        samples: dict[str, dict[int, list[float]]] = {c.name: {b: [] for b in batches} for c, _ in live}
        rng = random.Random(seed)
        per_batch = max(0.0, seconds) / len(batches)
        for b in batches:
            feeds = {}
            for c, r in live:
                x = image if image is not None else np.zeros((1, *[d if isinstance(d, int) and d > 0 else 1
                                                                    for d in r.inputs[0].shape[1:]]), np.float32)
                feeds[c.name] = {r.inputs[0].name: np.ascontiguousarray(np.repeat(x[:1], b, axis=0))}
            est: dict[str, float] = {}
            for c, r in live:
                times = []
                for _ in range(max(1, warmup)):
                    t0 = clock()
                    r.infer(feeds[c.name])
                    times.append(clock() - t0)
                est[c.name] = float(np.median(times[1:] if len(times) > 1 else times))
            block = {n: max(1, int(block_seconds / max(e, 1e-9))) for n, e in est.items()}
            stop = clock() + per_batch
            rounds = 0
            while rounds < 3 or clock() < stop:  # at least 3 rounds: a p50 of several blocks
                order = live[:]
                rng.shuffle(order)
                for c, r in order:
                    # One untimed run after switching engines: the previous engine's threads are still spinning
                    # (ONNX Runtime spins after each run) and its data fills the caches. Timed per run, that cost
                    # fell on whichever engine came next (resnet50: OpenVINO INT8 p50 21.2 ms here, 15.0 ms in the
                    # bench, whose min agreed with the bench).
                    r.infer(feeds[c.name])
                    for _ in range(block[c.name]):
                        t0 = clock()
                        r.infer(feeds[c.name])
                        samples[c.name][b].append(clock() - t0)
                rounds += 1
                if rounds >= 1000:
                    break
    finally:
        for _, r in live:
            try:
                r.deactivate()
            except Exception:  # noqa: BLE001 - closing a runner must not hide the result
                pass
    p50 = {n: {b: 1e3 * float(np.median(v)) for b, v in per.items() if v} for n, per in samples.items()}
    fastest = {b: min(p50[n][b] for n in p50 if b in p50[n]) for b in batches}
    score = {n: math.exp(sum(math.log(p50[n][b] / fastest[b]) for b in batches) / len(batches)) for n in p50}
    table: list[EngineTiming] = []
    for c in candidates:
        if c.name in p50:
            s = samples[c.name]
            table.append(EngineTiming(c.backend, c.precision, str(c.model), c.parity_passed, p50[c.name],
                                      {b: 1e3 * float(np.min(v)) for b, v in s.items() if v},
                                      {b: len(v) for b, v in s.items()}, score[c.name]))
        else:
            table.append(EngineTiming(c.backend, c.precision, str(c.model), c.parity_passed, {}, {}, {}, None,
                                      notes.get(c.name, "")))
    best = min((t for t in table if t.score is not None), key=lambda t: (t.score, t.p50_ms[batches[0]]))
    others = sorted((t for t in table if t.score is not None and t is not best), key=lambda t: t.score or 0.0)
    reason = (f"fastest of {len(others) + 1} timed engine(s) at batch {', '.join(map(str, batches))}: p50 "
              + ", ".join(f"{best.p50_ms[b]:.3f} ms" for b in batches))
    if others:
        reason += f"; next {others[0].name} is {others[0].score:.2f}x slower"
    from resdeploy.pipeline.machine import machine_info

    m = machine_info()
    machine = {k: m.get(k) for k in ("cpu_model", "logical_cpus", "simd", "load_average_start", "versions")}
    return EngineChoice(best.backend, best.precision, best.model, batches, tuple(table), reason, machine,
                        clock() - t_start)


def write_choice(choice: EngineChoice, folder: str | Path) -> Path:
    """``folder/engine-choice.json`` (atomically): the choice, the reason and the whole table."""
    path = Path(folder) / CHOICE_FILE
    atomic.write_json(path, choice.to_dict())
    return path


def read_choice(folder_or_file: str | Path) -> dict[str, Any]:
    """The recorded choice (as written by :func:`write_choice`)."""
    import json

    p = Path(folder_or_file)
    p = p / CHOICE_FILE if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"engine choice {p} cannot be read ({exc}); rerun `resdeploy build --backend auto`") from None
    if data.get("format") != "resdeploy-engine-choice/1":
        raise InputError(f"{p} is not a resdeploy engine choice (format {data.get('format')!r})")
    return data


__all__ = ["CHOICE_FILE", "EngineCandidate", "EngineChoice", "EngineTiming", "choose_engine", "read_choice", "write_choice"]
