"""The TensorRT build path without TensorRT: profile shapes, sidecar, plan refusal, timing-cache reuse, and the
missing-TensorRT message. The build orchestration tests drive ``_build`` with a **fake ``tensorrt`` module**
(``FakeTrt`` below) that records calls: they verify the order and arguments of our calls (strongly typed
network flag, parser errors with node names, workspace, optimisation level, detailed verbosity, profile
shapes, timing cache loaded from disk -> set on the config -> merged and saved after the build, plan and
sidecar written atomically). They do NOT verify that real TensorRT accepts those calls or builds a working
engine: the ``gpu``-marked test in tests/engines/test_tensorrt.py does that where TensorRT and a GPU exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from resdeploy.errors import BackendUnavailable, InputError
from resdeploy.engines import tensorrt_build as tb
from resdeploy import device as cuda_util
from resdeploy.artifact import ArtifactMetadata
from resdeploy.device import GpuInfo, Sidecar, sidecar_path, verify_plan

DUMP = Path(__file__).resolve().parent.parent / "data" / "tensorrt-engine-layers" / "resnet18-a100-fp16.graph.json"


def tiny_onnx(path: Path, batch="N", spatial=(3, 8, 8), precision: str | None = None) -> Path:
    node = helper.make_node("Relu", ["input"], ["output"], name="Relu_0")
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *spatial])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, *spatial])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if precision:
        helper.set_model_props(model, {"precision": precision})
    onnx.save(model, path)
    return path


# -- pure logic ------------------------------------------------------------------------------------------
def test_profile_shapes_span_the_batch_axis():
    cfg = tb.TrtBuildConfig(min_batch=2, opt_batch=4, max_batch=16)
    assert tb.profile_shapes(("N", 3, 32, 32), cfg) == ((2, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    assert tb.profile_shapes((None, 10), cfg) == ((2, 10), (4, 10), (16, 10))
    fixed = tb.TrtBuildConfig(min_batch=1, opt_batch=1, max_batch=1)
    assert tb.profile_shapes((1, 3, 8, 8), fixed) == ((1, 3, 8, 8),) * 3


@pytest.mark.parametrize("shape, cfg, fragment", [
    ((1, 3, 8, 8), tb.TrtBuildConfig(), "fixed batch of 1"),
    (("N", 3, "H", 8), tb.TrtBuildConfig(), "dynamic axis 2"),
    ((), tb.TrtBuildConfig(), "scalar"),
    (("N", 3), tb.TrtBuildConfig(min_batch=8, opt_batch=4), "min <= opt <= max"),
    (("N", 3), tb.TrtBuildConfig(optimization_level=7), "0..5"),
    (("N", 3), tb.TrtBuildConfig(workspace_mib=0), "workspace"),
])
def test_profile_shapes_refusals(shape, cfg, fragment):
    with pytest.raises(InputError, match=fragment):
        tb.profile_shapes(shape, cfg)


def test_onnx_inputs_and_precision_label(tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx", precision="fp16")
    inputs, meta = tb.read_onnx_inputs(path)
    assert [(i.name, i.shape) for i in inputs] == [("input", (None, 3, 8, 8))]
    assert tb.precision_of(meta, tb.TrtBuildConfig()) == "fp16"
    assert tb.precision_of(ArtifactMetadata(), tb.TrtBuildConfig()) == "fp32"
    assert tb.precision_of(meta, tb.TrtBuildConfig(precision="int8")) == "int8"
    with pytest.raises(InputError, match="precision 'fp64'"):
        tb.precision_of(ArtifactMetadata(precision="fp64"), tb.TrtBuildConfig())
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="not a readable ONNX"):
        tb.read_onnx_inputs(tmp_path / "bad.onnx")


def _sidecar(plan: bytes, **kw) -> Sidecar:
    base = dict(plan_sha256=hashlib.sha256(plan).hexdigest(), tensorrt_version="10.3.0.26", gpu_name="NVIDIA A100",
                compute_capability="8.0", precision="fp16", profile={"input": {"min": [1, 3], "opt": [4, 3], "max": [8, 3]}},
                onnx_sha256="ab" * 32, build_seconds=1.5)
    return Sidecar(**{**base, **kw})


def test_sidecar_round_trip_and_refusals(tmp_path):
    s = _sidecar(b"plan")
    assert Sidecar.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert "8.0" in str(s) and "min [1, 3]" in str(s)
    with pytest.raises(InputError, match="lacks plan_sha256"):
        Sidecar.from_json({k: v for k, v in s.to_json().items() if k != "plan_sha256"})
    with pytest.raises(InputError, match="newer"):
        Sidecar.from_json({**s.to_json(), "format": 99})
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(InputError, match="unreadable"):
        Sidecar.load(tmp_path / "x.json")


def test_verify_plan_accepts_the_matching_plan_and_refuses_the_rest(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")
    with pytest.raises(InputError, match="no sidecar"):
        verify_plan(plan)
    s = _sidecar(b"engine bytes")
    (sidecar_path(plan)).write_text(json.dumps(s.to_json()))
    assert verify_plan(plan) == s
    assert verify_plan(plan, None, "10.3.0.30", "8.0") == s  # the build number does not matter
    with pytest.raises(InputError, match=r"TensorRT 10\.3\.0\.26 but this is TensorRT 10\.4\.0.*rebuild it from the ONNX"):
        verify_plan(plan, None, "10.4.0", "8.0")
    with pytest.raises(InputError, match=r"compute capability 8\.0 .*compute capability 9\.0.*rebuild it from the ONNX"):
        verify_plan(plan, None, "10.3.0", "9.0")
    plan.write_bytes(b"engine bytez")
    with pytest.raises(InputError, match="does not match its sidecar.*resdeploy build --backend tensorrt"):
        verify_plan(plan)


def test_timing_cache_file_handling(tmp_path):
    assert tb.read_timing_cache(None) == b"" and tb.read_timing_cache(tmp_path / "new.cache") == b""
    (tmp_path / "c").write_bytes(b"abc")
    assert tb.read_timing_cache(tmp_path / "c") == b"abc"
    with pytest.raises(InputError, match="not a file"):
        tb.read_timing_cache(tmp_path)


# -- without TensorRT -----------------------------------------------------------------------------------
def test_require_tensorrt_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(cuda_util, "_find_spec", lambda name: False)
    monkeypatch.setattr(cuda_util, "cuda_device_status", lambda: (False, "no NVIDIA driver (libcuda.so.1 not found)"))
    with pytest.raises(BackendUnavailable) as e:
        cuda_util.require_tensorrt(cuda_python=True)
    msg = str(e.value)
    assert "`tensorrt` Python package is not installed" in msg and "libcuda.so.1" in msg and "cuda-python" in msg
    assert "pip install 'resdeploy[gpu]'" in msg
    # Package present, no device: only the device is named, and tensorrt is never imported.
    monkeypatch.setattr(cuda_util, "_find_spec", lambda name: True)
    monkeypatch.setattr(cuda_util.importlib, "import_module", lambda name: pytest.fail(f"imported {name} without a device"))
    with pytest.raises(BackendUnavailable) as e:
        cuda_util.require_tensorrt()
    assert "not installed" not in str(e.value) and "libcuda.so.1" in str(e.value)


def test_build_without_tensorrt_exits_cleanly(tmp_path):
    if cuda_util._find_spec("tensorrt") and cuda_util.cuda_device_status()[0]:
        pytest.skip("TensorRT and a CUDA device are present here; the gpu tests cover the build")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailable, match="TensorRT backend is unavailable.*pip install 'resdeploy\\[gpu\\]'"):
        tb.build_engine(onnx_path, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists() and not sidecar_path(tmp_path / "m.plan").exists()


# -- build orchestration against a fake tensorrt -----------------------------------------------------------
class FakeTrt:
    """Stands in for the ``tensorrt`` module: records calls, returns canned objects. Not TensorRT."""

    __version__ = "10.9.0.34"

    def __init__(self, parse_ok=True, errors=(), build_ok=True, accept_cache=True):
        self.calls: list[tuple] = []
        self.parse_ok, self.errors, self.build_ok, self.accept_cache = parse_ok, list(errors), build_ok, accept_cache
        fake = self
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1, EXPLICIT_BATCH=0)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.ProfilingVerbosity = SimpleNamespace(DETAILED="DETAILED", LAYER_NAMES_ONLY="LAYER_NAMES_ONLY")
        self.LayerInformationFormat = SimpleNamespace(JSON="JSON")

        class Logger:
            WARNING, INFO = "WARNING", "INFO"

            def __init__(self, level):
                fake.calls.append(("Logger", level))

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def combine(self, other, ignore_mismatch):
                fake.calls.append(("combine", other.data, ignore_mismatch))
                self.data += b"+" + other.data
                return True

            def serialize(self):
                return self.data + b"|timed"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def __setattr__(self, key, value):
                fake.calls.append(("config." + key, value))
                object.__setattr__(self, key, value)

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                ok = fake.accept_cache or cache.data == b""
                if ok:
                    object.__setattr__(self, "_cache", cache)
                return ok

            def get_timing_cache(self):
                return self._cache

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", profile.shapes))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", network))
                return memoryview(b"PLAN-BYTES") if fake.build_ok else None

        class ParserError:
            def __init__(self, node, name, op, desc):
                self._v = (node, name, op, desc)

            def node(self):
                return self._v[0]

            def node_name(self):
                return self._v[1]

            def node_operator(self):
                return self._v[2]

            def code(self):
                return "ErrorCode.UNSUPPORTED_NODE"

            def desc(self):
                return self._v[3]

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = len(fake.errors)

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                return fake.parse_ok

            def get_error(self, i):
                return ParserError(*fake.errors[i])

        class Inspector:
            def get_engine_information(self, fmt):
                fake.calls.append(("get_engine_information", fmt))
                return DUMP.read_text()

        class Engine:
            def create_engine_inspector(self):
                return Inspector()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.calls.append(("deserialize_cuda_engine", bytes(data)))
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime

    def names(self):
        return [c[0] for c in self.calls]


GPU = GpuInfo("NVIDIA Fake GPU", "8.6")


def test_build_orchestration_and_timing_cache_reuse(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx", precision="fp16")
    cache = tmp_path / "cache" / "trt.cache"
    cfg = tb.TrtBuildConfig(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256, optimization_level=5,
                            timing_cache=str(cache))
    fake = FakeTrt()
    report = tb._build(fake, onnx_path, tmp_path / "out" / "m.plan", cfg, GPU)

    assert ("create_network", 1 << 1) in fake.calls  # 1 << STRONGLY_TYPED
    assert ("set_memory_pool_limit", "WORKSPACE", 256 << 20) in fake.calls
    assert ("config.builder_optimization_level", 5) in fake.calls
    assert ("config.profiling_verbosity", "DETAILED") in fake.calls
    assert ("add_optimization_profile", {"input": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}) in fake.calls
    names = fake.names()
    assert names.index("parse_from_file") < names.index("set_timing_cache") < names.index("build_serialized_network")
    assert ("create_timing_cache", b"") in fake.calls and report.timing_cache_status == "new"
    # the cache was saved after the build, atomically, and the plan + sidecar agree
    assert cache.read_bytes() == b"|timed"
    plan = tmp_path / "out" / "m.plan"
    assert plan.read_bytes() == b"PLAN-BYTES"
    side = verify_plan(plan, None, fake.__version__, GPU.compute_capability)
    assert (side.precision, side.gpu_name, side.compute_capability, side.optimization_level) == ("fp16", GPU.name, "8.6", 5)
    assert side.profile == {"input": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}
    assert side.onnx_sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    # layer information from the inspector -> fusion report
    assert ("get_engine_information", "JSON") in fake.calls and Path(report.layers_path).is_file()
    assert report.fusion is not None and report.fusion.fused_count == 8
    assert "precision fp16" in str(report) and "8/8 residual Adds fused" in str(report)
    assert not list(plan.parent.glob(".*.tmp"))

    # second build: the cache on disk is loaded, given to the config, merged and saved again
    fake2 = FakeTrt()
    report2 = tb._build(fake2, onnx_path, tmp_path / "out" / "m2.plan", cfg, GPU)
    assert ("create_timing_cache", b"|timed") in fake2.calls
    assert ("set_timing_cache", b"|timed", False) in fake2.calls
    assert report2.timing_cache_status == f"loaded {len(b'|timed')} bytes"
    assert ("combine", b"|timed", False) in fake2.calls
    assert cache.read_bytes().startswith(b"|timed")


def test_rejected_timing_cache_starts_empty(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"from-another-gpu")
    fake = FakeTrt(accept_cache=False)
    report = tb._build(fake, onnx_path, tmp_path / "m.plan", tb.TrtBuildConfig(timing_cache=str(cache), layer_info=False), GPU)
    assert report.timing_cache_status.startswith("rejected") and report.notes
    assert ("set_timing_cache", b"", False) in fake.calls


def test_parser_errors_are_reported_with_node_names(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    fake = FakeTrt(parse_ok=False, errors=[(3, "/layer1/layer1.0/Add", "Add", "broadcast mismatch"),
                                         (7, "/fc/Gemm", "Gemm", "unsupported transB")])
    with pytest.raises(InputError) as e:
        tb._build(fake, onnx_path, tmp_path / "m.plan", tb.TrtBuildConfig(), GPU)
    msg = str(e.value)
    assert "2 error(s)" in msg and "/layer1/layer1.0/Add (Add, #3)" in msg and "/fc/Gemm (Gemm, #7)" in msg
    assert "UNSUPPORTED_NODE" in msg and "build_serialized_network" not in fake.names()
    assert not (tmp_path / "m.plan").exists()


def test_failed_build_writes_nothing(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="could not build an engine"):
        tb._build(FakeTrt(build_ok=False), onnx_path, tmp_path / "m.plan", tb.TrtBuildConfig(), GPU)
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_fixed_batch_model_needs_a_matching_profile(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx", batch=1)
    with pytest.raises(InputError, match="fixed batch of 1"):
        tb._build(FakeTrt(), onnx_path, tmp_path / "m.plan", tb.TrtBuildConfig(), GPU)
    report = tb._build(FakeTrt(), onnx_path, tmp_path / "m.plan", tb.TrtBuildConfig(1, 1, 1, layer_info=False), GPU)
    assert report.sidecar.profile["input"]["max"] == [1, 3, 8, 8]
