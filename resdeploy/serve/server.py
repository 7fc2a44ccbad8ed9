"""The inference server: KServe v2 / Triton HTTP protocol over a Triton model repository.

    serve("REPO", ServerConfig(host="127.0.0.1", port=8000))   # blocks until SIGTERM/SIGINT, returns 0

Endpoints (Open Inference Protocol v2 REST plus Triton's extensions that its clients use):
``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/<m>[/versions/<v>]`` (metadata),
``.../ready``, ``.../config`` (Triton's JSON form, what perf_analyzer reads), ``.../stats`` and
``/v2/models/stats`` (statistics extension), ``POST .../infer`` (JSON and binary tensors, classification),
``POST /v2/repository/index`` and ``GET /metrics`` (Prometheus, Triton's metric names).

Lifecycle: the port is bound first (live answers at once), models load and warm up in threads, then
``/v2/health/ready`` turns 200. On SIGTERM readiness turns false at once, new requests get 503, requests
already accepted finish (up to ``shutdown_timeout_s``), then the process exits 0 (1 if any request had to be
abandoned at the deadline; the log says how many). See :mod:`resdeploy.serve.connections` for the connection
deadlines (header, body, keep-alive), the connection cap and the drain.

Request bodies may be ``Content-Encoding: gzip`` or ``deflate`` (as tritonclient sends them); the server
inflates them itself, to at most ``max_inflate_ratio`` times the bytes received and never past
``max_body_bytes``, so a compressed bomb costs a 413, not memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import resdeploy
from resdeploy.errors import InputError, ResdeployError
from resdeploy.serve.batching import BatcherConfig, DynamicBatcher
from resdeploy.serve.fastpath import UNKNOWN, WHOLE, Declined, parse_plain_infer, response_bytes
from resdeploy.serve.metrics import ModelStats, prometheus_text, stats_json
from resdeploy.serve.protocol import (BadRequest, InferRequest, IOSpec, NotFound, PayloadTooLarge, RequestTimeout,
                                      ServeError, Unavailable, UnsupportedMediaType, check_inputs, check_outputs,
                                      encode_infer_response, parse_header_length, parse_infer_request, parse_raw_request)
from resdeploy.serve.repository import (ModelEntry, backend_parameter, check_artifact, check_config, complete_config,
                                        config_to_json, instance_count, io_specs, normalize_config, read_labels,
                                        repository_models, scan_model, scan_repository, wants_cpu, warmup_samples)

log = logging.getLogger("resdeploy.serve")

DRAIN_GRACE_S = 0.3  # after SIGTERM, the listener stays open at least this long, answering 503 (not refusing)
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository"]
MODEL_CONTROL_MODES = ("none", "explicit")
GRPC_TRANSPORTS = ("native", "grpcio")
CONTROL_OFF = ("explicit model load / unload is not allowed in model control mode none; start the server with "
               "--model-control-mode explicit to load and unload models")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to serve other machines
    port: int = 8000  # Triton's HTTP port
    max_body_bytes: int = 64 << 20  # larger request bodies get 413 before they are read
    request_timeout_s: float = 30.0  # a request's deadline when neither it nor the model config gives one
    shutdown_timeout_s: float = 30.0  # how long SIGTERM waits for accepted requests to finish
    threads: int | None = None  # ONNX Runtime intra-op threads per instance; None = usable cores / the model's instances
    backend: str = "auto"  # auto | onnxruntime | tensorrt: what runs the artifacts (auto: by file type and device)
    strict_readiness: bool = True  # like Triton: ready only when every model loaded; False = ready once loading ends
    warmup: bool = True  # one inference at batch 1 and max batch per instance before ready
    header_timeout_s: float = 10.0  # a connection must deliver a complete request head within this (else 408, closed)
    body_timeout_s: float = 60.0  # and its body within this once the head is in (else 408)
    keepalive_timeout_s: float = 75.0  # idle keep-alive connections are closed after this
    max_connections: int = 1024  # open connections; more are answered 503 and closed
    max_inflate_ratio: float = 32.0  # a gzip/deflate body may inflate to at most this many times its size
    follow_symlinks: bool = False  # True: repository symlinks that leave a model's folder are followed (logged)
    grpc_port: int | None = 8001  # Triton's gRPC port (0 = any free port, printed in the log); None = no gRPC
    model_control_mode: str = "none"  # none: every model at start, no load/unload (503); explicit: load/unload work
    load_models: tuple[str, ...] = ()  # explicit mode: the models loaded at start ("*" = all), like --load-model
    workers: int = 1  # server processes sharing the ports (SO_REUSEPORT), each with its own models and batchers
    reuse_port: bool = False  # set in each worker of --workers N (not a user setting)
    http_fast_path: bool = True  # answer whole plain infer requests without aiohttp (resdeploy/serve/fastpath.py)
    grpc_transport: str = "native"  # native: resdeploy's HTTP/2 (resdeploy/serve/grpc_native.py); grpcio: grpc.aio

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise InputError(f"model control mode {self.model_control_mode!r} is unknown; expected one of "
                             f"{', '.join(MODEL_CONTROL_MODES)}")
        if self.load_models and self.model_control_mode != "explicit":
            raise InputError("--load-model needs --model-control-mode explicit (in mode none every model loads at start)")
        if self.workers < 1:
            raise InputError(f"--workers is {self.workers}; give at least 1")
        if self.grpc_transport not in GRPC_TRANSPORTS:
            raise InputError(f"gRPC transport {self.grpc_transport!r} is unknown; expected one of {', '.join(GRPC_TRANSPORTS)}")
        if self.workers > 1 and self.model_control_mode == "explicit":
            raise InputError("--workers > 1 needs --model-control-mode none: a load/unload request reaches one worker "
                             "process only, so the workers would serve different models")


@dataclass
class LoadedModel:
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


def _batcher_config(config: Any) -> BatcherConfig:
    if not config.HasField("dynamic_batching"):
        return BatcherConfig(max_batch_size=config.max_batch_size, dynamic=False)
    db = config.dynamic_batching
    return BatcherConfig(max_batch_size=config.max_batch_size, dynamic=True,
                         preferred_batch_sizes=tuple(int(x) for x in db.preferred_batch_size),
                         max_queue_delay_us=int(db.max_queue_delay_microseconds),
                         max_queue_size=int(db.default_queue_policy.max_queue_size),
                         default_timeout_us=int(db.default_queue_policy.default_timeout_microseconds))


class ModelServer:
    """Holds the models and the aiohttp application; ``run()`` serves until stopped."""

    def __init__(self, repo: str | Path, config: ServerConfig | None = None) -> None:
        self.repo = Path(repo)
        self.config = config or ServerConfig()
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.loading = True
        self.draining = False
        self.inflight = 0
        self.http_requests = 0  # requests aiohttp routed (every path)
        self.fast_answered = 0  # infer requests the HTTP fast path answered instead
        self._stop = asyncio.Event()
        self.port: int | None = None
        self.grpc_port: int | None = None
        self.guard: Any = None  # the ConnectionGuard, once run() listens
        self.grpc: Any = None  # the GrpcService, once run() listens (grpc_port not None)
        self._gpu_count: int | None = None
        self._control = asyncio.Lock()  # one load/unload at a time
        self._unloading: set[asyncio.Task] = set()

    # -- loading ---------------------------------------------------------------------------------------
    def _threads(self, entry: ModelEntry) -> int:
        """ONNX Runtime threads per instance of ``entry``: --threads, else the usable cores split over this model's
        instances (and the workers). Like Triton's onnxruntime backend, which gives every session ONNX Runtime's
        default (all cores), a model does not share its cores with other models: one model is usually the hot
        one, and at batch 1 two threads cut resnet20's compute from ~0.7 to ~0.45 ms (issue 15). Splitting over
        every model's instances made a repository with two models run each on one thread."""
        if self.config.threads:
            return self.config.threads
        return max(1, usable_cores() // (instance_count(entry.config) * self.config.workers))

    def _load_one(self, model: LoadedModel, threads: int) -> None:
        """Open one runner per instance, complete/check the config, read labels, warm up. Runs in a thread."""
        from resdeploy.serve.runners import open_runner

        entry = model.entry
        artifact = entry.artifact
        assert artifact is not None
        # Backend choice is the runners' (resolve_auto); the server only says where the config wants it to run.
        placement = "cpu" if wants_cpu(entry.config) or self.config.backend == "onnxruntime" else "auto"
        backend = self.config.backend
        if backend == "auto" and artifact.suffix == ".onnx":
            backend = backend_parameter(entry.config) or backend  # the CPU engine `resdeploy run` chose by measurement
        for _ in range(instance_count(entry.config)):
            r = open_runner(str(artifact), backend=backend, placement=placement, threads=threads, name=entry.name)
            r.activate()
            model.runners.append(r)
        r0 = model.runners[0]
        complete_config(entry.config, r0.inputs, r0.outputs, r0.max_batch, artifact)
        mbs = model.max_batch_size
        model.inputs = io_specs(entry.config.input, mbs)
        model.outputs = io_specs(entry.config.output, mbs)
        model.labels = read_labels(entry, r0.labels)
        model.description = r0.description
        self._complete_instance_groups(entry, r0)
        self._warmup(model)

    @property
    def gpu_count(self) -> int:
        if self._gpu_count is None:
            from resdeploy.device import cuda_device_count

            self._gpu_count = cuda_device_count()
        return self._gpu_count

    def _complete_instance_groups(self, entry: ModelEntry, runner: Any) -> None:
        """Triton's auto-complete of the config (names, kinds, counts and the other defaults /config shows)."""
        assert entry.artifact is not None
        normalize_config(entry.config, entry.artifact, bool(runner.on_gpu), self.gpu_count)

    def _warmup(self, model: LoadedModel) -> None:
        """The config's model_warmup samples (checked first: an invalid one fails the load, as on Triton), run on
        every instance; without them (and unless --no-warmup) one zero batch of 1 and of max_batch_size."""
        from resdeploy.serve.protocol import DATATYPES

        samples = warmup_samples(model.entry, model.inputs)
        for name, feed, times in samples:
            for r in model.runners:
                for _ in range(times):
                    r.infer(feed)
        if samples or not self.config.warmup:
            return
        mbs = model.max_batch_size
        if any(d < 0 for s in model.inputs for d in (s.shape[1:] if mbs else s.shape)) or any(s.datatype == "BYTES" for s in model.inputs):
            log.info("model '%s': dynamic non-batch dims or BYTES inputs; skipping warm-up", model.name)
            return
        for batch in sorted({1, mbs} if mbs else {0}):
            feed = {s.name: np.zeros(((batch,) if mbs else ()) + tuple(s.shape[1:] if mbs else s.shape), DATATYPES[s.datatype])
                    for s in model.inputs}
            for r in model.runners:
                r.infer(feed)

    async def load_models(self) -> None:
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(None, lambda: scan_repository(self.repo, follow_symlinks=self.config.follow_symlinks))
        if self.config.model_control_mode == "explicit":
            wanted = set(self.config.load_models)
            if "*" not in wanted:
                found = {e.name for e in entries}
                for name in sorted(wanted - found):
                    log.error("--load-model %s: the repository %s has no model folder of that name", name, self.repo)
                entries = [e for e in entries if e.name in wanted]
        await self._load_entries(entries)
        self.loading = False

    async def _load_entries(self, entries: list[ModelEntry], into: dict[str, dict[str, LoadedModel]] | None = None) -> None:
        """Load ``entries`` (one model's versions, or the whole repository) into ``into`` (default: the served set)."""
        loop = asyncio.get_running_loop()
        into = self.models if into is None else into
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
                    threads = self._threads(e)
                    await loop.run_in_executor(None, self._load_one, m, threads)
                    m.batcher = DynamicBatcher(m.runners, _batcher_config(e.config), m.stats, name=e.name)
                except Exception as exc:  # any load failure: report it, keep serving the rest
                    m.error = str(exc) if isinstance(exc, ResdeployError) else f"{type(exc).__name__}: {exc}"
                    for r in m.runners:
                        try:
                            r.deactivate()
                        except Exception:  # noqa: BLE001 - a half-opened runner must not hide the load error
                            log.exception("model '%s': closing a runner after the failed load", e.name)
                    m.runners = []
                else:
                    m.ready = True
                    log.info("model '%s' version %s ready in %.1f s: %s, %d instance(s) x %d thread(s), %s", e.name,
                             e.version, time.perf_counter() - t0, m.description, len(m.runners), threads, m.batcher.config)
            if m.error:
                log.error("model '%s' version %s failed to load: %s", e.name, e.version, m.error)

    @property
    def ready(self) -> bool:
        if self.loading or self.draining:
            return False
        all_models = [m for vs in self.models.values() for m in vs.values() if not m.unloaded]
        return all(m.ready for m in all_models) if self.config.strict_readiness else True

    # -- lookup ----------------------------------------------------------------------------------------
    def lookup(self, name: str, version: str | None) -> LoadedModel:
        """The model version (any state); NotFound for an unknown model or version."""
        versions = self.models.get(name)
        if version in (None, "") and versions is not None and len(versions) == 1:
            (m,) = versions.values()  # the common case (one version), without the search below on every request
            return m
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model '{name[:200]}'; this server has: {known}")
        if version in (None, ""):  # like Triton: the highest version that is ready, else the highest
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions, key=int)]
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version[:40]}'; versions: {', '.join(sorted(versions, key=int))}")
        return versions[version]

    def available(self, name: str, version: str | None) -> LoadedModel:
        """A version that serves (metadata, config, infer). Like Triton, a model that failed to load or was unloaded
        is unknown (NotFound, with the reason); one still loading at start is Unavailable (retry)."""
        m = self.lookup(name, version)
        if m.ready:
            return m
        if m.state == "LOADING":
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready yet: loading; retry shortly")
        if version in (None, ""):
            reasons = "; ".join(f"version {v}: {x.reason}" for v, x in sorted(self.models[name].items(), key=lambda kv: int(kv[0])))
            raise NotFound(f"unknown model: '{name}' has no available versions ({reasons})")
        raise NotFound(f"unknown model: '{name}' version {version} is not available ({m.reason})")

    # -- the protocol, transport-neutral (HTTP handlers below; gRPC in resdeploy.serve.grpc_service) -------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "resdeploy", "version": resdeploy.__version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        """(ready, why not). Unknown models and versions are simply not ready, as on Triton."""
        try:
            m = self.lookup(name, version)
        except NotFound as exc:
            return False, str(exc)
        if self.draining:
            return False, "server is shutting down"
        return m.ready, "" if m.ready else (m.reason or "loading")

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.available(name, version)
        return {"name": m.name, "versions": [v for v in m.entry.versions_available or [m.version]
                                             if self.models[m.name].get(v) is not None and self.models[m.name][v].ready],
                "platform": m.entry.config.platform or m.entry.config.backend,
                "inputs": [s.to_json() for s in m.inputs], "outputs": [s.to_json() for s in m.outputs]}

    def stats(self, name: str | None, version: str | None) -> list[ModelStats]:
        """Statistics of the available versions. Like Triton, an unknown or unavailable model or version is a
        BadRequest (400 / INVALID_ARGUMENT), and the all-models form lists available versions only."""
        if not name:
            return [m.stats for vs in self.models.values() for m in vs.values() if m.ready]
        versions = self.models.get(name, {})
        if version:
            m = versions.get(version)
            if m is None or not m.ready:
                raise BadRequest(f"requested model version is not available for model '{name[:200]}' (version "
                                 f"{version[:40]} {'is ' + m.state if m else 'is unknown'}); see the repository index")
            return [m.stats]
        ready = [m.stats for _, m in sorted(versions.items(), key=lambda kv: int(kv[0])) if m.ready]
        if not ready:
            raise BadRequest(f"requested model '{name[:200]}' is not available "
                             f"({'no version is ready' if versions else 'unknown model'}); see the repository index")
        return ready

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        names = set(self.models)
        if self.config.model_control_mode == "explicit":
            try:
                names |= set(repository_models(self.repo))
            except InputError:
                pass
        for name in sorted(names):
            vs = self.models.get(name)
            if not vs:
                if not ready_only:
                    rows.append({"name": name})  # in the repository, never loaded (explicit model control)
                continue
            for v, m in sorted(vs.items(), key=lambda kv: int(kv[0])):
                if ready_only and not m.ready:
                    continue
                row = {"name": m.name, "version": m.version, "state": m.state}
                if m.reason:
                    row["reason"] = m.reason
                rows.append(row)
        return rows

    def infer_target(self, name: str, version: str | None) -> LoadedModel:
        m = self.available(name, version)
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if m.batcher is None:
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready: {m.error or 'loading'}")
        return m

    async def execute(self, m: LoadedModel, req: InferRequest, t0_ns: int, encode: Any, deadline_us: int | None = None) -> Any:
        """Validate ``req`` against ``m``, run it through the batcher, return ``encode(outputs)``.

        Like Triton, only requests past validation count in the statistics: a request refused here for its
        inputs or outputs is neither a success nor a failure of the model."""
        batch = check_inputs(req, m.inputs, m.name, m.max_batch_size)
        check_outputs(req, [s.name for s in m.outputs], m.name)
        assert m.batcher is not None
        try:
            outputs = await m.batcher.infer(req.inputs, batch, self._timeout_us(m, req, deadline_us))
            result = encode(outputs)
        except ServeError as exc:
            _record_failure(m, t0_ns, exc)
            raise
        m.stats.record_success(time.perf_counter_ns() - t0_ns)
        return result

    def _timeout_us(self, m: LoadedModel, req: InferRequest, deadline_us: int | None = None) -> int:
        """The request's own timeout, else the model's default, else --request-timeout; within a gRPC deadline."""
        assert m.batcher is not None
        timeout_us = req.timeout_us or m.batcher.config.default_timeout_us or int(self.config.request_timeout_s * 1e6)
        return timeout_us if deadline_us is None else max(1, min(timeout_us, deadline_us))

    def fast_infer(self, handler: Any, data: bytes) -> Declined | None:
        """The HTTP fast path (resdeploy/serve/fastpath.py): answer ``data`` if it is one whole plain infer request
        that passes every check (None), else say why not; nothing is consumed then and aiohttp answers it,
        refusals included."""
        if self.draining:
            return UNKNOWN  # the drain's 503 and close are aiohttp's
        plain = parse_plain_infer(data, self.config.max_body_bytes)
        if isinstance(plain, Declined):
            return plain
        t0 = time.perf_counter_ns()
        try:
            m = self.infer_target(plain.model, plain.version)
            hlen = parse_header_length(plain.header_length, len(plain.body))
            if hlen == 0:  # a raw binary request: rare, left to the route
                return WHOLE
            req = parse_infer_request(plain.body, hlen)
            batch = check_inputs(req, m.inputs, m.name, m.max_batch_size)
            check_outputs(req, [s.name for s in m.outputs], m.name)
        except ServeError:
            return WHOLE
        assert m.batcher is not None
        transport = handler.transport
        handler.fast_started(transport)
        self.inflight += 1
        self.fast_answered += 1

        def answer(status: int, content_type: str, body: bytes, header_length: int | None = None,
                   close: bool = False) -> None:
            self.inflight -= 1
            close = close or self.draining  # the client must not reuse a connection that is about to close
            if not transport.is_closing():
                transport.write(response_bytes(status, content_type, body, header_length, close))
                if close:
                    transport.close()
            handler.fast_finished(transport)

        def done(outputs: dict[str, np.ndarray] | None, exc: BaseException | None) -> None:
            if exc is None:
                try:
                    enc = encode_infer_response(m.name, m.version, req, outputs, m.labels, batched=m.max_batch_size > 0)
                except ServeError as e:
                    exc = e
                else:
                    m.stats.record_success(time.perf_counter_ns() - t0)
                    if enc.header_length is None:
                        answer(200, "application/json", enc.body)
                    else:
                        answer(200, "application/octet-stream", enc.body, enc.header_length)
                    return
            if isinstance(exc, ServeError):
                _record_failure(m, t0, exc)
                answer(exc.status, "application/json", _json_bytes({"error": str(exc)}))
            elif isinstance(exc, asyncio.CancelledError):
                # Nothing cancels a fast-path request (its deadline ends as Unavailable, a closing batcher sets an
                # error); answered anyway, since this connection reads nothing until it is.
                gone = f"model '{m.name}': request cancelled before it ran; retry"
                answer(503, "application/json", _json_bytes({"error": gone}), close=True)
            else:  # a bug must not take the server down; the client gets the reason (as the route's middleware)
                log.error("internal error on fast-path infer to %s", m.name, exc_info=exc)
                answer(500, "application/json", _json_bytes({"error": f"internal server error: {type(exc).__name__}: {exc}"}))

        try:
            m.batcher.call(req.inputs, batch, self._timeout_us(m, req), done)
        except ServeError as exc:  # a full queue or a model shutting down: refused before it was queued
            done(None, exc)
        return None

    # -- model control (explicit mode) -----------------------------------------------------------------
    async def load(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Load (or reload) one model from the repository, as Triton's explicit model control: the versions its
        policy selects replace the ones served once they are ready; on failure a served model keeps serving."""
        if self.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        if self.draining:
            raise Unavailable("server is shutting down; load the model on another replica")
        override = _config_override(name, parameters or {})
        async with self._control:
            loop = asyncio.get_running_loop()
            try:
                entries = await loop.run_in_executor(None, lambda: scan_model(
                    self.repo, name, follow_symlinks=self.config.follow_symlinks, config=override))
            except InputError as exc:
                raise BadRequest(str(exc)) from None
            staged: dict[str, dict[str, LoadedModel]] = {}
            await self._load_entries(entries, staged)
            new = staged.get(name, {})
            failed = [m for m in new.values() if not m.ready]
            old = self.models.get(name, {})
            if failed and any(m.ready for m in old.values()):
                for m in new.values():
                    self._retire(m)
                raise BadRequest(f"failed to load '{name}': {failed[0].reason}; the versions already served stay")
            self.models[name] = new
            for m in old.values():
                self._retire(m)
            if failed:
                raise BadRequest(f"failed to load '{name}': {failed[0].reason}")
            log.info("model '%s' loaded (versions %s)", name, ", ".join(sorted(new, key=int)))

    async def unload(self, name: str) -> None:
        """Unload every version of ``name``: new requests get 'unknown model'; those already accepted finish first.
        Unloading a model that is not loaded succeeds, as on Triton."""
        if self.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        if self.draining:
            raise Unavailable("server is shutting down")
        async with self._control:
            for m in self.models.get(name, {}).values():
                if not m.unloaded:
                    self._retire(m)
                    m.ready, m.unloaded, m.error = False, True, None
            if name in self.models:
                log.info("model '%s' unloaded", name)

    def _retire(self, m: LoadedModel) -> None:
        """Stop serving ``m`` and release it once its accepted requests are done (in the background)."""
        m.ready = False
        batcher, runners = m.batcher, m.runners
        m.batcher, m.runners = None, []

        async def release() -> None:
            loop = asyncio.get_running_loop()
            if batcher is not None:
                await batcher.drain(self.config.shutdown_timeout_s)
                await loop.run_in_executor(None, batcher.close)
            for r in runners:
                try:
                    await loop.run_in_executor(None, r.deactivate)
                except Exception:  # noqa: BLE001 - one runner must not keep the others open
                    log.exception("model '%s': closing a runner on unload", m.name)

        task = asyncio.ensure_future(release())
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    # -- handlers --------------------------------------------------------------------------------------
    def app(self) -> Any:
        from aiohttp import web

        # One middleware (not two): each aiohttp middleware layer costs a coroutine and a wrapper per request.
        @web.middleware
        async def guarded(request: web.Request, handler: Any) -> web.StreamResponse:
            # The guard reads each connection's phase: a request being handled is never closed by the drain.
            guard = self.guard
            self.http_requests += 1
            if guard is not None:
                guard.request_started(request.protocol)
            try:
                try:
                    resp = await handler(request)
                except ServeError as exc:
                    # 408/413: the body was not (fully) read, so the connection cannot carry another request.
                    resp = _json_error(exc.status, str(exc), close=self.draining or exc.status in (408, 413))
                except web.HTTPRequestEntityTooLarge:
                    resp = _json_error(413, f"request body exceeds {self.config.max_body_bytes} bytes (--max-body-mb); "
                                            "send smaller batches")
                except web.HTTPException as exc:
                    if exc.status < 400:
                        raise
                    msg = (f"no route for {request.method} {request.path}; see /v2 for the protocol"
                           if exc.status in (404, 405) else exc.reason)
                    resp = _json_error(exc.status, msg)
                except Exception as exc:  # a bug must not take the server down; the client gets the reason
                    log.exception("internal error on %s %s", request.method, request.path)
                    resp = _json_error(500, f"internal server error: {type(exc).__name__}: {exc}")
                if self.draining:  # the client must not reuse a connection that is about to close
                    resp.force_close()
                return resp
            finally:
                if guard is not None:
                    guard.request_finished(request.protocol)

        app = web.Application(middlewares=[guarded], client_max_size=self.config.max_body_bytes)
        r = app.router
        r.add_get("/v2", self.h_server_metadata)
        r.add_get("/v2/health/live", self.h_live)
        r.add_get("/v2/health/ready", self.h_ready)
        r.add_get("/v2/models/stats", self.h_stats)
        r.add_post("/v2/repository/index", self.h_index)
        r.add_post("/v2/repository/models/{model}/load", self.h_load)
        r.add_post("/v2/repository/models/{model}/unload", self.h_unload)
        r.add_get("/metrics", self.h_metrics)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.h_model_metadata)
            r.add_get(prefix + "/ready", self.h_model_ready)
            r.add_get(prefix + "/config", self.h_model_config)
            r.add_get(prefix + "/stats", self.h_stats)
            r.add_post(prefix + "/infer", self.h_infer)
        return app

    async def h_server_metadata(self, request: Any) -> Any:
        return _json(self.server_metadata())

    async def h_live(self, request: Any) -> Any:
        return _json({"live": True})

    async def h_ready(self, request: Any) -> Any:
        # Triton answers 400 when not ready; while draining, 503 (retry elsewhere), as every request then gets.
        ready = self.ready
        return _json({"ready": ready}, status=200 if ready else 503 if self.draining else 400)

    async def h_model_metadata(self, request: Any) -> Any:
        return _json(self.model_metadata(request.match_info["model"], request.match_info.get("version")))

    async def h_model_ready(self, request: Any) -> Any:
        name, version = request.match_info["model"], request.match_info.get("version")
        ready, why = self.model_ready(name, version)
        body: dict[str, Any] = {"name": name, "version": version or "", "ready": ready}
        if not ready:
            body["error"] = why
        return _json(body, status=200 if ready else 503 if self.draining else 400)

    async def h_model_config(self, request: Any) -> Any:
        m = self.available(request.match_info["model"], request.match_info.get("version"))
        return _json(config_to_json(m.entry.config))

    async def h_stats(self, request: Any) -> Any:
        return _json(stats_json(self.stats(request.match_info.get("model"), request.match_info.get("version"))))

    async def h_index(self, request: Any) -> Any:
        body = await self._read_body(request)
        ready_only = False
        if body.strip():
            try:
                obj = json.loads(body)
            except ValueError as exc:
                raise BadRequest(f"repository index request is not JSON ({exc}); send {{}} or {{\"ready\": true}}") from None
            ready_only = isinstance(obj, dict) and obj.get("ready") is True
        return _json(self.index(ready_only))

    async def h_load(self, request: Any) -> Any:
        params = await self._control_params(request)
        await self.load(request.match_info["model"], params)
        return _json({})

    async def h_unload(self, request: Any) -> Any:
        await self._control_params(request)
        await self.unload(request.match_info["model"])
        return _json({})

    async def _control_params(self, request: Any) -> dict[str, Any]:
        if self.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        body = await self._read_body(request)
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"load/unload request is not JSON ({exc}); send {{}} or {{\"parameters\": {{...}}}}") from None
        params = obj.get("parameters") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(params if params is not None else {}, dict):
            raise BadRequest("load/unload request must be a JSON object with an optional 'parameters' object")
        return params or {}

    async def h_metrics(self, request: Any) -> Any:
        from aiohttp import web

        text = prometheus_text([m.stats for vs in self.models.values() for m in vs.values()])
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def h_infer(self, request: Any) -> Any:
        from aiohttp import web

        t0 = time.perf_counter_ns()
        m = self.infer_target(request.match_info["model"], request.match_info.get("version"))
        self.inflight += 1
        try:
            if request.content_length is not None and request.content_length > self.config.max_body_bytes:
                raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is "
                                      f"{self.config.max_body_bytes} (--max-body-mb); send smaller batches")
            body = await self._read_body(request)
            hlen = parse_header_length(request.headers.get("Inference-Header-Content-Length"), len(body))
            if hlen == 0:  # Triton's raw binary request: the body is the model's one input
                if len(m.inputs) != 1:
                    raise BadRequest(f"model '{m.name}' has {len(m.inputs)} inputs; a raw binary request "
                                     "(Inference-Header-Content-Length: 0) needs a model with exactly one. Send a JSON header")
                req = parse_raw_request(body, m.inputs[0], m.name, m.max_batch_size)
            else:
                req = parse_infer_request(body, hlen)
            enc = await self.execute(m, req, t0, lambda outputs: encode_infer_response(
                m.name, m.version, req, outputs, m.labels, batched=m.max_batch_size > 0))
        finally:
            self.inflight -= 1
        if enc.header_length is None:
            resp = web.Response(body=enc.body, content_type="application/json")
        else:
            resp = web.Response(body=enc.body, content_type="application/octet-stream",
                                headers={"Inference-Header-Content-Length": str(enc.header_length)})
        return resp

    async def _read_body(self, request: Any) -> bytes:
        """The request body, inflated when gzip/deflate, within the body deadline and the size limits."""
        from aiohttp import web

        limit = self.config.max_body_bytes
        try:
            if request.content.is_eof():  # the whole body came with the head (small requests): nothing to wait for
                body = await request.read()
            else:
                async with asyncio.timeout(self.config.body_timeout_s):  # no extra task, unlike wait_for
                    body = await request.read()
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {self.config.body_timeout_s} s (--body-timeout); "
                                 "send the body promptly after the headers") from None
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes (--max-body-mb); send smaller batches") from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or "
                                       "an uncompressed body")
        # Inflate at most ratio x the received size (and never past the body limit) before giving up: a 64 KiB
        # gzip bomb must cost about 2 MiB, not the 64 MiB (or gigabytes) it expands to.
        cap = int(min(limit, max(64 << 10, self.config.max_inflate_ratio * len(body))))
        d = zlib.decompressobj(wbits=47)  # 32 + 15: a zlib or gzip header, detected (tritonclient sends either)
        try:
            out = d.decompress(body, cap + 1)
        except zlib.error as exc:
            raise BadRequest(f"request body is not valid {encoding} data ({exc}); compress it with zlib/gzip or "
                             "drop the Content-Encoding header") from None
        if len(out) > cap:
            raise PayloadTooLarge(f"{encoding} request body of {len(body)} bytes inflates past {cap} bytes (at most "
                                  f"{self.config.max_inflate_ratio:g}x its size, --max-inflate-ratio, and the "
                                  f"{limit}-byte body limit, --max-body-mb); send it uncompressed or in smaller batches")
        if not d.eof or d.unused_data:
            raise BadRequest(f"{encoding} request body is truncated or has trailing bytes; send one complete stream")
        return out

    # -- lifecycle -------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM/SIGINT: readiness false at once; ``run`` then drains and exits."""
        if not self.draining:
            self.draining = True
            log.info("shutdown requested: not ready; draining %d in-flight request(s)", self.inflight)
        self._stop.set()

    async def run(self, on_ready: Any = None) -> int:
        from aiohttp import web

        from resdeploy.serve.connections import ConnectionGuard, ConnectionLimits

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals (Windows)
                pass
        c = self.config
        self.guard = ConnectionGuard(ConnectionLimits(c.header_timeout_s, c.body_timeout_s, c.keepalive_timeout_s,
                                                      c.max_connections))
        if c.http_fast_path:
            self.guard.fast = self.fast_infer
        if c.reuse_port:
            # A worker of --workers N opens the shared ports only once its models are loaded: a connection the
            # kernel hands to it must not find it still loading while another worker already answers ready.
            await self.load_models()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            self.port = await self.guard.listen(runner, c.host, c.port, reuse_port=c.reuse_port)
        except OSError as exc:
            await runner.cleanup()
            raise InputError(f"cannot listen on {c.host}:{c.port}: {exc}; pick a free port with --port") from None
        log.info("listening on http://%s:%d (live; loading models from %s); limits: header %gs, body %gs, keep-alive "
                 "%gs, %d connections, body %d bytes (inflated at most %gx); repository symlinks %s", c.host,
                 self.port, self.repo, c.header_timeout_s, c.body_timeout_s, c.keepalive_timeout_s, c.max_connections,
                 c.max_body_bytes, c.max_inflate_ratio,
                 "FOLLOWED outside model folders (--follow-symlinks)" if c.follow_symlinks else "kept inside model folders")
        if c.grpc_port is not None:
            # grpc and the HTTP/2 code are imported only when gRPC is served
            if c.grpc_transport == "native":
                from resdeploy.serve.grpc_native import NativeGrpc as Service
            else:
                from resdeploy.serve.grpc_service import GrpcService as Service

            self.grpc = Service(self)
            try:
                self.grpc_port = await self.grpc.start(c.host, c.grpc_port)
            except InputError:
                await runner.cleanup()
                raise
            log.info("listening on grpc://%s:%d (KServe v2 GRPCInferenceService on %s; messages up to %d bytes, %d RPCs "
                     "at once)", c.host, self.grpc_port, "resdeploy's HTTP/2" if c.grpc_transport == "native" else "grpc.aio",
                     c.max_body_bytes, c.max_connections)
        log.info("model control mode %s%s", c.model_control_mode,
                 f" (loading at start: {', '.join(c.load_models) or 'none'})" if c.model_control_mode == "explicit" else "")
        load = asyncio.ensure_future(self.load_models() if not c.reuse_port else asyncio.sleep(0))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()
            n_ok = sum(m.ready for vs in self.models.values() for m in vs.values())
            n_all = sum(len(vs) for vs in self.models.values())
            log.info("%d of %d model version(s) loaded; server %s on http://%s:%d", n_ok, n_all,
                     "ready" if self.ready else "NOT ready (a model failed to load)", c.host, self.port)
            if on_ready:
                on_ready(self)
        await stop
        # The drain: requests in progress finish; what arrives meanwhile gets 503 + Connection: close; then the
        # listener closes, connections accepted up to then are answered, and the rest are closed.
        deadline = time.monotonic() + c.shutdown_timeout_s
        grpc_drain = asyncio.ensure_future(self.grpc.drain(deadline)) if self.grpc is not None else None
        report = await self.guard.drain(deadline, DRAIN_GRACE_S)
        grpc_abandoned = await grpc_drain if grpc_drain is not None else 0
        await runner.cleanup()
        if self._unloading:
            await asyncio.wait(list(self._unloading), timeout=max(0.1, deadline - time.monotonic()))
        if not load.done():
            load.cancel()
        for vs in self.models.values():
            for m in vs.values():
                if m.batcher:
                    m.batcher.close()
                for r in m.runners:
                    r.deactivate()
        log.info("shutdown: %d request(s) in progress at the signal; %d answered during the drain (503 for those that "
                 "arrived after it began); %d abandoned at the %gs deadline; %d idle connection(s) closed; listener "
                 "closed after %.2f s; exiting after %.2f s", report.in_progress_at_signal, report.answered_during_drain,
                 report.abandoned, c.shutdown_timeout_s, report.idle_closed, report.listening_s, report.seconds)
        if self.grpc is not None:
            log.info("shutdown: gRPC stopped; %d RPC(s) abandoned at the deadline", grpc_abandoned)
        log.info("shutdown: %d HTTP request(s) served, %d of them on the fast path", self.http_requests + self.fast_answered,
                 self.fast_answered)
        return 0 if report.abandoned == 0 and grpc_abandoned == 0 else 1


def _config_override(name: str, params: dict[str, Any]) -> Any:
    """A load request's ``config`` parameter (ModelConfig JSON, as Triton takes it) as a ModelConfig, or None."""
    from google.protobuf import json_format

    files = sorted(k for k in params if isinstance(k, str) and k.startswith("file:"))
    if files:
        raise BadRequest(f"load parameters {files[:3]} carry model files in the request; resdeploy loads models only "
                         "from the repository folder. Put the files in the repository and load the model by name")
    text = params.get("config")
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadRequest(f"load parameter 'config' of '{name}' must be a string of ModelConfig JSON")
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        return json_format.Parse(text, pb.ModelConfig())
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise BadRequest(f"load parameter 'config' of '{name}' is not ModelConfig JSON: {str(exc)[:300]}; "
                         "send the model configuration as /v2/models/<m>/config prints it") from None


def _json_bytes(obj: Any) -> bytes:
    # allow_nan=False: responses are RFC 8259 JSON; a NaN reaching here is a bug that must not reach clients.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _json(obj: Any, status: int = 200) -> Any:
    from aiohttp import web

    return web.Response(body=_json_bytes(obj), status=status, content_type="application/json")


def _record_failure(m: LoadedModel, t0_ns: int, exc: ServeError) -> None:
    m.stats.record_failure(time.perf_counter_ns() - t0_ns,
                           "REJECTED" if isinstance(exc, Unavailable) else "BACKEND" if exc.status >= 500 else "OTHER")


def _json_error(status: int, message: str, close: bool = False) -> Any:
    resp = _json({"error": message}, status=status)
    if close:
        resp.force_close()
    return resp


def serve(repo: str | Path, config: ServerConfig | None = None) -> int:
    """Serve ``repo`` until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    config = config or ServerConfig()
    if not Path(repo).is_dir():
        raise InputError(f"model repository {repo} is not a folder; make one with `resdeploy repo MODEL.onnx --out {repo}`")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.workers > 1:
        return _serve_workers(Path(repo), config)
    return asyncio.run(ModelServer(repo, config).run())


# -- several worker processes on one port ---------------------------------------------------------------------
WORKER_ENV = "RESDEPLOY_SERVE_WORKER"


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_workers(value: str | int, model_control_mode: str = "none") -> int:
    """``--workers``: a count, or ``auto`` = one per core this process may run on (``sched_getaffinity``, so a
    container's or taskset's limit counts, not the host's cores). One process is one event loop under one GIL, so
    it uses about one core of Python; Triton spreads over every core by default. Explicit model control keeps 1
    (a load/unload reaches one worker only). The default stays 1: with N workers statistics and metrics are per
    worker, and every model is loaded N times (N CUDA contexts on a GPU)."""
    if str(value).strip().lower() == "auto":
        return 1 if model_control_mode == "explicit" else usable_cores()
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--workers is {str(value)[:40]!r}; give a number of processes or 'auto' (one per core)") from None


def _port_for(host: str, port: int, what: str) -> int:
    """``port`` checked free on ``host`` (0: a free one picked), bound without SO_REUSEPORT so a port in use by any
    other process is refused here, before the workers share it."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            flag = "--port" if what == "HTTP" else "--grpc-port"
            raise InputError(f"cannot listen for {what} on {host}:{port}: {exc}; pick a free port with {flag}") from None
        return s.getsockname()[1]


def _serve_workers(repo: Path, config: ServerConfig) -> int:
    """``--workers N``: N ``resdeploy serve`` processes on the same HTTP and gRPC ports (SO_REUSEPORT: the kernel
    spreads connections across them), each with its own models, batchers and event loop, so Python's per-request
    work runs on N cores instead of one. SIGTERM/SIGINT are forwarded to every worker, each drains as a single
    server does, and the exit code is the worst of theirs; if one worker dies the others are stopped (exit 1), so a
    supervisor restarts the whole server. The connection cap is split across the workers (the total stays
    ``max_connections``); statistics and metrics are per worker (each connection sees its worker's)."""
    import dataclasses
    import math
    import subprocess

    n = config.workers
    http_port = _port_for(config.host, config.port, "HTTP")
    grpc_port = _port_for(config.host, config.grpc_port, "gRPC") if config.grpc_port is not None else None
    wcfg = dataclasses.replace(config, port=http_port, grpc_port=grpc_port, reuse_port=True,
                               max_connections=max(1, math.ceil(config.max_connections / n)))
    spec = json.dumps({"repo": str(repo), "config": dataclasses.asdict(wcfg)})
    code = "from resdeploy.serve.server import _worker_main; raise SystemExit(_worker_main())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, WORKER_ENV: spec, "RESDEPLOY_WORKER_INDEX": str(i)})
             for i in range(n)]
    log.info("serving with %d worker processes on http %s:%d%s (SO_REUSEPORT); pids %s", n, config.host, http_port,
             f", grpc {grpc_port}" if grpc_port is not None else "", ", ".join(str(p.pid) for p in procs))
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            died = [p for p in procs if p.returncode is not None and p.returncode != 0]
            if died and not stopping:
                log.error("worker pid %d exited with %s; stopping the other workers", died[0].pid, died[0].returncode)
                forward(signal.SIGTERM, None)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    log.info("all %d workers exited (codes %s)", n, codes)
    return 0 if all(c == 0 for c in codes) else 1


def _worker_main() -> int:
    """Entry of one ``--workers`` process: the parent's config (as JSON in the environment), then serve."""
    spec = json.loads(os.environ.pop(WORKER_ENV))
    index = os.environ.pop("RESDEPLOY_WORKER_INDEX", "?")
    cfg = spec["config"]
    cfg["load_models"] = tuple(cfg["load_models"])
    config = ServerConfig(**cfg)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    try:
        return asyncio.run(ModelServer(spec["repo"], config).run())
    except ResdeployError as exc:
        log.error("%s", exc)
        return 2


__all__ = ["LoadedModel", "ModelServer", "ServerConfig", "parse_workers", "serve"]
