"""One runner contract for every backend (after Polygraphy's runner, without its metaprogramming).

    with open_runner("model.onnx", backend="onnxruntime") as r:
        outputs = r.infer({"input": x})

Resources (sessions, engines, device buffers) are acquired in ``__enter__`` and freed in ``__exit__``.
``infer`` validates every input against the runner's own metadata first, so an error names the tensor,
what came and what was expected, whatever the backend.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from resdeploy.artifact import ArtifactMetadata
from resdeploy.errors import InputError


class RunnerError(InputError):
    """A bad feed or a runner used wrongly (not activated, closed). Exit code 2."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a runner. ``None`` in ``shape`` is a dynamic axis; ``dtype`` is a numpy dtype name."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class Runner(abc.ABC):
    """Base class. Subclasses implement ``_activate``, ``_deactivate``, ``_infer`` and fill the metadata."""

    backend: str = ""

    def __init__(self, name: str = "") -> None:
        self.name = name or self.backend
        self.is_active = False
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        # Batch bounds that the backend accepts (TensorRT profile min/max); None = unbounded.
        self.min_batch: int = 1
        self.max_batch: int | None = None
        self.description: str = self.backend  # what actually runs, e.g. "onnxruntime 1.32 CPUExecutionProvider"
        # What the artifact says about itself (labels, input spec, precision); None when it says nothing (a bare plan).
        self.artifact_metadata: ArtifactMetadata | None = None
        # What actually executes, as the backend reports it after loading (ORT's session.get_providers(), ...).
        self.providers: tuple[str, ...] = ()

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._deactivate()
            finally:
                self.is_active = False

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        self._require_active()
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        self._require_active()
        return list(self._outputs)

    @property
    def on_gpu(self) -> bool:
        """True when the first provider in use is not a CPU one (read after activation)."""
        return bool(self.providers) and "CPU" not in self.providers[0].upper()

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels the artifact carries (index order); () when it carries none."""
        return tuple(self.artifact_metadata.labels) if self.artifact_metadata else ()

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "description": self.description, "providers": list(self.providers),
                "inputs": [s.__dict__ for s in self.inputs], "outputs": [s.__dict__ for s in self.outputs],
                "min_batch": self.min_batch, "max_batch": self.max_batch,
                "artifact": self.artifact_metadata.to_dict() if self.artifact_metadata else None}

    # -- inference -------------------------------------------------------------------------------------
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. ``feed`` maps every input name to an array; returns every output by name."""
        self._require_active()
        self.validate(feed)
        return self._infer(feed)

    def validate(self, feed: dict[str, np.ndarray]) -> None:
        if not isinstance(feed, dict):
            raise RunnerError(f"{self.name}: infer() takes a dict of input name -> numpy array, got {type(feed).__name__}")
        expected = {s.name: s for s in self._inputs}
        unknown = sorted(set(feed) - set(expected))
        missing = sorted(set(expected) - set(feed))
        if unknown or missing:
            raise RunnerError(f"{self.name}: inputs {unknown or ''}{' unknown' if unknown else ''}"
                              f"{'; ' if unknown and missing else ''}{('missing ' + str(missing)) if missing else ''}; "
                              f"expected exactly {', '.join(str(s) for s in self._inputs)}")
        for name, spec in expected.items():
            x = feed[name]
            if not isinstance(x, np.ndarray):
                raise RunnerError(f"{self.name}: input '{name}' is a {type(x).__name__}; expected a numpy array {spec}")
            if x.dtype != np.dtype(spec.dtype):
                raise RunnerError(f"{self.name}: input '{name}' has dtype {x.dtype}; expected {spec.dtype} ({spec})")
            if x.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, x.shape)):
                raise RunnerError(f"{self.name}: input '{name}' has shape {list(x.shape)}; expected {spec}")
            batch = x.shape[0] if x.ndim else 1
            if spec.shape and spec.shape[0] is None and (batch < self.min_batch or (self.max_batch and batch > self.max_batch)):
                raise RunnerError(f"{self.name}: input '{name}' has batch {batch}; this {self.backend} runner accepts "
                                  f"{self.min_batch}..{self.max_batch} (rebuild with a wider profile, or split the batch)")

    def _require_active(self) -> None:
        if not self.is_active:
            raise RunnerError(f"{self.name}: runner is not active; use `with open_runner(...) as r:` or call r.activate()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}{' active' if self.is_active else ''}>"
