"""Engines: each backend's runner and build, behind one runner contract (``with open_runner(...) as r: r.infer({...})``).

Backends: ``torch`` (the reference, an nn.Module), ``onnxruntime`` (CPU / CUDA / TensorRT providers; its build
saves the optimised graph with a fusion report), ``tensorrt`` (a serialized plan; its build and the engine
inspector's fusion report), ``openvino`` (optional extra). One module per backend's runner
(``engines/<backend>.py``), its build beside it (``<backend>_build.py``), the contract in ``engines/base.py``.

Engines run and build artifacts; they never make them: this package imports neither ``resdeploy.models`` nor
``resdeploy.export`` (which Adds are residual is the caller's to say). Optional backends are imported only when
asked for, so this package imports without onnxruntime, TensorRT, CUDA or OpenVINO.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from resdeploy.device import cuda_device_present
from resdeploy.errors import BackendUnavailable, InputError
from resdeploy.engines.base import Runner, RunnerError, TensorSpec

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
PLACEMENTS = ("auto", "cpu", "gpu")
# Backends whose runner takes engine settings (SETTINGS in their module): a deployment fixes them per model.
SETTINGS_BACKENDS = ("onnxruntime", "openvino")


def _settings_module(backend: str) -> Any:
    if backend not in SETTINGS_BACKENDS:
        raise InputError(f"backend {backend!r} takes no engine settings; those that do: {', '.join(SETTINGS_BACKENDS)}")
    return importlib.import_module(f"resdeploy.engines.{backend}")


def check_settings(backend: str, settings: Any, where: str = "engine settings") -> dict[str, Any]:
    """``settings`` for ``backend``'s runner, checked and completed with the runner's defaults (every key explicit).

    Raises InputError naming ``where``, the key or value and the valid ones: a setting is a runner option that a
    deployment fixes (ONNX Runtime's ``spinning``; OpenVINO's ``precision_hint`` and ``performance_hint``).
    Threads are not a setting: the server splits its cores over a model's instances."""
    mod = _settings_module(backend)
    if not isinstance(settings, dict):
        raise InputError(f"{where}: expected an object of {backend} settings, got {type(settings).__name__} {settings!r:.60}")
    unknown = sorted(set(settings) - set(mod.SETTINGS))
    if unknown:
        raise InputError(f"{where}: {backend} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {', '.join(mod.SETTINGS)}")
    for key, value in settings.items():
        allowed = mod.SETTINGS[key]
        # bool is an int: 1 must not pass for True, nor "true" for a bool
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise InputError(f"{where}: {backend} setting {key} = {_shown(value)}; use one of {', '.join(map(_shown, allowed))}")
    return {**mod.DEFAULT_SETTINGS, **settings}


def _shown(value: Any) -> str:
    """A setting's value as JSON writes it (true, "f32"): settings live in JSON (config.pbtxt, engine-choice.json)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def settings_label(backend: str, settings: dict[str, Any]) -> str:
    """What differs from the runner's defaults, in words ("" when nothing does): "spinning off", "OpenVINO defaults"."""
    full = check_settings(backend, settings)
    changed = {k: v for k, v in full.items() if v != _settings_module(backend).DEFAULT_SETTINGS[k]}
    if backend == "openvino" and changed and set(full.values()) == {"default"}:
        return "OpenVINO defaults"
    words = {"spinning": lambda v: f"spinning {'on' if v else 'off'}",
             "precision_hint": lambda v: "OpenVINO's precision" if v == "default" else f"{v} precision",
             "performance_hint": lambda v: "OpenVINO's performance hint" if v == "default" else v}
    return ", ".join(words[k](v) for k, v in changed.items())


def resolve_auto(artifact: Any, placement: str = "auto") -> tuple[str, dict[str, Any], str]:
    """Pick a backend for ``artifact``: TensorRT when usable, else ONNX Runtime CUDA, else ONNX Runtime CPU.

    ``placement``: ``cpu`` forces ONNX Runtime on the CPU (a Triton KIND_CPU instance group), ``gpu`` refuses to
    fall back to the CPU. Returns (backend, options, reason); the reason is what `auto` tells the user.
    """
    if placement not in PLACEMENTS:
        raise InputError(f"placement {placement!r} unknown; use one of {', '.join(PLACEMENTS)}")
    if not isinstance(artifact, (str, os.PathLike)):
        return "torch", {}, "a PyTorch module runs on the torch backend"
    path = Path(artifact)
    if path.suffix in (".plan", ".engine"):
        if placement == "cpu":
            raise InputError(f"{path} is a TensorRT plan, which runs on a GPU only; serve the ONNX model for a CPU instance")
        return "tensorrt", {}, "a TensorRT plan runs on TensorRT"
    if placement == "cpu":
        return "onnxruntime", {"provider": "cpu"}, "the CPU was asked for: ONNX Runtime CPU"
    gpu = cuda_device_present()
    try:
        from resdeploy.engines.onnxruntime import available_providers

        providers = available_providers()
    except ImportError:
        raise InputError("no backend for an ONNX model: onnxruntime is not installed (`pip install onnxruntime`)") from None
    if gpu and "TensorrtExecutionProvider" in providers and importlib.util.find_spec("tensorrt"):
        return "onnxruntime", {"provider": "tensorrt"}, "TensorRT is usable: ONNX Runtime TensorRT provider"
    if gpu and "CUDAExecutionProvider" in providers:
        return "onnxruntime", {"provider": "cuda"}, "no TensorRT; CUDA is usable: ONNX Runtime CUDA provider"
    why = "no CUDA device" if not gpu else "onnxruntime has no GPU provider (install onnxruntime-gpu)"
    if placement == "gpu":
        raise BackendUnavailable(f"a GPU was asked for but {why}")
    return "onnxruntime", {"provider": "cpu"}, f"{why}: ONNX Runtime CPU"


def open_runner(artifact: Any, backend: str = "auto", *, placement: str = "auto", **options: Any) -> Runner:
    """A runner for ``artifact`` (an nn.Module, an .onnx path or bytes, a TensorRT .plan). Not yet active.

    ``options`` go to the backend: onnxruntime takes OrtOptions fields (provider, threads, optimization, ...),
    torch takes input_shape/device, tensorrt and openvino their own; ``name`` and ``threads`` are accepted by
    every backend (TensorRT schedules its own kernels and ignores ``threads``). ``placement``: see
    :func:`resolve_auto`; with ``backend="onnxruntime"`` and ``placement="cpu"`` the CPU provider is used.
    """
    reason = ""
    if backend == "auto":
        backend, auto_opts, reason = resolve_auto(artifact, placement)
        options = {**auto_opts, **options}
    elif backend == "onnxruntime" and placement == "cpu":
        options.setdefault("provider", "cpu")
    if backend == "torch":
        from resdeploy.engines.torch import TorchRunner

        options.pop("threads", None)
        runner: Runner = TorchRunner(artifact, **options)
    elif backend == "onnxruntime":
        from resdeploy.engines.onnxruntime import OnnxRuntimeRunner, OrtOptions

        name = options.pop("name", "")
        try:
            ort_options = OrtOptions(**options)
        except TypeError as exc:
            raise InputError(f"onnxruntime runner: {exc}; valid options: {', '.join(OrtOptions.__dataclass_fields__)}") from None
        runner = OnnxRuntimeRunner(artifact, ort_options, name=name)
    elif backend == "tensorrt":
        from resdeploy.engines.tensorrt import TensorRTRunner

        options.pop("threads", None)
        runner = TensorRTRunner(artifact, **options)
    elif backend == "openvino":
        from resdeploy.engines.openvino import OpenVinoRunner

        runner = OpenVinoRunner(artifact, **options)
    else:
        raise InputError(f"unknown backend {backend!r}; use one of auto, {', '.join(BACKENDS)}")
    runner.auto_reason = reason
    return runner


__all__ = ["BACKENDS", "PLACEMENTS", "SETTINGS_BACKENDS", "Runner", "RunnerError", "TensorSpec", "check_settings",
           "open_runner", "resolve_auto", "settings_label"]
