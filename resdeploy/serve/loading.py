"""Opening a repository's model versions: runners per instance, the completed config, labels, warm-up, batcher.

:class:`ModelLoader` turns :class:`resdeploy.serve.repository.ModelEntry` objects into :class:`LoadedModel` ones
(a failed load is a LoadedModel with ``error`` set, never an exception) and releases them again. Loading runs in
the default thread pool; everything else here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdeploy.errors import InputError, ResdeployError
from resdeploy.serve.batching import BatcherConfig, DynamicBatcher
from resdeploy.serve.config import ServerConfig, usable_cores
from resdeploy.serve.metrics import ModelStats
from resdeploy.serve.protocol import DATATYPES, IOSpec
from resdeploy.serve.repository import (ModelEntry, backend_options, backend_parameter, check_artifact, check_config,
                                        complete_config, instance_count, io_specs, normalize_config, read_labels,
                                        wants_cpu, warmup_samples)

log = logging.getLogger("resdeploy.serve")


@dataclass
class LoadedModel:
    """One model version as served: its runners (one per instance), batcher, tensors, labels and state."""

    entry: ModelEntry
    stats: ModelStats
    runners: list[Any] = field(default_factory=list)
    batcher: DynamicBatcher | None = None
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""
    ready: bool = False
    error: str | None = None
    unloaded: bool = False  # explicit model control: unloaded (kept for the repository index)

    @property
    def state(self) -> str:
        """Triton's repository-index state: READY, UNAVAILABLE (failed or unloaded) or LOADING."""
        return "READY" if self.ready else "UNAVAILABLE" if self.error or self.unloaded else "LOADING"

    @property
    def reason(self) -> str:
        return self.error or ("unloaded" if self.unloaded else "")

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def max_batch_size(self) -> int:
        return int(self.entry.config.max_batch_size)


def batcher_config(config: Any) -> BatcherConfig:
    """The dynamic batcher's settings from a ModelConfig (no dynamic_batching: one request per execution)."""
    if not config.HasField("dynamic_batching"):
        return BatcherConfig(max_batch_size=config.max_batch_size, dynamic=False)
    db = config.dynamic_batching
    return BatcherConfig(max_batch_size=config.max_batch_size, dynamic=True,
                         preferred_batch_sizes=tuple(int(x) for x in db.preferred_batch_size),
                         max_queue_delay_us=int(db.max_queue_delay_microseconds),
                         max_queue_size=int(db.default_queue_policy.max_queue_size),
                         default_timeout_us=int(db.default_queue_policy.default_timeout_microseconds))


class ModelLoader:
    """Loads and releases model versions under one server's settings (backend, threads, warm-up)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._gpu_count: int | None = None

    @property
    def gpu_count(self) -> int:
        if self._gpu_count is None:
            from resdeploy.device import cuda_device_count

            self._gpu_count = cuda_device_count()
        return self._gpu_count

    def threads(self, entry: ModelEntry) -> int:
        """ONNX Runtime threads per instance of ``entry``: --threads, else the usable cores split over this model's
        instances (and the workers). Like Triton's onnxruntime backend, a model does not share its cores with other
        models: one model is usually the hot one, and at batch 1 two threads cut resnet20's compute from ~0.7 to
        ~0.45 ms."""
        if self.config.threads:
            return self.config.threads
        return max(1, usable_cores() // (instance_count(entry.config) * self.config.workers))

    async def load(self, entries: list[ModelEntry], into: dict[str, dict[str, LoadedModel]]) -> None:
        """Load ``entries`` (one model's versions, or the whole repository) into ``into``, one after another."""
        loop = asyncio.get_running_loop()
        for e in entries:
            if e.error is None:
                try:
                    check_config(e.config, self.gpu_count)
                except InputError as exc:
                    e.error = str(exc)
        for e in entries:
            into.setdefault(e.name, {})[e.version] = LoadedModel(e, ModelStats(e.name, e.version))
        for e in entries:
            m = into[e.name][e.version]
            if e.error:
                m.error = e.error
            else:
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(None, check_artifact, e)
                    threads = self.threads(e)
                    await loop.run_in_executor(None, self._open, m, threads)
                    m.batcher = DynamicBatcher(m.runners, batcher_config(e.config), m.stats, name=e.name)
                except Exception as exc:  # any load failure: report it, keep serving the rest
                    m.error = str(exc) if isinstance(exc, ResdeployError) else f"{type(exc).__name__}: {exc}"
                    self._close_runners(m.name, m.runners, "after the failed load")
                    m.runners = []
                else:
                    m.ready = True
                    log.info("model '%s' version %s ready in %.1f s: %s, %d instance(s) x %d thread(s), %s", e.name,
                             e.version, time.perf_counter() - t0, m.description, len(m.runners), threads, m.batcher.config)
            if m.error:
                log.error("model '%s' version %s failed to load: %s", e.name, e.version, m.error)

    def _open(self, model: LoadedModel, threads: int) -> None:
        """Open one runner per instance, complete/check the config, read labels, warm up. Runs in a thread."""
        from resdeploy.engines import open_runner

        entry = model.entry
        artifact = entry.artifact
        assert artifact is not None
        # Backend choice is the runners' (resolve_auto); the server only says where the config wants it to run.
        placement = "cpu" if wants_cpu(entry.config) or self.config.backend == "onnxruntime" else "auto"
        backend = self.config.backend
        settings: dict[str, Any] = {}
        if backend == "auto" and artifact.suffix == ".onnx" and backend_parameter(entry.config):
            # the CPU engine configuration `resdeploy run` chose by measurement, with its settings (checked on load)
            backend, settings = backend_parameter(entry.config), backend_options(entry.config)
        for _ in range(instance_count(entry.config)):
            r = open_runner(str(artifact), backend=backend, placement=placement, threads=threads, name=entry.name,
                            **settings)
            r.activate()
            model.runners.append(r)
        r0 = model.runners[0]
        complete_config(entry.config, r0.inputs, r0.outputs, r0.max_batch, artifact)
        mbs = model.max_batch_size
        model.inputs = io_specs(entry.config.input, mbs)
        model.outputs = io_specs(entry.config.output, mbs)
        model.labels = read_labels(entry, r0.labels)
        model.description = r0.description
        # Triton's auto-complete of the config (names, kinds, counts and the other defaults /config shows).
        normalize_config(entry.config, artifact, bool(r0.on_gpu), self.gpu_count)
        self._warmup(model)

    def _warmup(self, model: LoadedModel) -> None:
        """The config's model_warmup samples (checked first: an invalid one fails the load, as on Triton), run on
        every instance; without them (and unless --no-warmup) one zero batch of 1 and of max_batch_size."""
        samples = warmup_samples(model.entry, model.inputs)
        for _name, feed, times in samples:
            for r in model.runners:
                for _ in range(times):
                    r.infer(feed)
        if samples or not self.config.warmup:
            return
        mbs = model.max_batch_size
        dims = [s.shape[1:] if mbs else s.shape for s in model.inputs]
        if any(d < 0 for shape in dims for d in shape) or any(s.datatype == "BYTES" for s in model.inputs):
            log.info("model '%s': dynamic non-batch dims or BYTES inputs; skipping warm-up", model.name)
            return
        for batch in sorted({1, mbs} if mbs else {0}):
            lead = (batch,) if mbs else ()
            feed = {s.name: np.zeros(lead + tuple(d), DATATYPES[s.datatype]) for s, d in zip(model.inputs, dims)}
            for r in model.runners:
                r.infer(feed)

    async def release(self, name: str, batcher: DynamicBatcher | None, runners: list[Any], timeout_s: float) -> None:
        """Close a retired version's batcher and runners once its accepted requests are done (``timeout_s`` at most)."""
        loop = asyncio.get_running_loop()
        if batcher is not None:
            await batcher.drain(timeout_s)
            await loop.run_in_executor(None, batcher.close)
        await loop.run_in_executor(None, self._close_runners, name, runners, "on unload")

    @staticmethod
    def close_now(m: LoadedModel) -> None:
        """Shutdown: reject what is still queued and close the runners (blocking)."""
        if m.batcher:
            m.batcher.close()
        ModelLoader._close_runners(m.name, m.runners, "at shutdown")

    @staticmethod
    def _close_runners(name: str, runners: list[Any], when: str) -> None:
        for r in runners:
            try:
                r.deactivate()
            except Exception:  # noqa: BLE001 - one runner must not keep the others open or hide the cause
                log.exception("model '%s': closing a runner %s", name, when)


__all__ = ["LoadedModel", "ModelLoader", "batcher_config"]
