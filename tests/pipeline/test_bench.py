"""The latency harness: round planning, interleaving and budget handling on a fake clock, then one real short run."""

from __future__ import annotations

import importlib.util
import io
import json
from types import SimpleNamespace


import numpy as np
import pytest

from resdeploy.errors import InputError
from resdeploy.pipeline.bench import REFERENCE, BenchConfig, Case, Progress, measure, plan_rounds, run_bench
from resdeploy.pipeline.machine import machine_info
from resdeploy.pipeline.stats import Budget


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """Each infer() advances the fake clock by ``ms_per_image`` x batch (+ a first-call cost) and logs the order."""

    def __init__(self, clock: FakeClock, name: str, ms_per_image: float, log: list[str], first_call_ms: float = 0.0) -> None:
        self.clock, self.name, self.ms, self.log, self.first = clock, name, ms_per_image, log, first_call_ms
        self.description = f"fake {name}"
        # the bench feeds each runner under its own input name (from the artifact), so a fake declares one too
        self.inputs = [SimpleNamespace(name="input")]

    def infer(self, feed):
        batch = len(feed["input"])
        self.clock.t += (self.ms * batch + self.first) / 1e3
        self.first = 0.0
        self.log.append(self.name)
        return {"logits": np.zeros((batch, 10), np.float32)}

    def deactivate(self) -> None:
        pass


def fake_cases(clock, log, costs):
    cases = []
    for name, ms in costs.items():
        c = Case(name, "anchor" if name == REFERENCE else "engine", "fake", "fp32", factory=lambda: None)
        c.runner = FakeRunner(clock, name, ms, log)
        cases.append(c)
    return cases


def run_measure(costs, max_seconds, **cfg):
    clock, log = FakeClock(), []
    cases = fake_cases(clock, log, costs)
    config = BenchConfig(arch="resnet20", **cfg)
    budget = Budget(max_seconds, clock)
    skipped: list[str] = []
    measure(config, cases, np.zeros((4, 1, 8, 8), np.float32), budget, 0.001, Progress(budget, io.StringIO()), skipped)
    return clock, log, cases, skipped, budget


def test_plan_rounds_fits_the_wanted_runs_when_there_is_time():
    assert plan_rounds({"a": 0.01, "b": 0.02}, 100, seconds=10.0, min_runs=10) == (100, [])


def test_plan_rounds_shortens_then_drops_the_slowest_case_first():
    # 0.2 s for a 0.03 s round: 6 rounds < 10 -> drop b (slowest), then 20 rounds of a fit
    assert plan_rounds({"a": 0.01, "b": 0.02}, 100, seconds=0.2, min_runs=10) == (20, ["b"])
    # the reference is dropped last even when it is the slowest
    rounds, dropped = plan_rounds({REFERENCE: 0.05, "x": 0.02, "y": 0.03}, 50, seconds=0.6, min_runs=10)
    assert dropped == ["y"] and rounds == 8 or dropped == ["y", "x"] and rounds >= 10
    assert REFERENCE not in dropped
    assert plan_rounds({REFERENCE: 1.0}, 50, seconds=0.5, min_runs=10) == (0, [REFERENCE])


def test_plan_rounds_without_a_run_count_fills_the_time():
    assert plan_rounds({"a": 0.01, "b": 0.01}, None, seconds=1.0, min_runs=10) == (50, [])


def test_measure_interleaves_cases_round_by_round():
    costs = {REFERENCE: 2.0, "fast": 0.5, "mid": 1.0}
    clock, log, cases, skipped, budget = run_measure(costs, 60.0, batches=(1,), warmup=3, runs=20, block_seconds=0,
                                                     settle_below_seconds=0)
    assert skipped == []
    assert all(len(c.samples[1]) == 20 for c in cases)
    timed = log[3 * len(costs):]  # after the warm-ups
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == sorted(costs) for r in rounds), "every round runs every case once"
    assert len({tuple(r) for r in rounds}) > 1, "the order changes between rounds"
    fast = next(c for c in cases if c.name == "fast")
    assert np.allclose(fast.samples[1], 0.0005)


def test_measure_runs_blocks_with_a_settle_call_for_fast_cases():
    costs = {REFERENCE: 10.0, "fast": 1.0}  # ms; blocks of ~20 ms: 2 and 20 calls
    clock, log, cases, skipped, _ = run_measure(costs, 60.0, batches=(1,), warmup=2, runs=40, block_seconds=0.02,
                                                settle_below_seconds=0.005)
    by = {c.name: c for c in cases}
    assert len(by["fast"].samples[1]) == 40 and len(by[REFERENCE].samples[1]) == 40, "exactly the runs asked for"
    timed = log[2 * len(costs):]
    # the fast case: 1 settle + 20 timed calls per block; the reference (10 ms, no settle) 2 per block
    assert timed.count("fast") == 40 + 2 and timed.count(REFERENCE) == 40
    runs_of_fast = [len(list(g)) for k, g in __import__("itertools").groupby(timed) if k == "fast"]
    assert runs_of_fast == [21, 21]
    assert skipped == []


def test_measure_stays_within_the_budget_and_reports_what_it_dropped():
    costs = {REFERENCE: 50.0, "fast": 1.0, "slow": 400.0}  # ms per image
    clock, _, cases, skipped, budget = run_measure(costs, 10.0, batches=(1, 8), warmup=2, runs=100, min_runs=5,
                                                   reserve_seconds=1.0, block_seconds=0, settle_below_seconds=0)
    assert clock.t <= 10.0, f"ran {clock.t:.2f} s on a 10 s budget"
    by = {c.name: c for c in cases}
    assert len(by["fast"].samples[1]) >= 5 and len(by[REFERENCE].samples[1]) >= 5
    assert any(s.startswith("slow batch") for s in skipped), skipped
    assert by["slow"].skipped, "the dropped case says why"
    # batch 8: the reference's warm-up + 5 runs (8 x 50 ms x 7 = 2.8 s) may or may not fit what is left; never overshoots
    assert all(len(v) >= 5 for c in cases for v in c.samples.values())


def test_measure_duration_mode_stops_on_time():
    clock, _, cases, skipped, _ = run_measure({REFERENCE: 1.0, "x": 1.0}, 30.0, batches=(1,), warmup=1, runs=None,
                                              duration=2.0, block_seconds=0, settle_below_seconds=0)
    n = {len(c.samples[1]) for c in cases}
    assert len(n) == 1 and 990 <= n.pop() <= 1000  # 2 s of 2 ms rounds, after a 2 ms warm-up
    assert clock.t <= 2.01


def test_config_validation_names_the_problem():
    with pytest.raises(InputError, match="CHECKPOINT or --arch"):
        BenchConfig().validate()
    with pytest.raises(InputError, match="unknown anchors"):
        BenchConfig(arch="resnet20", anchors=("tensorflow",)).validate()
    with pytest.raises(InputError, match="max-seconds"):
        BenchConfig(arch="resnet20", max_seconds=1).validate()
    with pytest.raises(InputError, match="backend"):
        BenchConfig(arch="resnet20", backends=("onnxruntime", "tflite")).validate()


def test_machine_info_says_what_ran_where():
    info = machine_info()
    assert info["cpu_model"] and info["logical_cpus"] >= 1
    assert {"numpy", "torch", "onnxruntime"} <= set(info["versions"])
    assert isinstance(info["simd"], list)


@pytest.fixture(scope="module")
def short_bench(trained_resnet20_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(checkpoint=str(trained_resnet20_dir), batches=(1, 4), warmup=2, runs=15, max_seconds=60,
                         backends=("onnxruntime",), precisions=("fp32",), anchors=("eager", "openvino"),
                         parity_samples=32, min_runs=5)
    log = io.StringIO()
    return run_bench(config, out_dir=out, stream=log), out, log.getvalue()


def test_bench_runs_writes_and_compares(short_bench):
    result, out, log = short_bench
    assert result, result
    assert result.elapsed_s <= 60
    names = {c.name for c in result.cases}
    assert {REFERENCE, "onnxruntime fp32"} <= names
    ort = result.case("onnxruntime fp32")
    assert set(ort.stats) == {1, 4} and ort.stats[1].n >= 5
    assert ort.parity["passed"] and ort.parity["top1_agreement"] == 1.0
    assert "[bench" in log and "batch 1" in log  # progress lines
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["versions"]["onnxruntime"] and data["config"]["threads"] == 2
    assert data["speedup_vs_eager_p50"]["1"][REFERENCE] == pytest.approx(1.0)
    md = (out / "bench.md").read_text()
    assert "speedup vs eager" in md and "onnxruntime fp32" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p50" in str(result) and str(out / "bench.json") in str(result)


def test_bench_shows_openvino_anchors_with_their_parity(short_bench):
    pytest.importorskip("openvino")
    result, _, _ = short_bench
    default = result.case("openvino default")
    assert default.kind == "anchor" and default.precision in ("bf16", "fp32")
    assert default.precision.replace("fp", "f") in default.description  # says the precision it actually ran
    assert default.parity is not None and "top1_agreement" in default.parity
    assert result.case("openvino fp32").parity["passed"]


def test_the_bench_always_times_the_served_configuration(trained_resnet20_dir, tmp_path):
    """The served configuration (the engine choice's, with its settings) is a case even when the bench's own
    settings would not make it, is marked, comes right after the baseline and leads the summary; OpenVINO's own
    defaults on resdeploy's INT8 file are an anchor."""
    served = {"backend": "onnxruntime", "precision": "fp32", "settings": {"spinning": False}}
    config = BenchConfig(checkpoint=str(trained_resnet20_dir), batches=(1,), warmup=2, runs=10, max_seconds=60,
                         backends=("onnxruntime",), precisions=("fp32", "int8"), anchors=("eager", "openvino"),
                         parity_samples=32, min_runs=5, served=served)
    result = run_bench(config, out_dir=tmp_path, stream=io.StringIO())
    case = result.served()
    assert case is not None and case.name == "onnxruntime fp32 [spinning off]" and case.settings == {"spinning": False}
    assert "spinning off" in case.description  # what the live session reports, not what was asked
    assert [c.name for c in result.cases][:2] == [REFERENCE, case.name]
    assert result.case("onnxruntime fp32").settings == {"spinning": True}  # the runner's defaults, also timed
    assert result.summary()[0].startswith(f"batch 1: served {case.name}: p50 ")
    data = json.loads((tmp_path / "bench.json").read_text())
    row = next(c for c in data["cases"] if c["served"])
    assert row["name"] == case.name and "1" in row["fraction_of_int8_peak"]
    assert f"{case.name} (served)" in (tmp_path / "bench.md").read_text()
    if importlib.util.find_spec("openvino") is not None:
        own = result.case("openvino default int8")
        assert own.kind == "anchor" and own.settings == {"precision_hint": "default", "performance_hint": "default"}
        assert own.parity is not None
    with pytest.raises(InputError, match="served .* must name backend and precision"):
        BenchConfig(checkpoint="x", served={"backend": "onnxruntime"}).validate()
