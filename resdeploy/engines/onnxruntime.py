"""ONNX Runtime runner: the embedded default (CPU), with CUDA / TensorRT execution providers when present.

ONNX Runtime falls back to the CPU silently when a GPU provider cannot start; this runner compares the
providers it asked for with ``session.get_providers()`` and refuses (or, with ``allow_fallback``, says so
in ``description`` and ``fallback``) instead of pretending.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from resdeploy.artifact import open_artifact, parse_onnx, read_metadata
from resdeploy.errors import BackendUnavailable, InputError
from resdeploy.engines.base import Runner, TensorSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
SPINNING_KEY = "session.intra_op.allow_spinning"
# The settings a deployment may fix (engines.check_settings): name -> allowed values; DEFAULT_SETTINGS: this runner's.
SETTINGS: dict[str, tuple[object, ...]] = {"spinning": (True, False)}
DEFAULT_SETTINGS: dict[str, object] = {"spinning": True}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(uint8)": "uint8",
               "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


@dataclass
class OrtOptions:
    provider: str = "cpu"  # cpu | cuda | tensorrt: the first choice; the CPU is always appended as ORT's own fallback
    threads: int | None = None  # intra-op threads; None = ORT default (one per physical core)
    optimization: str = "all"  # disable | basic | extended | all (all includes the NCHWc layout fusions on x86)
    optimized_model_path: str | None = None  # save the optimised graph here (for fusion reports)
    allow_fallback: bool = False  # True: accept running on the CPU when the GPU provider did not start
    session_config: dict[str, str] | None = None  # extra session config entries (add_session_config_entry)
    # Intra-op threads spin-wait for work after each run (ORT's default): the next run starts sooner, but a spinning
    # pool burns its cores, which hurts when other work shares them. None = ORT's default (on).
    spinning: bool | None = None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model: str | os.PathLike[str] | bytes, options: OrtOptions | None = None, name: str = "") -> None:
        super().__init__(name)
        self.model = model
        self.options = options or OrtOptions()
        if self.options.provider not in PROVIDERS:
            raise InputError(f"onnxruntime provider {self.options.provider!r} unknown; use one of {', '.join(PROVIDERS)}")
        self.fallback = False
        self.session = None

    def _session_options(self):  # noqa: ANN202 - onnxruntime type
        import onnxruntime as ort

        so = ort.SessionOptions()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if self.options.optimization not in levels:
            raise InputError(f"onnxruntime optimization {self.options.optimization!r} unknown; use one of {', '.join(levels)}")
        so.graph_optimization_level = levels[self.options.optimization]
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
            so.inter_op_num_threads = 1
        if self.options.optimized_model_path:
            so.optimized_model_filepath = str(self.options.optimized_model_path)
        if self.options.spinning is not None:
            so.add_session_config_entry(SPINNING_KEY, "1" if self.options.spinning else "0")
        for k, v in (self.options.session_config or {}).items():
            so.add_session_config_entry(k, v)
        so.log_severity_level = 3
        return so

    def _activate(self) -> None:
        import onnxruntime as ort

        wanted = PROVIDERS[self.options.provider]
        if wanted not in ort.get_available_providers():
            msg = (f"onnxruntime {ort.__version__} has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
                   "install the gpu extra (`pip install 'resdeploy[gpu]'`, which brings onnxruntime-gpu) on a machine with CUDA")
            if not self.options.allow_fallback:
                raise BackendUnavailable(msg)
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        providers = [p for p in providers if p in ort.get_available_providers()]
        model = self.model if isinstance(self.model, bytes) else str(self.model)
        if isinstance(self.model, bytes):
            self.artifact_metadata = read_metadata(parse_onnx(self.model))
        else:  # through the artifact contract first: external data is checked before ONNX Runtime follows it
            self.artifact_metadata = open_artifact(model).metadata
        try:
            self.session = ort.InferenceSession(model, self._session_options(), providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise InputError(f"onnxruntime could not load {model if isinstance(model, str) else 'the model'}: {exc}") from None
        got = self.session.get_providers()
        self.fallback = got[0] != wanted
        if self.fallback and not self.options.allow_fallback:
            self.session = None
            raise BackendUnavailable(f"onnxruntime asked for {wanted} but got {got} (it falls back to the CPU silently); "
                                     "check the CUDA/cuDNN/TensorRT libraries, or pass allow_fallback")
        self._inputs = [TensorSpec(i.name, _ORT_DTYPES.get(i.type, i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
                        for i in self.session.get_inputs()]
        self._outputs = [TensorSpec(o.name, _ORT_DTYPES.get(o.type, o.type), tuple(d if isinstance(d, int) else None for d in o.shape))
                         for o in self.session.get_outputs()]
        self.providers = tuple(got)
        used = self.session_settings()
        self.description = (f"onnxruntime {ort.__version__} {got[0]}" + (f" (fell back from {wanted})" if self.fallback else "")
                            + f", {used['threads'] or 'default'} intra-op threads, spinning {'on' if used['spinning'] else 'off'}")

    def session_settings(self) -> dict[str, int | bool]:
        """What the session runs with, read back from it: intra-op threads (0 = ORT's default) and spinning."""
        if self.session is None:
            raise InputError(f"{self.name}: runner is not active; use `with open_runner(...) as r:` first")
        so = self.session.get_session_options()
        try:
            spin = so.get_session_config_entry(SPINNING_KEY)
        except Exception:  # noqa: BLE001 - ORT raises when the entry was never set: its default, on
            spin = "1"
        return {"threads": int(so.intra_op_num_threads), "spinning": spin != "0"}

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._outputs]
        return dict(zip(names, self.session.run(names, feed)))
