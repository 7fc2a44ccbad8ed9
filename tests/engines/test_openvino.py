"""The OpenVINO runner (optional extra): f32 by default, precision read back, dynamic batch, the runner contract."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("openvino")

from resdeploy.errors import InputError  # noqa: E402
from resdeploy.engines import RunnerError, open_runner  # noqa: E402


@pytest.fixture(scope="module")
def onnx_fp32(trained_resnet20, tmp_path_factory):
    import torch

    model, _ = trained_resnet20
    path = tmp_path_factory.mktemp("ov") / "resnet20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def digits(mnist, trained_resnet20):
    from resdeploy.models import normalize

    _, info = trained_resnet20
    return normalize(mnist.test.images[:8], info.input_spec.mean, info.input_spec.std)


def torch_logits(model, x):
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_f32_by_default_matches_pytorch_at_any_batch(onnx_fp32, trained_resnet20, digits):
    model, _ = trained_resnet20
    with open_runner(onnx_fp32, backend="openvino", threads=2) as r:
        assert "inference precision f32" in r.description and r.inference_precision == "f32"
        assert [str(s) for s in r.inputs] == ["input: float32[?,1,28,28]"]
        assert r.outputs[0].name == "logits"
        for n in (1, 5, 8):
            y = r.infer({"input": digits[:n]})["logits"]
            assert y.shape == (n, 10)
            np.testing.assert_allclose(y, torch_logits(model, digits[:n]), atol=1e-4)


def test_default_hint_reports_the_precision_it_picked(onnx_fp32):
    with open_runner(onnx_fp32, backend="openvino", precision_hint="default") as r:
        assert r.inference_precision in ("bf16", "f16", "f32")
        assert f"inference precision {r.inference_precision} (OpenVINO default)" in r.description
        assert sum(r.kernel_precisions().values()) > 0


def test_explicit_bf16_and_threads_are_passed_to_compile(onnx_fp32):
    from resdeploy.engines.openvino import OpenVinoRunner

    r = OpenVinoRunner(onnx_fp32, precision_hint="bf16", threads=1)
    assert r.compile_config() == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}
    assert "INFERENCE_PRECISION_HINT" not in OpenVinoRunner(onnx_fp32, precision_hint="default").compile_config()


def test_int8_model_runs_int8_kernels(onnx_fp32, mnist, trained_resnet20, tmp_path, digits):
    from resdeploy.export.precision import quantize_int8
    from resdeploy.models import normalize

    _, info = trained_resnet20
    calib = normalize(mnist.val.images[:32], info.input_spec.mean, info.input_spec.std)
    q = tmp_path / "int8.onnx"
    quantize_int8(onnx_fp32, q, calib, flavour="u8s8")
    with open_runner(q, backend="openvino") as r:
        kinds = r.kernel_precisions()
        assert kinds.get("u8", 0) + kinds.get("i8", 0) > 0, kinds
        assert r.infer({"input": digits})["logits"].shape == (8, 10)


def test_fp16_model_keeps_its_io_names(onnx_fp32, tmp_path, digits):
    from resdeploy.export.precision import fp16_variant

    path = tmp_path / "fp16.onnx"
    fp16_variant(onnx_fp32, path)
    with open_runner(path, backend="openvino") as r:
        assert [s.name for s in r.inputs] == ["input"] and [s.name for s in r.outputs] == ["logits"]
        assert r.infer({"input": digits})["logits"].dtype == np.float32


def test_contract_errors_name_the_problem(onnx_fp32, tmp_path, digits):
    with open_runner(onnx_fp32, backend="openvino") as r:
        with pytest.raises(RunnerError, match="dtype float64"):
            r.infer({"input": digits.astype(np.float64)})
        with pytest.raises(RunnerError, match="missing"):
            r.infer({"x": digits})
    with pytest.raises(InputError, match="does not exist"):
        open_runner(tmp_path / "nope.onnx", backend="openvino").activate()
    with pytest.raises(InputError, match="precision_hint"):
        open_runner(onnx_fp32, backend="openvino", precision_hint="int4")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        open_runner(bad, backend="openvino").activate()
