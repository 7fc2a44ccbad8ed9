"""Latency statistics, pure numpy: percentiles, summaries and a time budget.

Percentiles use linear interpolation between closest ranks (numpy's default, the same as
``statistics.quantiles(method="inclusive")``), so p50 of an even-sized sample is the mean of the middle two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from resdeploy.errors import InputError


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples`` by linear interpolation between closest ranks."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise InputError("percentile of an empty sample: the case recorded no timed runs (raise --max-seconds or lower --runs)")
    if not 0.0 <= q <= 100.0:
        raise InputError(f"percentile q must be within 0..100, got {q}")
    if not np.all(np.isfinite(x)):
        raise InputError("percentile of a sample with NaN/inf timings; the clock or the measured call is broken")
    return float(np.percentile(x, q))


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one case's timed runs. Times in milliseconds; throughput in images per second (from the mean)."""

    n: int  # timed runs
    batch: int  # images per run
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    throughput: float  # batch / mean latency, images/s

    @classmethod
    def from_seconds(cls, samples_s: Sequence[float] | np.ndarray, batch: int = 1) -> "LatencyStats":
        """Summarise per-run wall times given in seconds."""
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        p50, p90, p99 = (percentile(ms, q) for q in (50, 90, 99))
        mean = float(ms.mean())
        return cls(n=int(ms.size), batch=batch, p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean,
                   min_ms=float(ms.min()), max_ms=float(ms.max()), std_ms=float(ms.std()),
                   throughput=batch / (mean / 1e3) if mean > 0 else math.inf)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"p50 {self.p50_ms:.3f} ms  p90 {self.p90_ms:.3f}  p99 {self.p99_ms:.3f}  mean {self.mean_ms:.3f}  "
                f"min {self.min_ms:.3f}  ({self.n} runs x batch {self.batch}: {self.throughput:,.1f} img/s)")


def speedup(reference_ms: float, ms: float) -> float:
    """How many times faster ``ms`` is than ``reference_ms`` (2.0 = half the time)."""
    return reference_ms / ms if ms > 0 else math.inf


class Budget:
    """A wall-clock deadline. ``clock`` is injectable so the harness's budget handling can be tested exactly."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        if seconds is not None and seconds <= 0:
            raise InputError(f"the time budget must be > 0 seconds, got {seconds}")
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed

    def allows(self, estimated_seconds: float, reserve: float = 0.0) -> bool:
        """True when a step estimated at ``estimated_seconds`` fits, keeping ``reserve`` seconds spare."""
        return estimated_seconds + reserve <= self.remaining

    @property
    def expired(self) -> bool:
        return self.remaining <= 0
