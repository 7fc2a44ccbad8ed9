"""Statistics on known samples and the budget arithmetic (pure numpy, no timing)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from resdeploy.errors import InputError
from resdeploy.pipeline.stats import Budget, LatencyStats, percentile, speedup


def test_percentile_interpolates_between_closest_ranks():
    x = list(range(1, 11))  # 1..10
    assert percentile(x, 50) == pytest.approx(5.5)
    assert percentile(x, 90) == pytest.approx(9.1)
    assert percentile(x, 99) == pytest.approx(9.91)
    assert percentile(x, 0) == 1 and percentile(x, 100) == 10
    # the same definition as the standard library's inclusive quantiles
    assert percentile(x, 25) == pytest.approx(statistics.quantiles(x, n=4, method="inclusive")[0])


def test_percentile_ignores_order_and_handles_one_sample():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("bad, q, words", [([], 50, "empty"), ([1.0, 2.0], 101, "0..100"), ([1.0, float("nan")], 50, "NaN")])
def test_percentile_refuses_bad_input(bad, q, words):
    with pytest.raises(InputError, match=words):
        percentile(bad, q)


def test_latency_stats_from_seconds():
    s = LatencyStats.from_seconds([0.004, 0.001, 0.003, 0.002], batch=8)
    assert (s.n, s.batch) == (4, 8)
    assert s.p50_ms == pytest.approx(2.5)
    assert s.mean_ms == pytest.approx(2.5)
    assert s.min_ms == pytest.approx(1.0) and s.max_ms == pytest.approx(4.0)
    assert s.p99_ms == pytest.approx(3.97)
    assert s.throughput == pytest.approx(8 / 0.0025)
    assert "p50 2.500 ms" in str(s) and "3,200.0 img/s" in str(s)
    assert s.to_dict()["p90_ms"] == pytest.approx(3.7)


def test_latency_stats_refuses_bad_batch():
    with pytest.raises(InputError, match="batch"):
        LatencyStats.from_seconds([0.1], batch=0)


def test_speedup():
    assert speedup(78.0, 13.0) == pytest.approx(6.0)
    assert speedup(1.0, 0.0) == float("inf")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_budget_counts_down_on_its_clock():
    clock = FakeClock()
    b = Budget(10.0, clock)
    assert b.remaining == 10.0 and not b.expired
    clock.t += 7.5
    assert b.elapsed == pytest.approx(7.5) and b.remaining == pytest.approx(2.5)
    assert b.allows(2.0) and not b.allows(2.0, reserve=1.0)
    clock.t += 3
    assert b.expired
    assert Budget(None, clock).remaining == np.inf


def test_budget_refuses_nonpositive_seconds():
    with pytest.raises(InputError, match="budget"):
        Budget(0)
