"""Timing ratios measured in one run (never absolute times). Opt-in: `pytest -m latency` on a quiet machine."""

from __future__ import annotations

import io

import pytest

from resdeploy.pipeline.bench import REFERENCE, BenchConfig, run_bench

pytestmark = pytest.mark.latency


@pytest.fixture(scope="module")
def resnet18_bench(tmp_path_factory):
    config = BenchConfig(arch="resnet18", batches=(1, 8), warmup=3, runs=20, max_seconds=150, threads=2,
                         backends=("onnxruntime",), precisions=("fp32",), anchors=("eager",), parity_samples=16,
                         min_runs=10)
    return run_bench(config, out_dir=tmp_path_factory.mktemp("latency"), stream=io.StringIO())


def test_onnxruntime_fp32_beats_pytorch_eager_at_batch_1_on_resnet18(resnet18_bench):
    eager = resnet18_bench.case(REFERENCE).stats[1]
    ort = resnet18_bench.case("onnxruntime fp32").stats[1]
    assert ort.p50_ms < eager.p50_ms, f"ORT {ort} vs eager {eager}"


def test_batch_8_throughput_exceeds_batch_1(resnet18_bench):
    ort = resnet18_bench.case("onnxruntime fp32")
    assert ort.stats[8].throughput > ort.stats[1].throughput, f"batch 1: {ort.stats[1]}; batch 8: {ort.stats[8]}"
