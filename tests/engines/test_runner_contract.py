"""The runner contract exposes what it loaded: the artifact's metadata and the providers actually in use.

The server reads labels and placement from here (not from ONNX Runtime session internals), and every error a runner
raises is one of resdeploy's, naming the tensor, what came and what was expected.
"""

from __future__ import annotations

import numpy as np
import pytest

from resdeploy.errors import InputError, ResdeployError
from resdeploy.engines import open_runner, resolve_auto


def test_onnxruntime_runner_exposes_metadata_and_providers(resnet20_onnx):
    with open_runner(resnet20_onnx, backend="onnxruntime", threads=1) as r:
        assert r.providers == ("CPUExecutionProvider",) and not r.on_gpu
        meta = r.artifact_metadata
        assert meta.architecture == "resnet20" and meta.input_spec.shape == (1, 28, 28) and meta.precision == "fp32"
        assert r.labels == tuple(str(i) for i in range(10))
        assert r.metadata()["artifact"]["labels"] == list(r.labels) and r.metadata()["providers"] == ["CPUExecutionProvider"]
        name = r.inputs[0].name  # names come from the artifact, not from a convention
        out = r.infer({name: np.zeros((2, 1, 28, 28), np.float32)})
        assert list(out) == [r.outputs[0].name] and out[r.outputs[0].name].shape == (2, 10)


def test_bytes_model_carries_its_metadata_too(resnet20_onnx):
    with open_runner(resnet20_onnx.read_bytes(), backend="onnxruntime", threads=1) as r:
        assert r.labels == tuple(str(i) for i in range(10))


def test_torch_runner_exposes_the_module_card(trained_resnet20):
    model, _ = trained_resnet20
    with open_runner(model, backend="torch") as r:
        assert r.providers == ("torch cpu",) and r.labels == tuple(model.labels)
        assert r.artifact_metadata.input_spec == model.input_spec


def test_placement_is_decided_by_the_runners(resnet20_onnx, tmp_path):
    backend, opts, why = resolve_auto(str(resnet20_onnx), "cpu")
    assert (backend, opts) == ("onnxruntime", {"provider": "cpu"}) and "CPU was asked for" in why
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    assert resolve_auto(str(plan))[0] == "tensorrt"
    with pytest.raises(InputError, match="runs on a GPU only"):
        resolve_auto(str(plan), "cpu")
    with pytest.raises(InputError, match="placement 'tpu' unknown"):
        resolve_auto(str(resnet20_onnx), "tpu")


def test_errors_are_resdeploys_own(resnet20_onnx, trained_resnet20):
    with pytest.raises(InputError, match="valid options"):
        open_runner(resnet20_onnx, backend="onnxruntime", no_such_option=1)
    with pytest.raises(InputError, match="needs input_shape"):
        open_runner(object(), backend="torch")
    with open_runner(resnet20_onnx, backend="onnxruntime", threads=1) as r:
        with pytest.raises(ResdeployError, match="input 'input' has shape \\[2, 3, 28, 28\\]; expected input"):
            r.infer({"input": np.zeros((2, 3, 28, 28), np.float32)})
