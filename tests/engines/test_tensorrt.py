"""The TensorRT runner: refusals that happen before any TensorRT object exists (tested here), and real engines
under the ``gpu`` marker (skipped with a reason where TensorRT or a CUDA device is absent)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from resdeploy.errors import BackendUnavailable, InputError
from resdeploy import device as cuda_util
from resdeploy.engines import open_runner
from resdeploy.engines import tensorrt as tr
from resdeploy.device import TRT_DTYPE_TO_NUMPY, GpuInfo, Sidecar, sidecar_path, trt_dtype_to_numpy


def test_dtype_mapping():
    assert {k: trt_dtype_to_numpy(k) for k, v in TRT_DTYPE_TO_NUMPY.items() if v} == {
        "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
        "UINT8": "uint8", "DOUBLE": "float64"}
    for np_name in TRT_DTYPE_TO_NUMPY.values():
        if np_name:
            np.dtype(np_name)  # every target is a real numpy dtype
    assert trt_dtype_to_numpy(type("DataType", (), {"name": "HALF"})()) == "float16"  # enum members carry .name
    with pytest.raises(InputError, match="BF16 has no numpy equivalent"):
        trt_dtype_to_numpy("BF16")
    with pytest.raises(InputError, match="unknown"):
        trt_dtype_to_numpy("COMPLEX")


def _plan(tmp_path: Path, data: bytes = b"serialized engine", **kw) -> Path:
    plan = tmp_path / "m.plan"
    plan.write_bytes(data)
    side = dict(plan_sha256=hashlib.sha256(data).hexdigest(), tensorrt_version="10.9.0.34", gpu_name="NVIDIA H100",
                compute_capability="9.0", precision="fp32", profile={"input": {"min": [1, 3], "opt": [4, 3], "max": [8, 3]}},
                onnx_sha256="00" * 32, build_seconds=3.0)
    sidecar_path(plan).write_text(json.dumps(Sidecar(**{**side, **kw}).to_json()))
    return plan


@pytest.fixture
def no_tensorrt_allowed(monkeypatch):
    """Any attempt to reach TensorRT fails the test: proves a refusal came first."""
    monkeypatch.setattr(tr, "require_tensorrt", lambda **kw: pytest.fail("require_tensorrt reached"))


def test_missing_plan(tmp_path, no_tensorrt_allowed):
    with pytest.raises(InputError, match="does not exist.*resdeploy build"):
        open_runner(tmp_path / "none.plan", backend="tensorrt").activate()


def test_plan_without_sidecar_is_refused_before_tensorrt(tmp_path, no_tensorrt_allowed):
    plan = _plan(tmp_path)
    sidecar_path(plan).unlink()
    with pytest.raises(InputError, match="no sidecar.*cannot be trusted"):
        with open_runner(plan, backend="tensorrt"):
            pass


def test_tampered_plan_is_refused_before_tensorrt(tmp_path, no_tensorrt_allowed):
    plan = _plan(tmp_path)
    plan.write_bytes(b"serialized engine + injected code")
    r = open_runner(plan, backend="tensorrt")
    with pytest.raises(InputError, match="does not match its sidecar"):
        r.activate()
    assert not r.is_active


def test_bytes_are_refused():
    with pytest.raises(InputError, match="plan file"):
        open_runner(b"\x00plan", backend="tensorrt")


def test_version_and_capability_mismatch_refused_before_deserializing(tmp_path, monkeypatch):
    """A fake ``tensorrt`` that only has a version: touching anything else (Runtime, Logger) would fail the test."""
    class VersionOnly:
        __version__ = "10.12.0.36"

        def __getattr__(self, name):
            pytest.fail(f"TensorRT object {name} touched before the version check")

    monkeypatch.setattr(tr, "require_tensorrt", lambda **kw: VersionOnly())
    monkeypatch.setattr(tr, "gpu_info", lambda device=0: GpuInfo("NVIDIA H100", "9.0"))
    with pytest.raises(InputError, match=r"built by TensorRT 10\.9\.0\.34 but this is TensorRT 10\.12\.0\.36.*rebuild it from the ONNX"):
        open_runner(_plan(tmp_path), backend="tensorrt").activate()
    VersionOnly.__version__ = "10.9.0.34"
    monkeypatch.setattr(tr, "gpu_info", lambda device=0: GpuInfo("NVIDIA A100", "8.0"))
    with pytest.raises(InputError, match=r"compute capability 9\.0 .*has compute capability 8\.0.*not portable"):
        open_runner(_plan(tmp_path), backend="tensorrt").activate()


def test_valid_plan_without_tensorrt_names_what_is_missing(tmp_path):
    if cuda_util._find_spec("tensorrt") and cuda_util.cuda_device_status()[0]:
        pytest.skip("TensorRT and a CUDA device are present; the gpu tests run the plan")
    r = open_runner(_plan(tmp_path), backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="TensorRT backend is unavailable.*pip install 'resdeploy\\[gpu\\]'"):
        r.activate()
    assert not r.is_active


# -- real engines ---------------------------------------------------------------------------------------
def _gpu_skip_reason() -> str | None:
    if not cuda_util._find_spec("tensorrt"):
        return "TensorRT is not installed (pip install 'resdeploy[gpu]' on a machine with an NVIDIA GPU)"
    present, why = cuda_util.cuda_device_status()
    if not present:
        return f"no CUDA device: {why}"
    if not cuda_util._cudart_available():
        return "cuda-python is not installed"
    return None


@pytest.fixture(scope="module")
def conv_add_onnx(tmp_path_factory) -> Path:
    """A small conv + residual add net with a dynamic batch, exported by torch.onnx."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.proj = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.proj(x))

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("trt") / "block.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(Block().eval(), (torch.randn(2, 3, 16, 16),), str(out), input_names=["input"], output_names=["output"],
                      dynamic_shapes={"x": {0: batch}}, dynamo=True)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_real_engine_matches_onnxruntime(conv_add_onnx, tmp_path, cuda_graphs):
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    from resdeploy.engines.tensorrt_build import TrtBuildConfig, build_engine

    cache = tmp_path / "timing.cache"
    cfg = TrtBuildConfig(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256, timing_cache=str(cache))
    report = build_engine(conv_add_onnx, tmp_path / "block.plan", cfg)
    assert cache.is_file() and report.fusion is not None and len(report.fusion.adds) >= 1
    again = build_engine(conv_add_onnx, tmp_path / "block2.plan", cfg)
    assert again.timing_cache_status.startswith("loaded")
    rng = np.random.default_rng(0)
    with open_runner(conv_add_onnx, backend="onnxruntime") as ort, \
            open_runner(tmp_path / "block.plan", backend="tensorrt", cuda_graphs=cuda_graphs) as trt:
        assert (trt.min_batch, trt.max_batch) == (1, 8)
        assert [s.name for s in trt.inputs] == ["input"] and trt.inputs[0].shape == (None, 3, 16, 16)
        for batch in (1, 3, 3, 3, 8, 1):  # repeats exercise warm-up, capture and replay of the CUDA graphs
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            want, got = ort.infer({"input": x})["output"], trt.infer({"input": x})["output"]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # TF32 tactics may be picked
        with pytest.raises(InputError, match="batch 9"):
            trt.infer({"input": np.zeros((9, 3, 16, 16), np.float32)})
        with pytest.raises(InputError, match="dtype float64"):
            trt.infer({"input": np.zeros((1, 3, 16, 16))})
