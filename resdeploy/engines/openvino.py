"""OpenVINO runner (optional extra ``resdeploy[openvino]``): an ONNX model compiled for the CPU.

OpenVINO silently runs in bf16 on CPUs with avx512_bf16 or AMX unless told otherwise, which costs accuracy.
This runner asks for ``INFERENCE_PRECISION_HINT=f32`` and ``PERFORMANCE_HINT=LATENCY`` by default;
``precision_hint="bf16"`` (or ``"default"``, OpenVINO's own choice) must be asked for explicitly, as must
``performance_hint="default"`` (no hint: OpenVINO's own), and ``description`` states the precision and the
performance mode that the compiled model reports back. An INT8 (Q/DQ) ONNX model runs its quantized convolutions
in int8 whatever the hint; the float parts around them follow the precision hint.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy.artifact import open_artifact
from resdeploy.errors import BackendUnavailable, InputError
from resdeploy.engines.base import Runner, TensorSpec

PRECISION_HINTS = ("f32", "bf16", "f16", "default")  # "default": whatever OpenVINO picks for the device
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "default")  # "default": no hint, OpenVINO's own for the device
# The settings a deployment may fix (engines.check_settings): name -> allowed values; DEFAULT_SETTINGS: this runner's.
SETTINGS: dict[str, tuple[str, ...]] = {"precision_hint": PRECISION_HINTS, "performance_hint": PERFORMANCE_HINTS}
DEFAULT_SETTINGS: dict[str, str] = {"precision_hint": "f32", "performance_hint": "LATENCY"}


def openvino_defaults(device: str = "CPU") -> dict[str, str]:
    """What OpenVINO picks for ``device`` when given no hint: {"precision": "bf16" or "f32" ..., "performance": ...}.
    Asked of the plugin, nothing compiled."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: `pip install 'resdeploy[openvino]'`") from None
    core = ov.Core()
    mode = core.get_property(device, "PERFORMANCE_HINT")
    return {"precision": _type_name(core.get_property(device, "INFERENCE_PRECISION_HINT")),
            "performance": str(getattr(mode, "name", mode)).rsplit(".", 1)[-1]}


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, model: str | os.PathLike[str], precision_hint: str = "f32", threads: int | None = None,
                 performance_hint: str = "LATENCY", device: str = "CPU", dynamic_batch: bool = True,
                 config: dict[str, Any] | None = None, name: str = "") -> None:
        super().__init__(name)
        if precision_hint not in PRECISION_HINTS:
            raise InputError(f"openvino precision_hint {precision_hint!r} unknown; use one of {', '.join(PRECISION_HINTS)}")
        if performance_hint not in PERFORMANCE_HINTS:
            raise InputError(f"openvino performance_hint {performance_hint!r} unknown; use one of {', '.join(PERFORMANCE_HINTS)}")
        if threads is not None and threads < 1:
            raise InputError(f"openvino threads must be >= 1, got {threads}")
        self.model = model
        self.precision_hint = precision_hint
        self.threads = threads
        self.performance_hint = performance_hint
        self.device = device
        self.dynamic_batch = dynamic_batch
        self.config = dict(config or {})  # extra compile_model properties, passed as given
        self.compiled = None
        self.request = None
        self.inference_precision = ""  # what the compiled model reports, e.g. "f32" or "bf16"
        self.performance_mode = ""  # what the compiled model reports: LATENCY, THROUGHPUT, ...

    def compile_config(self) -> dict[str, Any]:
        """The properties handed to ``compile_model``."""
        cfg: dict[str, Any] = {}
        if self.performance_hint != "default":
            cfg["PERFORMANCE_HINT"] = self.performance_hint
        if self.precision_hint != "default":
            cfg["INFERENCE_PRECISION_HINT"] = self.precision_hint
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        cfg.update(self.config)
        return cfg

    def _activate(self) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("the openvino backend needs OpenVINO: `pip install 'resdeploy[openvino]'`") from None
        path = Path(self.model)
        # Through the artifact contract first: external data is checked before OpenVINO follows it.
        self.artifact_metadata = open_artifact(path).metadata
        core = ov.Core()
        if self.device not in core.available_devices:
            raise BackendUnavailable(f"OpenVINO has no device {self.device!r} (available: {', '.join(core.available_devices)})")
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the parser's message
            raise InputError(f"OpenVINO could not read {path}: {exc}") from None
        if self.dynamic_batch:
            shapes = {}
            for port in model.inputs:
                ps = port.get_partial_shape()
                if ps.rank.is_static and len(ps) >= 1 and ps[0].is_static:
                    dims = [-1] + [d.get_length() if d.is_static else -1 for d in list(ps)[1:]]
                    shapes[port.get_any_name()] = ov.PartialShape(dims)
            if shapes:
                model.reshape(shapes)
        try:
            self.compiled = core.compile_model(model, self.device, self.compile_config())
        except Exception as exc:
            raise InputError(f"OpenVINO could not compile {path} for {self.device} with {self.compile_config()}: {exc}") from None
        self.request = self.compiled.create_infer_request()
        # Names from the model as read: compiling may rename ports after folded casts (an FP16 model's
        # "input" becomes "graph_input_cast_0"); ports keep their order, so inference goes by index.
        self._inputs = [self._spec(p) for p in model.inputs]
        self._outputs = [self._spec(p) for p in model.outputs]
        self.inference_precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        mode = self.compiled.get_property("PERFORMANCE_HINT")
        self.performance_mode = str(getattr(mode, "name", mode)).rsplit(".", 1)[-1]
        self.providers = (f"OpenVINO {self.device}",)
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        kernels = " ".join(f"{k}:{v}" for k, v in sorted(self.kernel_precisions().items(), key=lambda kv: -kv[1]))
        self.description = (f"openvino {ov.__version__.split('-')[0]} {self.device} inference precision "
                            f"{self.inference_precision}{' (OpenVINO default)' if self.precision_hint == 'default' else ''}, "
                            f"{threads} threads, {self.performance_mode}"
                            f"{' (OpenVINO default)' if self.performance_hint == 'default' else ''}, nodes by precision {kernels}")

    @staticmethod
    def _spec(port: Any) -> TensorSpec:
        ps = port.get_partial_shape()
        shape = tuple(d.get_length() if d.is_static else None for d in list(ps)) if ps.rank.is_static else (None,)
        try:
            dtype = np.dtype(port.get_element_type().to_dtype()).name
        except Exception:  # an OpenVINO type without a numpy twin (bf16): name it as OpenVINO does
            dtype = port.get_element_type().get_type_name()
        return TensorSpec(port.get_any_name(), dtype, shape)

    def kernel_precisions(self) -> dict[str, int]:
        """How many executed nodes run in each precision (from the runtime graph): shows whether int8 kernels run."""
        if self.compiled is None:
            raise InputError(f"{self.name}: runner is not active; use `with open_runner(...) as r:` first")
        counts: collections.Counter[str] = collections.Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" not in info or "layerType" not in info:
                continue
            if _rt(info["layerType"]) in ("Input", "Output", "Parameter", "Result", "Const"):
                continue
            counts[_rt(info["runtimePrecision"])] += 1
        return dict(counts)

    def _deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.request.infer({i: np.ascontiguousarray(feed[spec.name]) for i, spec in enumerate(self._inputs)}, share_inputs=True)
        return {spec.name: np.array(self.request.get_output_tensor(i).data, copy=True) for i, spec in enumerate(self._outputs)}


def _rt(value: Any) -> str:
    """An rt_info entry (OVAny) as text."""
    try:
        return str(value.astype(str))
    except Exception:
        return str(getattr(value, "value", value))


def _type_name(t: Any) -> str:
    """OpenVINO element type -> short name: f32, bf16, f16."""
    names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    s = getattr(t, "get_type_name", lambda: str(t))()
    return names.get(s, s)
