"""The engine chosen by measurement: time every CPU engine configuration (backend x precision x settings) that
passes parity, on this machine, at the batch sizes the deployment will see, and pick the fastest (like TensorRT's
tactic timing, but across engines and their settings).

    cands = configurations([("onnxruntime", "int8", Path("int8.onnx")), ("openvino", "int8", Path("int8.onnx"))])
    cands = check_configurations(cands, ref_logits, data, gates)   # every configuration through the parity gates
    choice = choose_engine(cands, batches=(1, 8))
    write_choice(choice, "engines/")      # engines/engine-choice.json: the choice, why, and the whole table

**Candidates.** Each backend's runner defaults plus the settings of :data:`SEARCHED` (see there for why each is
searched and why the others are not). **Parity.** Every configuration gets its own parity run on the test images
with the variants' gates (:func:`resdeploy.pipeline.parity.judge`), also those whose settings cannot change the
numbers (spinning): one rule, and a pass over the test split costs little next to the release it guards. One that
fails is listed with the failed gate, never timed, never chosen. **Timing.** Every candidate is opened and warmed
up; then, per batch size, rounds in which each runs a short block of consecutive calls in a fresh random order (the
bench's interleaving), one untimed call after each switch, until ``seconds`` are spent. **Score.** The weighted
geometric mean over the batch sizes of each candidate's p50 relative to the fastest p50 at that batch size (1.0 =
fastest everywhere); ``weights`` (``[engines] choice_weights``) say how much each batch size counts, equal by
default. The winner of each batch size is reported beside the choice, and by how much it beats the choice.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import CheckFailed, InputError, ResdeployError

CHOICE_FILE = "engine-choice.json"
CPU_ENGINES = ("onnxruntime", "openvino")
# The settings searched per backend, besides the runner's defaults (ONNX Runtime: ORT's own; OpenVINO: f32 and
# LATENCY hints), each a candidate of its own:
# - onnxruntime, spinning off: spinning intra-op threads start the next run sooner on an idle machine but burn the
#   cores that other work needs (resnet50 INT8, batch 1, on a busy 2-core machine: p50 24.1 ms spinning, 12.5 ms not).
# - openvino, OpenVINO's own defaults (no precision or performance hint): on CPUs with avx512_bf16 or AMX the float
#   parts run in bf16, faster there and not the same numbers (the gate judges); where OpenVINO's defaults are f32 and
#   LATENCY this is the runner's own configuration and is not timed twice.
# Not searched: PERFORMANCE_HINT=THROUGHPUT, which splits the cores into streams that only concurrent requests fill
# while a runner runs one request at a time (resnet50 INT8 here: p50 12.2 vs 9.5 ms at batch 1, 79 vs 70 ms at
# batch 8); and thread counts, which are the server's to split over a model's instances.
SEARCHED: dict[str, tuple[dict[str, Any], ...]] = {
    "onnxruntime": ({"spinning": False},),
    "openvino": ({"precision_hint": "default", "performance_hint": "default"},),
}


@dataclass(frozen=True)
class EngineCandidate:
    backend: str  # onnxruntime | openvino
    precision: str  # fp32 | fp16 | int8
    model: Path  # the ONNX variant the engine runs
    parity_passed: bool = True
    parity: str = ""  # the parity verdict in words (the failed gate, or the gates passed)
    settings: Mapping[str, Any] = field(default_factory=dict)  # the runner's settings (engines.check_settings)

    @property
    def name(self) -> str:
        return config_name(self.backend, self.precision, self.settings)


def config_name(backend: str, precision: str, settings: Mapping[str, Any] | None = None) -> str:
    """``"openvino int8 [OpenVINO defaults]"``; no brackets for the runner's default settings."""
    from resdeploy.engines import settings_label

    label = settings_label(backend, dict(settings or {})) if backend in CPU_ENGINES else ""
    return f"{backend} {precision}" + (f" [{label}]" if label else "")


@dataclass(frozen=True)
class EngineTiming:
    backend: str
    precision: str
    model: str
    parity_passed: bool
    p50_ms: dict[int, float]  # batch -> p50 (empty when not timed)
    min_ms: dict[int, float]
    runs: dict[int, int]
    score: float | None  # weighted geometric mean of p50 / fastest p50 over batch sizes (1.0 = fastest); None = not timed
    note: str = ""  # why not timed, or what went wrong
    settings: dict[str, Any] = field(default_factory=dict)
    parity: str = ""  # the parity verdict in words

    @property
    def name(self) -> str:
        return config_name(self.backend, self.precision, self.settings)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("p50_ms", "min_ms", "runs"):
            d[k] = {str(b): v for b, v in d[k].items()}
        return {**d, "name": self.name}


@dataclass(frozen=True)
class EngineChoice:
    """The chosen engine configuration and the measurements behind it."""

    backend: str
    precision: str
    model: str
    batches: tuple[int, ...]
    table: tuple[EngineTiming, ...]
    reason: str
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # the chosen runner settings, every key explicit
    weights: tuple[float, ...] = ()  # per batch size in the score (normalised to sum 1)
    winners: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch -> fastest there and the choice's gap

    @property
    def name(self) -> str:
        return config_name(self.backend, self.precision, self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "resdeploy-engine-choice/1", "backend": self.backend, "precision": self.precision,
                "settings": dict(self.settings), "name": self.name, "model": self.model, "batches": list(self.batches),
                "weights": list(self.weights), "reason": self.reason,
                "winners": {str(b): w for b, w in self.winners.items()},
                "table": [t.to_dict() for t in self.table], "machine": self.machine, "seconds": round(self.seconds, 2)}

    def __str__(self) -> str:
        width = max(20, *(len(t.name) + 1 for t in self.table))
        cols = "".join(f" {'p50 b' + str(b):>10}" for b in self.batches)
        lines = [f"engine choice: {self.name} ({self.reason})", f"  {'engine':<{width}}{cols} {'score':>7}  parity"]
        for t in sorted(self.table, key=lambda t: (t.score is None, t.score or 0.0)):
            vals = "".join(f" {t.p50_ms[b]:10.3f}" if b in t.p50_ms else f" {'-':>10}" for b in self.batches)
            score = f"{t.score:7.2f}" if t.score is not None else f"{'-':>7}"
            lines.append(f"  {t.name:<{width}}{vals} {score}  {'pass' if t.parity_passed else 'FAIL'}"
                         + (f"  ({t.note})" if t.note else ""))
        return "\n".join(lines + [f"  {line}" for line in winner_lines(self.to_dict())])


def winner_lines(choice: Mapping[str, Any]) -> list[str]:
    """One line per batch size: who was fastest there, and how the chosen configuration compares (from the dict
    form, so the report says the same from engine-choice.json)."""
    lines = []
    for b, w in (choice.get("winners") or {}).items():
        if w.get("engine") == choice.get("name"):
            nxt = f"; next {w['runner_up']} is {w['runner_up_ratio']:.2f}x slower" if w.get("runner_up") else ""
            lines.append(f"batch {b}: the chosen {w['engine']} is fastest, p50 {w['p50_ms']:.3f} ms{nxt}")
        else:
            lines.append(f"batch {b}: {w['engine']} is fastest, p50 {w['p50_ms']:.3f} ms; the chosen "
                         f"{choice.get('name')} is {w['chosen_ratio']:.2f}x slower there ({w['chosen_p50_ms']:.3f} ms)")
    return lines


# -- the candidates and their parity ---------------------------------------------------------------------
def candidate_settings(backend: str) -> list[dict[str, Any]]:
    """The runner's defaults, then :data:`SEARCHED` for ``backend``, each complete (every setting explicit). OpenVINO's
    own defaults are left out where they are the runner's (f32 and LATENCY on this CPU: asked of OpenVINO)."""
    from resdeploy.engines import check_settings

    out = [check_settings(backend, {})]
    for extra in SEARCHED.get(backend, ()):
        full = check_settings(backend, extra)
        if backend == "openvino" and set(full.values()) == {"default"} and _openvino_defaults_are_the_runners():
            continue
        if full not in out:
            out.append(full)
    return out


def _openvino_defaults_are_the_runners() -> bool:
    from resdeploy.engines.openvino import DEFAULT_SETTINGS, openvino_defaults

    try:
        d = openvino_defaults()
    except ResdeployError:  # not installed: the candidate fails to start and says why
        return False
    return (d["precision"], d["performance"]) == (DEFAULT_SETTINGS["precision_hint"], DEFAULT_SETTINGS["performance_hint"])


def configurations(engines: Sequence[tuple[str, str, Path]]) -> list[EngineCandidate]:
    """Every (backend, precision, model) with each of :func:`candidate_settings`, not yet judged."""
    return [EngineCandidate(b, p, Path(m), settings=s) for b, p, m in engines for s in candidate_settings(b)]


def _default_open(c: EngineCandidate, threads: int | None) -> Any:
    from resdeploy.pipeline import workbench as wb

    return wb.open_backend(c.backend, c.model, threads, **dict(c.settings))


def check_configurations(candidates: Sequence[EngineCandidate], ref_logits: np.ndarray, data: Any, gates: Any, *,
                         threads: int | None = None, open_fn: Callable[[EngineCandidate, int | None], Any] | None = None,
                         batch_size: int = 32, say: Callable[[str], None] | None = None) -> list[EngineCandidate]:
    """Each candidate through the parity gates (``gates``: a ParityGates) on ``data`` (a ParityData: the test images)
    against ``ref_logits``: the candidates again, with ``parity_passed`` and the verdict in words. One already
    judged (its verdict given, as parity's own rows are) or already failed is kept as it is; one that cannot start
    fails with the reason."""
    from resdeploy.pipeline.parity import judge

    open_fn = open_fn or _default_open
    out = []
    for c in candidates:
        if not c.parity_passed or c.parity:
            out.append(c)
            continue
        try:
            with open_fn(c, threads) as runner:
                m, results = judge(runner, c.precision, ref_logits, data, gates, batch_size)
        except (ResdeployError, RuntimeError, OSError) as exc:
            out.append(replace(c, parity_passed=False, parity=f"could not start: {exc}"))
            continue
        failed = [g for g in results if not g]
        words = "; ".join(str(g).split(": ", 2)[-1] for g in (failed or results))
        out.append(replace(c, parity_passed=not failed, parity=(f"FAILED {words}" if failed else words) + f" (n={m.n})"))
        if say:
            say(f"{c.name}: parity {'pass' if not failed else 'FAIL'}: {words}")
    return out


# -- timing ----------------------------------------------------------------------------------------------
def batch_weights(batches: Sequence[int], weights: Sequence[float] | None) -> tuple[float, ...]:
    """Weights per batch size, normalised to sum 1: equal when ``weights`` is empty, else one per batch size."""
    if not weights:
        return tuple(1.0 / len(batches) for _ in batches)
    if len(weights) != len(batches) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"engine choice: weights {list(weights)} must be one number >= 0 per batch size "
                         f"{list(batches)} (not all 0); or none for equal weights")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def _start(candidates: Sequence[EngineCandidate], open_fn: Callable[[EngineCandidate, int | None], Any],
           threads: int | None, notes: dict[str, str]) -> list[tuple[EngineCandidate, Any]]:
    """Open and activate every candidate that passed parity; the others get a note saying why not."""
    live = []
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
    return live


def _time(live: list[tuple[EngineCandidate, Any]], batches: tuple[int, ...], seconds: float, warmup: int,
          block_seconds: float, image: np.ndarray | None, clock: Callable[[], float], seed: int) -> dict[str, dict[int, list[float]]]:
    """Seconds per timed call, per candidate and batch size: interleaved rounds of short blocks (module docstring)."""
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
    return samples


def _winners(table: list[EngineTiming], best: EngineTiming, batches: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Per batch size: the fastest configuration, and the chosen one's p50 and gap (or, when the chosen one is the
    fastest, the runner-up and its gap)."""
    out: dict[int, dict[str, Any]] = {}
    for b in batches:
        ranked = sorted((t for t in table if b in t.p50_ms), key=lambda t: t.p50_ms[b])
        top = ranked[0]
        w: dict[str, Any] = {"engine": top.name, "p50_ms": top.p50_ms[b], "chosen_p50_ms": best.p50_ms[b],
                             "chosen_ratio": best.p50_ms[b] / top.p50_ms[b]}
        if top is best and len(ranked) > 1:
            w.update(runner_up=ranked[1].name, runner_up_ratio=ranked[1].p50_ms[b] / top.p50_ms[b])
        out[b] = w
    return out


def _reason(best: EngineTiming, timed: int, batches: tuple[int, ...], weights: tuple[float, ...], equal: bool,
            winners: dict[int, dict[str, Any]]) -> str:
    """Why ``best``: its score and how it was weighed, then per batch size who was fastest and by how much."""
    per = []
    for b in batches:
        w = winners[b]
        if w["engine"] == best.name:
            per.append(f"batch {b}: fastest" + (f", next {w['runner_up']} {w['runner_up_ratio']:.2f}x slower"
                                                 if w.get("runner_up") else ""))
        else:
            per.append(f"batch {b}: {w['engine']} fastest, chosen {w['chosen_ratio']:.2f}x slower")
    if len(batches) == 1:
        return (f"fastest of {timed} timed configuration(s) at batch {batches[0]}: p50 {best.p50_ms[batches[0]]:.3f} ms"
                + (f"; next {winners[batches[0]]['runner_up']} is {winners[batches[0]]['runner_up_ratio']:.2f}x slower"
                   if winners[batches[0]].get("runner_up") else ""))
    how = "equal weights" if equal else "weights " + ", ".join(f"b{b} {x:.2f}" for b, x in zip(batches, weights))
    return (f"lowest score of {timed} timed configuration(s), {best.score:.2f} (geometric mean over batch "
            f"{', '.join(map(str, batches))} of p50 / fastest p50, {how}); " + "; ".join(per))


def choose_engine(candidates: Sequence[EngineCandidate], *, batches: Sequence[int] = (1,), threads: int | None = None,
                  seconds: float = 10.0, warmup: int = 3, block_seconds: float = 0.2, image: np.ndarray | None = None,
                  open_fn: Callable[[EngineCandidate, int | None], Any] | None = None,
                  clock: Callable[[], float] = time.perf_counter, seed: int = 0,
                  weights: Sequence[float] | None = None) -> EngineChoice:
    """Time ``candidates`` (those that passed parity) interleaved at ``batches`` within about ``seconds`` and pick
    the lowest score (``weights``: per batch size, as in :func:`batch_weights`). ``image``: one normalised
    (1, C, H, W) input (default zeros of the model's input shape). ``open_fn(candidate, threads)`` returns an
    inactive runner (default: the workbench's runners with the candidate's settings)."""
    given = [int(b) for b in batches]
    if not given or min(given) < 1:
        raise InputError(f"engine choice: batch sizes must be >= 1, got {given}")
    batches = tuple(sorted(set(given)))
    if weights:  # parallel to the batch sizes as given; a size given twice counts twice
        w_given = batch_weights(given, weights)
        w = tuple(sum(x for g, x in zip(given, w_given) if g == b) for b in batches)
    else:
        w = batch_weights(batches, None)
    if not candidates:
        raise InputError("engine choice: no candidates; build at least one CPU engine")
    for c in candidates:
        if c.backend not in CPU_ENGINES:
            raise InputError(f"engine choice times CPU engines ({', '.join(CPU_ENGINES)}); {c.backend!r} is not one")
    t_start = clock()
    notes: dict[str, str] = {}
    live = _start(candidates, open_fn or _default_open, threads, notes)
    try:
        if not live:
            raise CheckFailed("engine choice: no candidate engine passed parity and started here:\n"
                              + "\n".join(f"  {k}: {v}" for k, v in notes.items()))
        samples = _time(live, batches, seconds, warmup, block_seconds, image, clock, seed)
    finally:
        for _, r in live:
            try:
                r.deactivate()
            except Exception:  # noqa: BLE001 - closing a runner must not hide the result
                pass
    p50 = {n: {b: 1e3 * float(np.median(v)) for b, v in per.items() if v} for n, per in samples.items()}
    fastest = {b: min(p50[n][b] for n in p50 if b in p50[n]) for b in batches}
    score = {n: math.exp(sum(wb * math.log(p50[n][b] / fastest[b]) for b, wb in zip(batches, w))) for n in p50}
    table = [EngineTiming(c.backend, c.precision, str(c.model), c.parity_passed, p50[c.name],
                          {b: 1e3 * float(np.min(v)) for b, v in samples[c.name].items() if v},
                          {b: len(v) for b, v in samples[c.name].items()}, score[c.name],
                          settings=dict(c.settings), parity=c.parity)
             if c.name in p50 else
             EngineTiming(c.backend, c.precision, str(c.model), c.parity_passed, {}, {}, {}, None,
                          notes.get(c.name, ""), dict(c.settings), c.parity)
             for c in candidates]
    best = min((t for t in table if t.score is not None), key=lambda t: (t.score, t.p50_ms[batches[0]]))
    timed = sum(t.score is not None for t in table)
    from resdeploy.pipeline.machine import machine_info

    m = machine_info()
    machine = {k: m.get(k) for k in ("cpu_model", "logical_cpus", "usable_cpus", "isa", "simd", "load_average_start",
                                     "versions", "time_utc")}
    winners = _winners(table, best, batches)
    return EngineChoice(best.backend, best.precision, best.model, batches, tuple(table),
                        _reason(best, timed, batches, w, not weights, winners), machine, clock() - t_start,
                        dict(best.settings), w, winners)


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


__all__ = ["CHOICE_FILE", "SEARCHED", "EngineCandidate", "EngineChoice", "EngineTiming", "batch_weights",
           "candidate_settings", "check_configurations", "choose_engine", "config_name", "configurations", "read_choice",
           "winner_lines", "write_choice"]
