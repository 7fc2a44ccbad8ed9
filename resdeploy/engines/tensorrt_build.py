"""Build a TensorRT plan from an ONNX model: ``resdeploy build MODEL.onnx --backend tensorrt --out model.plan``.

The build: ONNX parser (every parser error reported with its node name and operator) -> a **strongly
typed** network (precision comes from the ONNX precision variant: an FP16 export, or Q/DQ nodes for INT8;
TensorRT 11 removed the FP16/INT8 builder flags and calibrators, TensorRT 10 has both and strongly typed
networks) -> one optimisation profile over the batch axis (min/opt/max) -> workspace limit, builder
optimisation level, detailed profiling verbosity, a persistent timing cache (loaded from disk, merged with
whatever another build saved meanwhile, saved back atomically) -> the plan, written atomically, then its
sidecar ``<plan>.json`` (TensorRT version, GPU, compute capability, precision, profile shapes, ONNX and plan
sha256, build time), then the engine inspector's layer information ``<plan>.layers.json`` and the fusion
report made from it.

Pure logic (``TrtBuildConfig``, ``profile_shapes``, ``Sidecar``, ``verify_plan``, timing-cache file handling)
is testable without TensorRT; ``build_engine`` calls ``require_tensorrt()`` first, which refuses with a
message naming what is missing when there is no ``tensorrt`` package, no CUDA device or no driver.

API targeted (TensorRT 10.x and 11.x Python API, docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api):
``trt.Builder.create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))``, ``trt.OnnxParser
.parse_from_file / num_errors / get_error(i)`` (``IParserError.code() desc() node() node_name()
node_operator()``, the latter two since TensorRT 10), ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType
.WORKSPACE, bytes)``, ``.builder_optimization_level``, ``.profiling_verbosity = ProfilingVerbosity.DETAILED``,
``.create_timing_cache(bytes)``, ``.set_timing_cache(cache, ignore_mismatch)``, ``.get_timing_cache()``,
``ITimingCache.combine(other, ignore_mismatch)`` / ``.serialize()``, ``Builder.create_optimization_profile``
+ ``IOptimizationProfile.set_shape(name, min, opt, max)`` + ``config.add_optimization_profile``,
``Builder.build_serialized_network`` -> ``IHostMemory`` (buffer protocol), ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from resdeploy.artifact import ArtifactMetadata, open_artifact
from resdeploy.atomic import sha256_file, write_bytes, write_json, write_text
from resdeploy.errors import InputError
from resdeploy.engines.tensorrt_fusion import FusionReport, fusion_report, parse_layer_info
from resdeploy.device import (INSTALL_HINT, GpuInfo, Sidecar, gpu_info, require_tensorrt, sidecar_path,
                                               verify_plan)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


@dataclass
class TrtBuildConfig:
    min_batch: int = 1  # smallest batch the engine accepts (profile min)
    opt_batch: int = 8  # batch the tactics are tuned for (profile opt)
    max_batch: int = 32  # largest batch the engine accepts (profile max); device buffers are sized for it
    workspace_mib: int = 1024  # scratch memory limit for tactics (MemoryPoolType.WORKSPACE)
    optimization_level: int = 3  # builder optimisation level 0-5: higher = longer build, maybe faster engine
    timing_cache: str | None = None  # persistent timing cache file; reused across builds; None = none
    precision: str | None = None  # label only (the network is strongly typed); None = ONNX metadata "precision" or fp32
    input_name: str | None = None  # input to profile; None = every graph input (they share the batch axis)
    layer_info: bool = True  # also write <plan>.layers.json (engine inspector) and the fusion report
    verbose: bool = False  # TensorRT logger at INFO instead of WARNING

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(f"TensorRT profile needs 1 <= min <= opt <= max batch; got min {self.min_batch}, "
                             f"opt {self.opt_batch}, max {self.max_batch}")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"builder optimization level {self.optimization_level} is out of range; use 0..5 (default 3)")
        if self.workspace_mib < 1:
            raise InputError(f"workspace {self.workspace_mib} MiB is too small; give at least 1 MiB (default 1024)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} unknown; use one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class OnnxInput:
    name: str
    shape: tuple[int | None, ...]  # None = dynamic (symbolic or unknown) dimension
    elem_type: int


def read_onnx_inputs(onnx_path: str | os.PathLike[str]) -> tuple[list[OnnxInput], ArtifactMetadata]:
    """Graph inputs (initializers excluded) and metadata of an ONNX file, through the artifact contract
    (external data checked, weights not loaded). Dims <= 0 count as dynamic."""
    art = open_artifact(onnx_path)
    inputs = [OnnxInput(i.name, tuple(d if d is not None and d > 0 else None for d in i.shape), i.elem_type)
              for i in art.inputs]
    return inputs, art.metadata


def profile_shapes(input_shape: tuple[int | str | None, ...], config: TrtBuildConfig,
                   name: str = "input") -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for an input: the batch axis (0) spans the config's range, the rest must be fixed."""
    config.validate()
    if not input_shape:
        raise InputError(f"input '{name}' is a scalar; TensorRT profiles need a batch axis (export with shape [N, ...])")
    rest = []
    for i, d in enumerate(input_shape[1:], start=1):
        if not isinstance(d, int) or d <= 0:
            raise InputError(f"input '{name}' has a dynamic axis {i} ({d!r}) besides the batch; only the batch axis may be "
                             "dynamic: re-export with fixed spatial dimensions")
        rest.append(d)
    batch = input_shape[0]
    if isinstance(batch, int) and batch > 0 and not config.min_batch == config.opt_batch == config.max_batch == batch:
        raise InputError(f"input '{name}' has a fixed batch of {batch} but the profile asks for {config.min_batch}.."
                         f"{config.max_batch}; re-export with a dynamic batch axis, or build with min=opt=max={batch}")
    t = tuple(rest)
    return (config.min_batch, *t), (config.opt_batch, *t), (config.max_batch, *t)


def precision_of(metadata: ArtifactMetadata, config: TrtBuildConfig) -> str:
    """The precision label: the config's, else the artifact's recorded precision, else fp32."""
    if config.precision:
        return config.precision
    value = (metadata.precision or "fp32").lower()
    if value not in PRECISIONS:
        raise InputError(f"the ONNX metadata says precision {value!r}; expected one of {', '.join(PRECISIONS)}")
    return value


# -- timing cache ---------------------------------------------------------------------------------------
def read_timing_cache(path: str | os.PathLike[str] | None) -> bytes:
    """The serialized cache, or b"" (TensorRT then starts an empty one) when there is none yet."""
    if not path:
        return b""
    p = Path(path)
    if not p.exists():
        return b""
    if not p.is_file():
        raise InputError(f"timing cache {p} is not a file; pass a file path (it is created on the first build)")
    return p.read_bytes()


def save_timing_cache(trt: ModuleType, config: Any, path: str | os.PathLike[str]) -> int:
    """Merge what is on disk now (another build may have saved meanwhile) into this build's cache; save atomically."""
    cache = config.get_timing_cache()
    on_disk = read_timing_cache(path)
    if on_disk:
        other = config.create_timing_cache(on_disk)
        cache.combine(other, False)  # entries from another TensorRT/GPU are skipped (combine returns False)
    data = bytes(memoryview(cache.serialize()))
    write_bytes(path, data)
    return len(data)


# -- the build ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParserIssue:
    node: int
    node_name: str
    operator: str
    code: str
    desc: str

    def __str__(self) -> str:
        where = f"node {self.node_name or '?'} ({self.operator or '?'}, #{self.node})" if self.node >= 0 else "graph"
        return f"{where}: {self.code}: {self.desc}"


@dataclass(frozen=True)
class TrtBuildReport:
    plan_path: str
    sidecar_path: str
    sidecar: Sidecar
    timing_cache: str  # path ("" = none)
    timing_cache_status: str  # "new", "loaded 12345 bytes", "rejected (...): started empty", "disabled"
    timing_cache_bytes: int  # size saved after the build
    layers_path: str = ""
    fusion: FusionReport | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        s = self.sidecar
        lines = [f"TensorRT {s.tensorrt_version} plan {self.plan_path} ({Path(self.plan_path).stat().st_size / 1e6:.1f} MB) "
                 f"in {s.build_seconds:.1f} s for {s.gpu_name} (cc {s.compute_capability}), precision {s.precision}",
                 "  profile: " + "; ".join(f"{n} min {v['min']} opt {v['opt']} max {v['max']}" for n, v in s.profile.items()),
                 f"  optimisation level {s.optimization_level}, workspace {s.workspace_mib} MiB, timing cache "
                 f"{self.timing_cache or '-'}: {self.timing_cache_status}" +
                 (f", saved {self.timing_cache_bytes} bytes" if self.timing_cache else ""),
                 f"  sidecar {self.sidecar_path} (plan sha256 {s.plan_sha256[:16]}...)"]
        if self.fusion is not None:
            lines.append(f"  fusion: {self.fusion.fused_count}/{len(self.fusion.adds)} residual Adds fused into a conv, "
                         f"{self.fusion.layer_count} layers ({self.layers_path})")
            lines += [f"  warning: {w}" for w in self.fusion.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parser_issues(parser: Any) -> list[ParserIssue]:
    def call(error: Any, attr: str, default: Any) -> Any:  # TensorRT < 10 lacks some of these methods
        return getattr(error, attr)() if hasattr(error, attr) else default

    issues = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        issues.append(ParserIssue(int(call(e, "node", -1)), str(call(e, "node_name", "")), str(call(e, "node_operator", "")),
                                  str(call(e, "code", "")).split(".")[-1], str(call(e, "desc", ""))))
    return issues


def _make_logger(trt: ModuleType, verbose: bool) -> Any:
    return trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)


def build_engine(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                 config: TrtBuildConfig | None = None) -> TrtBuildReport:
    """Build ``onnx_path`` into a TensorRT plan at ``out_path`` (+ ``<out>.json`` sidecar, ``<out>.layers.json``).

    Raises BackendUnavailable (no tensorrt / no CUDA device / no driver: says how to install), InputError
    (unreadable ONNX, parser errors with node names, bad profile, failed build).
    """
    config = config or TrtBuildConfig()
    config.validate()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX model {onnx_path} does not exist; export one with `resdeploy export`")
    trt = require_tensorrt()  # before anything TensorRT: refuses without the package or a CUDA device
    return _build(trt, onnx_path, out_path, config, gpu_info())


def _build(trt: ModuleType, onnx_path: Path, out_path: Path, config: TrtBuildConfig, gpu: GpuInfo) -> TrtBuildReport:
    inputs, metadata = read_onnx_inputs(onnx_path)
    if config.input_name is not None and config.input_name not in {i.name for i in inputs}:
        raise InputError(f"input '{config.input_name}' is not in {onnx_path} (inputs: {', '.join(i.name for i in inputs)})")
    profiled = [i for i in inputs if config.input_name in (None, i.name)]
    shapes = {i.name: profile_shapes(i.shape, config, i.name) for i in profiled}
    precision = precision_of(metadata, config)
    onnx_sha = sha256_file(onnx_path)
    started = time.perf_counter()

    logger = _make_logger(trt, config.verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        issues = _parser_issues(parser)
        listing = "\n  ".join(str(i) for i in issues) or "(the parser gave no details)"
        raise InputError(f"TensorRT {trt.__version__}'s ONNX parser rejected {onnx_path} with {len(issues)} error(s):\n  "
                         f"{listing}\nfix or replace those nodes (check the opset and operator support), or serve the "
                         "ONNX with the onnxruntime backend")

    bconfig = builder.create_builder_config()
    bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    bconfig.builder_optimization_level = config.optimization_level
    bconfig.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    bconfig.add_optimization_profile(profile)

    cache_status, notes = "disabled", []
    if config.timing_cache:
        data = read_timing_cache(config.timing_cache)
        cache = bconfig.create_timing_cache(data)
        cache_status = f"loaded {len(data)} bytes" if data else "new"
        if not bconfig.set_timing_cache(cache, False):
            # Built by another TensorRT version or GPU: start empty rather than mix timings.
            bconfig.set_timing_cache(bconfig.create_timing_cache(b""), False)
            cache_status = "rejected (made by another TensorRT or GPU): started empty"
            notes.append(f"timing cache {config.timing_cache} did not match this TensorRT/GPU; it will be overwritten")

    serialized = builder.build_serialized_network(network, bconfig)
    if serialized is None:
        raise InputError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above); rerun with "
                         "verbose logging, a larger workspace, or a lower optimisation level")
    plan = bytes(memoryview(serialized))
    build_seconds = time.perf_counter() - started
    cache_bytes = save_timing_cache(trt, bconfig, config.timing_cache) if config.timing_cache else 0

    write_bytes(out_path, plan)
    sidecar = Sidecar(
        plan_sha256=hashlib.sha256(plan).hexdigest(), tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, precision=precision,
        profile={n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()},
        onnx_sha256=onnx_sha, build_seconds=round(build_seconds, 3), onnx_path=str(onnx_path),
        optimization_level=config.optimization_level, workspace_mib=config.workspace_mib,
        timing_cache=str(config.timing_cache or ""), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"metadata": metadata.to_props()})  # the runner (and server) read labels etc. from here
    side = write_json(sidecar_path(out_path), sidecar.to_json())  # last: a plan is trusted only once this exists

    layers_path, fusion = "", None
    if config.layer_info:
        info = engine_layer_info_from_bytes(trt, plan, logger)
        layers_path = str(layers_info_path(out_path))
        write_text(layers_path, info)
        fusion = fusion_report(parse_layer_info(info, source=layers_path), source=layers_path)
    return TrtBuildReport(str(out_path), str(side), sidecar, str(config.timing_cache or ""), cache_status, cache_bytes,
                          layers_path, fusion, tuple(notes))


def layers_info_path(plan_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` -> ``model.plan.layers.json`` (the engine inspector's layer information)."""
    return Path(f"{os.fspath(plan_path)}.layers.json")


def engine_layer_info_from_bytes(trt: ModuleType, plan: bytes, logger: Any = None) -> str:
    """The engine inspector's JSON for a plan (LayerInformationFormat.JSON; detailed when built so)."""
    runtime = trt.Runtime(logger or _make_logger(trt, False))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise InputError("TensorRT could not deserialize the plan (see the TensorRT log); rebuild it from the ONNX")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def engine_layer_info(plan_path: str | os.PathLike[str]) -> str:
    """Layer information of a plan file: requires TensorRT and a CUDA device; checks the sidecar first."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise InputError(f"plan {plan_path} does not exist")
    data = plan_path.read_bytes()
    verify_plan(plan_path, plan_bytes=data)  # untrusted executable: sha256 must match before TensorRT sees it
    trt = require_tensorrt()
    verify_plan(plan_path, None, str(trt.__version__), gpu_info().compute_capability, plan_bytes=data)
    return engine_layer_info_from_bytes(trt, data)


__all__ = ["INSTALL_HINT", "OnnxInput", "ParserIssue", "Sidecar", "TrtBuildConfig", "TrtBuildReport", "build_engine",
           "engine_layer_info", "layers_info_path", "precision_of", "profile_shapes", "read_onnx_inputs",
           "read_timing_cache", "require_tensorrt", "save_timing_cache", "verify_plan"]
