"""The CUDA device probe, TensorRT import and plan sidecar: ground floor, shared by the engines (TensorRT build and
runner, the automatic backend choice), the server's instance placement and the pipeline (bench, parity, repository).

Everything here imports without TensorRT, CUDA or cuda-python: the probes ask the NVIDIA driver through
ctypes (``libcuda.so.1``), never TensorRT, because TensorRT's (lean) runtime must not be started on a
machine without a CUDA device (it crashes instead of raising). ``tensorrt`` and ``cuda-python`` are
imported lazily, and only after a device answered.

Also here (on the ground floor, where the engines and the pipeline's repository both reach it): the plan
**sidecar** and its checks. A TensorRT plan is an executable artifact and is not portable: it is loaded only when its sha256 matches
the sidecar written beside it at build time, and only by the TensorRT version and on the compute
capability it was built for.

API versions targeted: TensorRT 10.x / 11.x Python API (``tensorrt.DataType`` member names), CUDA driver
API ``cuInit``/``cuDeviceGet``/``cuDeviceGetName``/``cuDeviceGetAttribute`` (attributes 75/76 =
``CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR``), cuda-python 12.x/13.x (``cuda.bindings.runtime``,
falling back to the older ``cuda.cudart`` module path).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from resdeploy.atomic import sha256_file
from resdeploy.errors import BackendUnavailable, InputError

INSTALL_HINT = ("install the gpu extra on a machine with an NVIDIA GPU and driver: `pip install 'resdeploy[gpu]'` "
                "(brings tensorrt and cuda-python; check the driver with `nvidia-smi`)")
SIDECAR_FORMAT = 1  # bump when the sidecar's fields change meaning

# tensorrt.DataType member name -> numpy dtype name; None = no numpy equivalent (the runner refuses such I/O).
TRT_DTYPE_TO_NUMPY: dict[str, str | None] = {
    "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
    "UINT8": "uint8", "DOUBLE": "float64", "BF16": None, "FP8": None, "INT4": None, "FP4": None, "E8M0": None,
}

_CU_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR (cuda.h)
_CU_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


def trt_dtype_to_numpy(trt_dtype: Any) -> str:
    """numpy dtype name for a ``tensorrt.DataType`` (or its member name, e.g. ``"HALF"``)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    if name not in TRT_DTYPE_TO_NUMPY:
        raise InputError(f"TensorRT data type {name} is unknown to resdeploy; expected one of {', '.join(TRT_DTYPE_TO_NUMPY)}")
    np_name = TRT_DTYPE_TO_NUMPY[name]
    if np_name is None:
        raise InputError(f"TensorRT I/O tensor of type {name} has no numpy equivalent; export the model with "
                         "float32/float16/int I/O (keep low precision inside the network)")
    return np_name


# -- probes ------------------------------------------------------------------------------------------
def _libcuda() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def cuda_device_status() -> tuple[bool, str]:
    """(present, why-not). Asks the driver only; never TensorRT."""
    lib = _libcuda()
    if lib is None:
        return False, "no NVIDIA driver (libcuda.so.1 not found)"
    rc = lib.cuInit(0)
    if rc != 0:
        return False, f"the NVIDIA driver did not initialise (cuInit returned {rc}; no GPU visible? CUDA_VISIBLE_DEVICES?)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return False, "no CUDA device (the driver reports 0 GPUs)"
    return True, ""


def cuda_device_present() -> bool:
    """True when a CUDA device answers. Asks the driver only; never TensorRT (which must not start without one)."""
    return cuda_device_status()[0]


def cuda_device_count() -> int:
    """How many CUDA devices the driver reports (0 without a driver or a GPU). Asks the driver only."""
    present, _ = cuda_device_status()
    if not present:
        return 0
    count = ctypes.c_int(0)
    lib = _libcuda()
    return count.value if lib is not None and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.0"

    def __str__(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability})"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` (driver API through ctypes)."""
    present, why = cuda_device_status()
    if not present:
        raise BackendUnavailable(f"TensorRT needs a CUDA device: {why}; {INSTALL_HINT}")
    lib = _libcuda()
    dev = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
        raise BackendUnavailable(f"CUDA device {device} does not exist (cuDeviceGet failed)")
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(buf, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    return GpuInfo(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cudart_available() -> bool:
    return _find_spec("cuda.bindings") or _find_spec("cuda.cudart")


def require_tensorrt(cuda_python: bool = False) -> ModuleType:
    """The ``tensorrt`` module, or BackendUnavailable naming everything that is missing and how to install it.

    ``cuda_python``: also require cuda-python (the runner moves buffers with it; building does not need it).
    The CUDA device is checked before ``tensorrt`` is imported, so no TensorRT object is ever made without one.
    """
    missing = []
    if not _find_spec("tensorrt"):
        missing.append("the `tensorrt` Python package is not installed")
    present, why = cuda_device_status()
    if not present:
        missing.append(why)
    if cuda_python and not _cudart_available():
        missing.append("cuda-python (`cuda.bindings.runtime`) is not installed")
    if missing:
        raise BackendUnavailable(f"the TensorRT backend is unavailable: {'; '.join(missing)}. To use it, {INSTALL_HINT}")
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # a broken wheel (e.g. the PyPI placeholder) raises at import
        raise BackendUnavailable(f"`import tensorrt` failed ({type(exc).__name__}: {exc}); reinstall it: {INSTALL_HINT}") from None


def import_cudart() -> ModuleType:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else ``cuda.cudart``."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(mod)
        except ImportError:
            continue
    raise BackendUnavailable(f"cuda-python is not installed (needed to move TensorRT buffers); {INSTALL_HINT}")


# -- the plan sidecar ----------------------------------------------------------------------------------
def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return Path(f"{os.fspath(plan_path)}.json")


@dataclass(frozen=True)
class Sidecar:
    """What a plan was built from and for. Written beside the plan; checked before every load."""

    plan_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, dict[str, list[int]]]  # input name -> {"min": [...], "opt": [...], "max": [...]}
    onnx_sha256: str
    build_seconds: float
    onnx_path: str = ""
    optimization_level: int = 3
    workspace_mib: int = 0
    timing_cache: str = ""  # path of the persistent timing cache used ("" = none)
    created: str = ""  # UTC ISO time of the build
    format: int = SIDECAR_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: str = "sidecar") -> "Sidecar":
        if not isinstance(obj, dict):
            raise InputError(f"{source} is not a JSON object; rebuild the plan with `resdeploy build --backend tensorrt`")
        required = ["plan_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profile",
                    "onnx_sha256", "build_seconds"]
        missing = [k for k in required if k not in obj]
        if missing:
            raise InputError(f"{source} lacks {', '.join(missing)}; rebuild the plan with `resdeploy build --backend tensorrt`")
        if obj.get("format", SIDECAR_FORMAT) > SIDECAR_FORMAT:
            raise InputError(f"{source} has format {obj['format']}, newer than this resdeploy reads ({SIDECAR_FORMAT}); "
                             "upgrade resdeploy or rebuild the plan")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Sidecar":
        try:
            obj = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"sidecar {path} not found") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"sidecar {path} is unreadable ({exc}); rebuild the plan with `resdeploy build --backend tensorrt`") from None
        return cls.from_json(obj, source=f"sidecar {path}")

    def __str__(self) -> str:
        shapes = "; ".join(f"{n} min {v['min']} opt {v['opt']} max {v['max']}" for n, v in self.profile.items())
        return (f"TensorRT {self.tensorrt_version} plan for {self.gpu_name} (cc {self.compute_capability}), "
                f"precision {self.precision}, profile {shapes}, built in {self.build_seconds:.1f} s, "
                f"plan sha256 {self.plan_sha256[:12]}, onnx sha256 {self.onnx_sha256[:12]}")


def _version_key(version: str) -> tuple[str, ...]:
    """TensorRT plans are tied to major.minor.patch (the build number, e.g. 10.3.0.26's 26, is ignored)."""
    return tuple(str(version).split(".")[:3])


def verify_plan(plan_path: str | os.PathLike[str], sidecar: "Sidecar | str | os.PathLike[str] | None" = None,
                runtime_trt_version: str | None = None, runtime_compute_capability: str | None = None,
                *, plan_bytes: bytes | None = None) -> Sidecar:
    """Refuse a plan that does not match its sidecar, or that was built for another TensorRT / GPU.

    Pure: reads files, never TensorRT. ``sidecar`` None reads ``<plan>.json``; the runtime arguments None
    skip that check (the runner passes the running TensorRT's version and the device's capability).
    ``plan_bytes``: the bytes about to be deserialized (hash exactly those, no second read).
    """
    plan = Path(plan_path)
    rebuild = "rebuild it from the ONNX with `resdeploy build MODEL.onnx --backend tensorrt --out PLAN` (plans are not portable)"
    if plan_bytes is None and not plan.is_file():
        raise InputError(f"plan {plan} does not exist; build one with `resdeploy build MODEL.onnx --backend tensorrt --out {plan}`")
    if sidecar is None or isinstance(sidecar, (str, os.PathLike)):
        side_file = Path(sidecar) if sidecar is not None else sidecar_path(plan)
        if not side_file.is_file():
            raise InputError(f"plan {plan} has no sidecar ({side_file} is missing), so it cannot be trusted: a plan is "
                             "executable code and is loaded only when its sha256 matches its sidecar; rebuild with "
                             "`resdeploy build --backend tensorrt`")
        sidecar = Sidecar.load(side_file)
    if plan_bytes is not None:
        import hashlib

        actual = hashlib.sha256(plan_bytes).hexdigest()
    else:
        actual = sha256_file(plan)
    if actual != sidecar.plan_sha256:
        raise InputError(f"plan {plan} does not match its sidecar: sha256 {actual[:16]}... but the sidecar expects "
                         f"{sidecar.plan_sha256[:16]}... (modified or replaced plan); refusing to load it; rebuild with "
                         "`resdeploy build --backend tensorrt`")
    if runtime_trt_version is not None and _version_key(runtime_trt_version) != _version_key(sidecar.tensorrt_version):
        raise InputError(f"plan {plan} was built by TensorRT {sidecar.tensorrt_version} but this is TensorRT "
                         f"{runtime_trt_version}; {rebuild}")
    if runtime_compute_capability is not None and str(runtime_compute_capability) != str(sidecar.compute_capability):
        raise InputError(f"plan {plan} was built for compute capability {sidecar.compute_capability} "
                         f"({sidecar.gpu_name}) but this GPU has compute capability {runtime_compute_capability}; {rebuild}")
    return sidecar


__all__ = ["GpuInfo", "INSTALL_HINT", "Sidecar", "TRT_DTYPE_TO_NUMPY", "cuda_device_count", "cuda_device_status", "gpu_info", "import_cudart",
           "require_tensorrt", "sidecar_path", "trt_dtype_to_numpy", "verify_plan"]
