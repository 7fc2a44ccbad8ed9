"""TensorRT runner: a serialized plan run with ``execute_async_v3`` on device buffers.

    with open_runner("model.plan", backend="tensorrt", cuda_graphs=True) as r:
        outputs = r.infer({"input": x})

Activation, in this order: the plan's sha256 is checked against its sidecar (``<plan>.json``) before any
TensorRT or CUDA call (a plan is executable code); then ``require_tensorrt`` (the package, a CUDA device
found through the driver, cuda-python); then the running TensorRT version and the GPU's compute capability
are compared with the sidecar (plans are not portable: rebuild from the ONNX); then the plan is
deserialized, an execution context and a stream are created, device buffers are allocated for the
profile's max shapes with pinned host buffers beside them, and every tensor address is set once.

``infer``: ``set_input_shape`` per input, host -> pinned -> device (``cudaMemcpyAsync``), ``execute_async_v3``
(or, with ``cuda_graphs``, a CUDA graph captured per input-shape after one ordinary enqueue at that shape,
which TensorRT needs after a shape change), device -> pinned -> a fresh numpy array, stream sync.

API targeted: TensorRT 10.x/11.x Python API (``ICudaEngine.num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode``, ``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape(name, 0)``;
``IExecutionContext.set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``,
``execute_async_v3(stream_handle)``); cuda-python 12.x/13.x ``cuda.bindings.runtime`` (``cudaStreamCreate``,
``cudaMalloc``, ``cudaMallocHost``, ``cudaMemcpyAsync``, ``cudaStreamSynchronize``,
``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)``, ``cudaStreamEndCapture``,
``cudaGraphInstantiate(graph, 0)``, ``cudaGraphLaunch``, ``cudaGraphExecDestroy``, ``cudaGraphDestroy``,
``cudaFree``, ``cudaFreeHost``, ``cudaStreamDestroy``); every call returns ``(cudaError_t, *values)``.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy.errors import InputError, ResdeployError
from resdeploy.engines.base import Runner, RunnerError, TensorSpec
from resdeploy.artifact import ArtifactMetadata
from resdeploy.device import (Sidecar, gpu_info, import_cudart, require_tensorrt, trt_dtype_to_numpy,
                                               verify_plan)


class CudaError(ResdeployError):
    """A CUDA runtime call failed while running a plan. Exit code 2."""


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap cuda-python's ``(err, *values)``; raise CudaError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            _, name = cudart.cudaGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - best effort for the message
            name = str(err)
        raise CudaError(f"CUDA {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    nbytes: int
    device: int = 0  # device pointer
    host: int = 0  # pinned host pointer
    host_view: np.ndarray | None = None  # flat numpy view over the pinned buffer


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, plan: str | os.PathLike[str], sidecar: Sidecar | str | os.PathLike[str] | None = None,
                 cuda_graphs: bool = False, name: str = "", device: int = 0) -> None:
        super().__init__(name)
        if isinstance(plan, (bytes, bytearray)):
            raise InputError("the tensorrt backend loads a plan file (with its sidecar), not bytes; pass the .plan path")
        self.plan_path = Path(plan)
        self.sidecar_arg = sidecar
        self.cuda_graphs = cuda_graphs  # capture one CUDA graph per input shape (after one warm-up enqueue)
        self.device = device
        self.sidecar: Sidecar | None = None
        self._trt = self._cudart = self._runtime = self._engine = self._context = self._stream = None
        self._bindings: dict[str, _Binding] = {}
        self._graphs: dict[tuple, tuple[Any, Any]] = {}  # input shapes -> (graph, graph exec)
        self._warm: set[tuple] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _activate(self) -> None:
        if not self.plan_path.is_file():
            raise InputError(f"TensorRT plan {self.plan_path} does not exist; build one with "
                             f"`resdeploy build MODEL.onnx --backend tensorrt --out {self.plan_path}`")
        data = self.plan_path.read_bytes()
        # 1. integrity, before anything TensorRT or CUDA sees the bytes
        sidecar = verify_plan(self.plan_path, self.sidecar_arg, plan_bytes=data)
        # 2. the backend (package, device, cuda-python): BackendUnavailable names what is missing
        trt = require_tensorrt(cuda_python=True)
        # 3. portability: same TensorRT version, same compute capability
        gpu = gpu_info(self.device)
        self.sidecar = verify_plan(self.plan_path, sidecar, str(trt.__version__), gpu.compute_capability, plan_bytes=data)
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        try:
            _check(cudart, cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise InputError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (see its log); "
                                 "rebuild it from the ONNX with `resdeploy build --backend tensorrt`")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise CudaError(f"TensorRT could not create an execution context for {self.plan_path} (out of device memory?)")
            self._stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._setup_bindings()
        except BaseException:
            self._deactivate()
            raise
        self.providers = (f"TensorRT {trt.__version__} {gpu.name}",)
        meta = self.sidecar.extra.get("metadata") if isinstance(self.sidecar.extra, dict) else None
        if isinstance(meta, dict):  # the ONNX artifact's metadata, copied into the sidecar at build time
            self.artifact_metadata = ArtifactMetadata.from_props(meta, f"sidecar of {self.plan_path}")
        self.description = (f"tensorrt {trt.__version__} {gpu} plan {self.plan_path.name} precision {self.sidecar.precision}"
                            f"{' cuda-graphs' if self.cuda_graphs else ''}")

    def _setup_bindings(self) -> None:
        engine, context, cudart = self._engine, self._context, self._cudart
        mode_input = self._trt.TensorIOMode.INPUT
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs, outputs, mins, maxs = [], [], [], []
        for name in names:
            if engine.get_tensor_mode(name) != mode_input:
                continue
            shape = tuple(engine.get_tensor_shape(name))
            dtype = trt_dtype_to_numpy(engine.get_tensor_dtype(name))
            if any(d < 0 for d in shape):
                mn, _opt, mx = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            else:
                mn = mx = shape
            context.set_input_shape(name, mx)  # size everything for the largest shape the profile allows
            mins.append(mn[0] if mn else 1)
            maxs.append(mx[0] if mx else 1)
            inputs.append(TensorSpec(name, dtype, tuple(None if d < 0 else d for d in shape)))
            self._bindings[name] = _Binding(name, True, np.dtype(dtype), mx, int(np.prod(mx)) * np.dtype(dtype).itemsize)
        for name in names:
            if engine.get_tensor_mode(name) == mode_input:
                continue
            dtype = trt_dtype_to_numpy(engine.get_tensor_dtype(name))
            shape = tuple(engine.get_tensor_shape(name))
            mx = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in mx):
                raise InputError(f"output '{name}' has a data-dependent shape {mx}; the tensorrt runner supports outputs "
                                 "whose shape follows from the input shapes")
            outputs.append(TensorSpec(name, dtype, tuple(None if d < 0 else d for d in shape)))
            self._bindings[name] = _Binding(name, False, np.dtype(dtype), mx, int(np.prod(mx)) * np.dtype(dtype).itemsize)
        for b in self._bindings.values():
            size = max(b.nbytes, 1)
            b.device = int(_check(cudart, cudart.cudaMalloc(size), f"cudaMalloc({size}) for '{b.name}'"))
            b.host = int(_check(cudart, cudart.cudaMallocHost(size), f"cudaMallocHost({size}) for '{b.name}'"))
            raw = (ctypes.c_byte * size).from_address(b.host)
            b.host_view = np.frombuffer(raw, dtype=np.uint8)[: b.nbytes].view(b.dtype)
            if not context.set_tensor_address(b.name, b.device):
                raise CudaError(f"TensorRT refused the device address for '{b.name}'")
        self._inputs, self._outputs = inputs, outputs
        self.min_batch, self.max_batch = max(mins, default=1), min(maxs, default=None)

    def _deactivate(self) -> None:
        cudart = self._cudart
        if cudart is not None:
            for graph, graph_exec in self._graphs.values():
                cudart.cudaGraphExecDestroy(graph_exec)
                cudart.cudaGraphDestroy(graph)
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for b in self._bindings.values():
                b.host_view = None
                if b.device:
                    cudart.cudaFree(b.device)
                if b.host:
                    cudart.cudaFreeHost(b.host)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._graphs.clear()
        self._warm.clear()
        self._bindings = {}
        # TensorRT objects go in dependency order: context, engine, runtime.
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    # -- inference ---------------------------------------------------------------------------------------
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        key = tuple((s.name, feed[s.name].shape) for s in self._inputs)
        for spec in self._inputs:
            x, b = feed[spec.name], self._bindings[spec.name]
            if any(n > m for n, m in zip(x.shape, b.max_shape)):
                raise RunnerError(f"{self.name}: input '{spec.name}' has shape {list(x.shape)}; the plan's profile allows "
                                  f"at most {list(b.max_shape)} (rebuild with a larger max batch)")
            if not context.set_input_shape(spec.name, x.shape):
                raise RunnerError(f"{self.name}: TensorRT rejected shape {list(x.shape)} for input '{spec.name}' "
                                  f"(profile {self.sidecar.profile.get(spec.name) if self.sidecar else '?'})")
            np.copyto(b.host_view[: x.size], np.ascontiguousarray(x).reshape(-1))
            _check(cudart, cudart.cudaMemcpyAsync(b.device, b.host, x.nbytes, h2d, stream), f"copy of '{spec.name}' to the GPU")
        shapes = {s.name: tuple(context.get_tensor_shape(s.name)) for s in self._outputs}
        self._enqueue(key)
        out_sizes = {}
        for spec in self._outputs:
            b = self._bindings[spec.name]
            nbytes = int(np.prod(shapes[spec.name])) * b.dtype.itemsize
            out_sizes[spec.name] = nbytes
            _check(cudart, cudart.cudaMemcpyAsync(b.host, b.device, nbytes, d2h, stream), f"copy of '{spec.name}' to the host")
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return {s.name: self._bindings[s.name].host_view[: out_sizes[s.name] // self._bindings[s.name].dtype.itemsize]
                .reshape(shapes[s.name]).copy() for s in self._outputs}

    def _enqueue(self, key: tuple) -> None:
        cudart, context, stream = self._cudart, self._context, self._stream
        if self.cuda_graphs and key in self._graphs:
            _check(cudart, cudart.cudaGraphLaunch(self._graphs[key][1], stream), "cudaGraphLaunch")
            return
        if not context.execute_async_v3(int(stream)):
            raise CudaError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        if self.cuda_graphs and key not in self._warm:
            # TensorRT needs one ordinary enqueue after a shape change before it can be captured.
            self._warm.add(key)
            return
        if self.cuda_graphs:
            self._capture(key)

    def _capture(self, key: tuple) -> None:
        cudart, stream = self._cudart, self._stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        _check(cudart, cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        ok = self._context.execute_async_v3(int(stream))
        graph = _check(cudart, cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        if not ok:
            cudart.cudaGraphDestroy(graph)
            raise CudaError(f"{self.name}: execute_async_v3 failed while capturing a CUDA graph; run without cuda_graphs")
        try:
            graph_exec = _check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except TypeError:  # cuda-python 11.x signature: (graph, error-node buffer, buffer size)
            graph_exec = _check(cudart, cudart.cudaGraphInstantiate(graph, b"", 0), "cudaGraphInstantiate")
        if isinstance(graph_exec, tuple):
            graph_exec = graph_exec[0]
        self._graphs[key] = (graph, graph_exec)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        if self.sidecar is not None:
            meta.update(tensorrt_version=self.sidecar.tensorrt_version, compute_capability=self.sidecar.compute_capability,
                        precision=self.sidecar.precision, profile=self.sidecar.profile, cuda_graphs=self.cuda_graphs)
        return meta


__all__ = ["CudaError", "TensorRTRunner"]
