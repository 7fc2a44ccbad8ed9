"""Parity metrics and gates on known logits, then the harness on the trained resnet20 (real MNIST test digits)."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

from resdeploy.errors import CheckFailed, InputError
from resdeploy.pipeline.gates import ParityGates, compare
from resdeploy.pipeline.parity import ParityConfig, run_parity
from resdeploy.pipeline.workbench import Reference, load_parity_data, prepare_variants


def test_compare_identical_logits():
    ref = np.array([[1.0, 3.0, -2.0], [0.5, -1.0, 4.0]], np.float32)
    m = compare(ref, ref.copy(), np.array([1, 2]))
    assert (m.max_abs, m.mean_abs, m.max_rel) == (0.0, 0.0, 0.0)
    assert m.cosine_min == pytest.approx(1.0) and m.top1_agreement == 1.0
    assert m.accuracy == 1.0 and m.accuracy_delta == 0.0 and m.reference_classes == 2


def test_compare_known_differences():
    ref = np.array([[1.0, 3.0, -2.0], [0.5, -1.0, 4.0]])
    out = ref + np.array([[0.0, 0.0, 0.3], [4.0, 0.0, 0.0]])  # image 2: class 0 now wins (4.5 > 4.0)
    m = compare(ref, out, np.array([1, 2]))
    assert m.max_abs == pytest.approx(4.0)
    assert m.mean_abs == pytest.approx(4.3 / 6)
    assert m.max_rel == pytest.approx(1.0)  # image 2: 4.0 / max|ref| 4.0
    assert m.top1_agreement == 0.5
    assert m.accuracy == 0.5 and m.reference_accuracy == 1.0 and m.accuracy_delta == pytest.approx(-50.0)
    cos2 = float(ref[1] @ out[1] / np.linalg.norm(ref[1]) / np.linalg.norm(out[1]))
    assert m.cosine_min == pytest.approx(cos2)


def test_centered_agreement_sees_through_a_shared_class_offset():
    """A random-weight net: one class wins on every image through a shared offset; the image-dependent part differs."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((40, 5))
    offset = np.array([50.0, 0, 0, 0, 0])
    ref = offset + signal
    out = offset + signal[::-1]  # same offset, image-dependent part scrambled
    m = compare(ref, out)
    assert m.top1_agreement == 1.0 and m.reference_classes == 1 and m.degenerate
    assert m.centered_top1_agreement < 0.5
    same = compare(ref, ref + 1e-6)
    assert same.centered_top1_agreement == 1.0
    strict = ParityGates(random_weights_metric="centered_top1_agreement")
    assert ParityGates().check("openvino", "int8", m, False)[0].passed  # the plain gate is fooled...
    assert not strict.check("openvino", "int8", m, False)[0].passed  # ...the centered one is not
    assert not compare(np.eye(12), np.eye(12)).degenerate


def test_compare_refuses_mismatches_and_nan():
    with pytest.raises(InputError, match="shape"):
        compare(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(CheckFailed, match="NaN"):
        compare(np.zeros((2, 3)), np.array([[0, np.nan, 0], [0, 0, 0]]))


def test_gates_by_precision_name_backend_metric_value_and_limit():
    gates = ParityGates()
    ref = np.eye(4) * 10
    ok = compare(ref, ref + 1e-6)
    assert all(gates.check("onnxruntime", "fp32", ok, True))
    bad = compare(ref, ref + np.array([[0.0, 0.0, 0.0, 0.5]] * 4))
    fails = [g for g in gates.check("openvino", "fp32", bad, True) if not g]
    assert len(fails) == 1
    assert str(fails[0]) == "FAILED: openvino fp32: max_abs_error 0.5 (limit <= 0.0001)"
    flipped = compare(ref, ref[::-1].copy(), np.arange(4))  # every top-1 changes
    assert not any(gates.check("onnxruntime", "fp16", flipped, True))
    drop = [g for g in gates.check("onnxruntime", "int8", flipped, True)]
    assert drop[0].metric == "accuracy_drop_points" and drop[0].value == pytest.approx(100.0) and not drop[0]
    # random weights: INT8 is gated on agreement, accuracy means nothing
    assert gates.check("onnxruntime", "int8", flipped, False)[0].metric == "top1_agreement"
    with pytest.raises(InputError, match="precision"):
        gates.check("onnxruntime", "int4", ok, True)
    # scale-free FP32 gate: 0.5 on logits of 10 is 5% relative
    rel = ParityGates(fp32_max_rel=1e-2).check("openvino", "fp32", bad, True)
    assert rel[0].metric == "max_rel_error" and rel[0].value == pytest.approx(0.05) and not rel[0]


@pytest.fixture(scope="module")
def variants(trained_resnet20, tmp_path_factory):
    model, info = trained_resnet20
    ref = Reference(model, "resnet20", True, "mnist")
    data = load_parity_data(ref, limit=16, calibration_size=64)
    work = tmp_path_factory.mktemp("variants")
    return prepare_variants(ref, work, ("fp32", "fp16", "int8"), data.calibration, sample=data.images)


def test_parity_gates_pass_for_fp32_fp16_int8_on_onnxruntime(trained_resnet20_dir, variants):
    report = run_parity(trained_resnet20_dir, variants, backends=("onnxruntime",), config=ParityConfig(threads=2))
    assert report, report
    assert [(r.backend, r.precision) for r in report.rows] == [("onnxruntime", p) for p in ("fp32", "fp16", "int8")]
    fp32 = report.rows[0].metrics
    assert fp32.n == 1000, "the whole test split by default"
    assert fp32.max_abs <= 1e-4 and fp32.top1_agreement == 1.0
    assert report.reference_accuracy == pytest.approx(0.983, abs=0.01)
    int8 = report.rows[2].metrics
    assert int8.accuracy_delta is not None and int8.accuracy_delta >= -1.0
    text = str(report)
    assert "mnist test split, 1000 real images" in text and text.endswith("PASSED")
    assert "c-top-1" in text and "note:" not in text  # a trained model predicts every class


def test_parity_reports_unavailable_backends_as_skipped(trained_resnet20_dir, variants):
    report = run_parity(trained_resnet20_dir, {"fp32": variants["fp32"]}, backends=("onnxruntime", "tensorrt"),
                        config=ParityConfig(precisions=("fp32",), limit=64))
    trt = [r for r in report.rows if r.backend == "tensorrt"][0]
    assert trt.skipped and trt.metrics is None
    assert report  # skipped ones do not fail the gate; the ORT row ran and passed
    with pytest.raises(InputError, match="backend"):
        run_parity(trained_resnet20_dir, variants, backends=("tflite",))


def test_a_tensorrt_or_cuda_failure_is_a_skipped_row_not_an_abort(trained_resnet20_dir, variants, monkeypatch):
    """On a GPU machine a plan can fail to build or a CUDA call can fail: parity reports that backend as skipped with
    the reason and still judges the others (here the device is simulated: there is no GPU in CI)."""
    from resdeploy.pipeline import parity
    from resdeploy.engines.tensorrt import CudaError

    monkeypatch.setattr(parity, "backend_available", lambda b: None)

    def engine_for(backend, precision, *args, **kwargs):
        if backend == "tensorrt":
            raise CudaError("cudaMalloc failed: out of memory")
        return parity.Path(variants[precision])

    monkeypatch.setattr(parity, "engine_for", engine_for)
    report = run_parity(trained_resnet20_dir, {"fp32": variants["fp32"]}, backends=("onnxruntime", "tensorrt"),
                        config=ParityConfig(precisions=("fp32",), limit=32))
    trt = next(r for r in report.rows if r.backend == "tensorrt")
    assert trt.metrics is None and "CudaError: cudaMalloc failed" in trt.skipped, trt
    assert report, report  # the ONNX Runtime row ran and passed


@pytest.fixture(scope="module")
def perturbed_onnx(trained_resnet20, tmp_path_factory):
    """The trained model with one conv weight (layer2.0.conv1) scaled by 1.5, exported to ONNX."""
    import torch

    model, _ = trained_resnet20
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.layer2[0].conv1.weight.mul_(1.5)
    path = tmp_path_factory.mktemp("perturbed") / "perturbed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bad, torch.zeros(1, *bad.input_spec.shape), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def test_perturbed_model_fails_the_fp32_gate_and_is_localised(trained_resnet20_dir, perturbed_onnx):
    report = run_parity(trained_resnet20_dir, {"fp32": perturbed_onnx}, backends=("onnxruntime",),
                        config=ParityConfig(precisions=("fp32",), limit=200))
    assert not report
    fails = report.failures()
    assert fails and fails[0].backend == "onnxruntime" and fails[0].metric == "max_abs_error"
    assert fails[0].value > 1e-2 and fails[0].limit == 1e-4
    assert str(fails[0]).startswith("FAILED: onnxruntime fp32: max_abs_error")
    div = report.rows[0].divergence
    assert div and div.get("first_divergent", "").startswith("layer2.0"), div
    assert "first diverging block layer2.0" in str(report)
    with pytest.raises(CheckFailed, match="onnxruntime fp32: max_abs_error"):
        report.require_pass()


def test_parity_cli_exits_1_with_one_line_and_writes_json(trained_resnet20_dir, perturbed_onnx, tmp_path, capsys):
    from resdeploy.pipeline.cli import main

    out = tmp_path / "parity.json"
    code = main(["parity", str(trained_resnet20_dir), "--fp32", str(perturbed_onnx), "--precisions", "fp32",
                 "--backends", "onnxruntime", "--limit", "100", "--json", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("resdeploy parity: gate failed")]
    assert line and "onnxruntime fp32: max_abs_error" in line[0] and "limit <= 0.0001" in line[0]
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["failures"] and data["variants"][0]["metrics"]["max_abs"] > 1e-2


def test_parity_cli_passes_and_needs_a_model(trained_resnet20_dir, variants, capsys):
    from resdeploy.pipeline.cli import main

    assert main(["parity", str(trained_resnet20_dir), "--fp32", str(variants["fp32"]), "--precisions", "fp32",
                 "--backends", "onnxruntime", "--limit", "100"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["parity"]) == 2


def test_random_weight_reference_gets_batchnorm_statistics_from_real_images():
    """Default BN statistics let a deep random net's logits explode; measured ones keep them at a sane scale."""
    import torch

    from resdeploy.models import create_model
    from resdeploy.pipeline.workbench import recalibrate_batchnorm

    torch.manual_seed(0)
    raw = create_model("resnet56").eval()
    torch.manual_seed(0)
    fixed = create_model("resnet56")
    assert recalibrate_batchnorm(fixed, images=32) == 32
    assert not fixed.training and fixed.bn1.momentum == 0.1
    assert not torch.equal(fixed.bn1.running_var, torch.ones_like(fixed.bn1.running_var))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert fixed(x).abs().max() < 0.01 * raw(x).abs().max()


def test_parity_cli_writes_a_polygraphy_kit_that_agrees_with_the_gate(trained_resnet20_dir, perturbed_onnx, variants,
                                                                      tmp_path):
    """`parity --polygraphy DIR`: the kit of the files parity judged. Real Polygraphy (through ONNX Runtime) passes
    the good FP32 file and fails the perturbed one, and its first failing probe is parity's localised block."""
    import subprocess
    import sys
    from pathlib import Path

    from resdeploy.pipeline.cli import main

    exe = Path(sys.executable).with_name("polygraphy")
    for name, model, code in (("good", variants["fp32"], 0), ("bad", perturbed_onnx, 1)):
        kit = tmp_path / name
        args = ["parity", str(trained_resnet20_dir), "--fp32", str(model), "--precisions", "fp32", "--backends",
                "onnxruntime", "--limit", "64", "--polygraphy", str(kit)]
        assert main(args) == code
        cmds = json.loads((kit / "kit.json").read_text())["commands"]
        outputs = next(c["onnxrt_argv"] for c in cmds if c["check"] == "outputs")
        probes = next(c["onnxrt_argv"] for c in cmds if c["check"] == "probes")
        assert all(c["line"] in (kit / "commands.txt").read_text() for c in cmds)
        onnxrt = lambda argv: [str(exe), *argv[1:]]  # noqa: E731 - the venv's polygraphy
        r = subprocess.run(onnxrt(outputs), cwd=kit, capture_output=True, text=True, timeout=300)
        assert (r.returncode == 0) == (code == 0), r.stdout[-2000:] + r.stderr[-2000:]
        if code:
            r = subprocess.run(onnxrt(probes), cwd=kit, capture_output=True, text=True, timeout=300)
            failed = [ln for ln in (r.stdout + r.stderr).splitlines() if "FAILED" in ln and "| Output:" in ln]
            assert r.returncode != 0 and failed and "layer2.0" in failed[0], r.stdout[-3000:]
