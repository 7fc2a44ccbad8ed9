"""The inference server: KServe v2 / Triton HTTP protocol over a Triton model repository.

    serve("REPO", ServerConfig(host="127.0.0.1", port=8000))   # blocks until SIGTERM/SIGINT, returns 0

Endpoints (Open Inference Protocol v2 REST plus Triton's extensions that its clients use):
``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/<m>[/versions/<v>]`` (metadata),
``.../ready``, ``.../config`` (Triton's JSON form, what perf_analyzer reads), ``.../stats`` and
``/v2/models/stats`` (statistics extension), ``POST .../infer`` (JSON and binary tensors, classification),
``POST /v2/repository/index`` and ``GET /metrics`` (Prometheus, Triton's metric names).

Lifecycle: the port is bound first (live answers at once), models load and warm up in threads, then
``/v2/health/ready`` turns 200. On SIGTERM readiness turns false at once, new requests get 503, requests
already accepted finish (up to ``shutdown_timeout_s``), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import resdeploy
from resdeploy.errors import InputError, ResdeployError
from resdeploy.serve.batching import BatcherConfig, DynamicBatcher
from resdeploy.serve.metrics import ModelStats, prometheus_text, stats_json
from resdeploy.serve.protocol import (IOSpec, NotFound, PayloadTooLarge, ServeError, Unavailable, check_inputs,
                                      check_outputs, encode_infer_response, parse_header_length, parse_infer_request)
from resdeploy.serve.repository import (ModelEntry, backend_parameter, complete_config, config_to_json, instance_count,
                                        io_specs, read_labels, scan_repository, wants_cpu)

log = logging.getLogger("resdeploy.serve")

DRAIN_GRACE_S = 0.3  # after the drain, how long 503s are still answered before the listener closes
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to serve other machines
    port: int = 8000  # Triton's HTTP port
    max_body_bytes: int = 64 << 20  # larger request bodies get 413 before they are read
    request_timeout_s: float = 30.0  # a request's deadline when neither it nor the model config gives one
    shutdown_timeout_s: float = 30.0  # how long SIGTERM waits for accepted requests to finish
    threads: int | None = None  # ONNX Runtime intra-op threads per instance; None = cores / instances
    backend: str = "auto"  # auto | onnxruntime | tensorrt: what runs the artifacts (auto: by file type and device)
    strict_readiness: bool = True  # like Triton: ready only when every model loaded; False = ready once loading ends
    warmup: bool = True  # one inference at batch 1 and max batch per instance before ready


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
        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self.port: int | None = None

    # -- loading ---------------------------------------------------------------------------------------
    def _threads(self, entries: list[ModelEntry]) -> int:
        if self.config.threads:
            return self.config.threads
        total = sum(instance_count(e.config) for e in entries if e.error is None) or 1
        return max(1, (os.cpu_count() or 1) // total)

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
        if self.config.warmup:
            self._warmup(model)

    @staticmethod
    def _complete_instance_groups(entry: ModelEntry, runner: Any) -> None:
        """Like Triton's auto-complete: a group per model by default, named after it, with the kind that runs."""
        from tritonclient.grpc import model_config_pb2 as pb

        cfg = entry.config
        if not len(cfg.instance_group):
            cfg.instance_group.add(count=1)
        on_gpu = runner.on_gpu
        for i, g in enumerate(cfg.instance_group):
            g.count = max(1, g.count)
            if not g.name:
                g.name = entry.name if len(cfg.instance_group) == 1 else f"{entry.name}_{i}"
            if g.kind == pb.ModelInstanceGroup.KIND_AUTO:
                g.kind = pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU
            if g.kind == pb.ModelInstanceGroup.KIND_GPU and not len(g.gpus):
                g.gpus.append(0)

    def _warmup(self, model: LoadedModel) -> None:
        from resdeploy.serve.protocol import DATATYPES

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
        entries = await loop.run_in_executor(None, scan_repository, self.repo)
        threads = self._threads(entries)
        for e in entries:
            self.models.setdefault(e.name, {})[e.version] = LoadedModel(e, ModelStats(e.name, e.version))
        for e in entries:
            m = self.models[e.name][e.version]
            if e.error:
                m.error = e.error
            else:
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(None, self._load_one, m, threads)
                except Exception as exc:  # any load failure: report it, keep serving the rest
                    m.error = str(exc) if isinstance(exc, ResdeployError) else f"{type(exc).__name__}: {exc}"
                    for r in m.runners:
                        r.deactivate()
                    m.runners = []
                else:
                    m.batcher = DynamicBatcher(m.runners, _batcher_config(e.config), m.stats, name=e.name)
                    m.ready = True
                    log.info("model '%s' version %s ready in %.1f s: %s, %d instance(s) x %d thread(s), %s", e.name,
                             e.version, time.perf_counter() - t0, m.description, len(m.runners), threads, m.batcher.config)
            if m.error:
                log.error("model '%s' version %s failed to load: %s", e.name, e.version, m.error)
        self.loading = False

    @property
    def ready(self) -> bool:
        if self.loading or self.draining:
            return False
        all_models = [m for vs in self.models.values() for m in vs.values()]
        return all(m.ready for m in all_models) if self.config.strict_readiness else True

    # -- lookup ----------------------------------------------------------------------------------------
    def lookup(self, name: str, version: str | None) -> LoadedModel:
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model '{name}'; this server has: {known}")
        if version in (None, ""):  # like Triton: the highest version that is ready, else the highest
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions, key=int)]
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version}'; loaded versions: {', '.join(sorted(versions, key=int))}")
        return versions[version]

    # -- handlers --------------------------------------------------------------------------------------
    def app(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                return await handler(request)
            except ServeError as exc:
                return _json_error(exc.status, str(exc), close=self.draining)
            except web.HTTPRequestEntityTooLarge:
                return _json_error(413, f"request body exceeds {self.config.max_body_bytes} bytes (--max-body-mb); "
                                        "send smaller batches")
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                msg = (f"no route for {request.method} {request.path}; see /v2 for the protocol"
                       if exc.status in (404, 405) else exc.reason)
                return _json_error(exc.status, msg)
            except Exception as exc:  # a bug must not take the server down; the client gets the reason
                log.exception("internal error on %s %s", request.method, request.path)
                return _json_error(500, f"internal server error: {type(exc).__name__}: {exc}")

        app = web.Application(middlewares=[errors], client_max_size=self.config.max_body_bytes)
        r = app.router
        r.add_get("/v2", self.h_server_metadata)
        r.add_get("/v2/health/live", self.h_live)
        r.add_get("/v2/health/ready", self.h_ready)
        r.add_get("/v2/models/stats", self.h_stats)
        r.add_post("/v2/repository/index", self.h_index)
        r.add_get("/metrics", self.h_metrics)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.h_model_metadata)
            r.add_get(prefix + "/ready", self.h_model_ready)
            r.add_get(prefix + "/config", self.h_model_config)
            r.add_get(prefix + "/stats", self.h_stats)
            r.add_post(prefix + "/infer", self.h_infer)
        return app

    async def h_server_metadata(self, request: Any) -> Any:
        return _json({"name": "resdeploy", "version": resdeploy.__version__, "extensions": EXTENSIONS})

    async def h_live(self, request: Any) -> Any:
        return _json({"live": True})

    async def h_ready(self, request: Any) -> Any:
        ready = self.ready
        return _json({"ready": ready}, status=200 if ready else 503)

    def _model(self, request: Any) -> LoadedModel:
        return self.lookup(request.match_info["model"], request.match_info.get("version"))

    async def h_model_metadata(self, request: Any) -> Any:
        m = self._model(request)
        if not m.ready:
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready: {m.error or 'loading'}")
        return _json({"name": m.name, "versions": m.entry.versions_available or [m.version],
                      "platform": m.entry.config.platform or m.entry.config.backend,
                      "inputs": [s.to_json() for s in m.inputs], "outputs": [s.to_json() for s in m.outputs]})

    async def h_model_ready(self, request: Any) -> Any:
        m = self._model(request)
        ready = m.ready and not self.draining
        body: dict[str, Any] = {"name": m.name, "version": m.version, "ready": ready}
        if m.error:
            body["error"] = m.error
        return _json(body, status=200 if ready else 503)

    async def h_model_config(self, request: Any) -> Any:
        m = self._model(request)
        return _json(config_to_json(m.entry.config))

    async def h_stats(self, request: Any) -> Any:
        name = request.match_info.get("model")
        if name is None:
            stats = [m.stats for vs in self.models.values() for m in vs.values()]
        elif request.match_info.get("version"):
            stats = [self._model(request).stats]
        else:
            self.lookup(name, None)
            stats = [m.stats for m in self.models[name].values()]
        return _json(stats_json(stats))

    async def h_index(self, request: Any) -> Any:
        rows = []
        for vs in self.models.values():
            for m in vs.values():
                row = {"name": m.name, "version": m.version, "state": "READY" if m.ready else "UNAVAILABLE"}
                if m.error:
                    row["reason"] = m.error
                rows.append(row)
        return _json(rows)

    async def h_metrics(self, request: Any) -> Any:
        from aiohttp import web

        text = prometheus_text([m.stats for vs in self.models.values() for m in vs.values()])
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def h_infer(self, request: Any) -> Any:
        from aiohttp import web

        t0 = time.perf_counter_ns()
        m = self._model(request)
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if not m.ready or m.batcher is None:
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready: {m.error or 'loading'}")
        self.inflight += 1
        try:
            if request.content_length is not None and request.content_length > self.config.max_body_bytes:
                raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is "
                                      f"{self.config.max_body_bytes} (--max-body-mb); send smaller batches")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PayloadTooLarge(f"request body exceeds {self.config.max_body_bytes} bytes (--max-body-mb); "
                                      "send smaller batches") from None
            hlen = parse_header_length(request.headers.get("Inference-Header-Content-Length"), len(body))
            req = parse_infer_request(body, hlen)
            batch = check_inputs(req, m.inputs, m.name, m.max_batch_size)
            check_outputs(req, [s.name for s in m.outputs], m.name)
            timeout_us = req.timeout_us or m.batcher.config.default_timeout_us or int(self.config.request_timeout_s * 1e6)
            outputs = await m.batcher.infer(req.inputs, batch, timeout_us)
            enc = encode_infer_response(m.name, m.version, req, outputs, m.labels, batched=m.max_batch_size > 0)
        except ServeError as exc:
            m.stats.record_failure(time.perf_counter_ns() - t0,
                                   "REJECTED" if isinstance(exc, Unavailable) else "BACKEND" if exc.status >= 500 else "OTHER")
            raise
        finally:
            self.inflight -= 1
            if self.draining and self.inflight == 0:
                self._drained.set()
        m.stats.record_success(time.perf_counter_ns() - t0)
        if enc.header_length is None:
            resp = web.Response(body=enc.body, content_type="application/json")
        else:
            resp = web.Response(body=enc.body, content_type="application/octet-stream",
                                headers={"Inference-Header-Content-Length": str(enc.header_length)})
        if self.draining:  # the client should not reuse a connection that is about to close
            resp.force_close()
        return resp

    # -- lifecycle -------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM/SIGINT: readiness false at once; ``run`` then drains and exits."""
        if not self.draining:
            self.draining = True
            log.info("shutdown requested: not ready; draining %d in-flight request(s)", self.inflight)
        self._stop.set()

    async def run(self, on_ready: Any = None) -> int:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals (Windows)
                pass
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, shutdown_timeout=self.config.shutdown_timeout_s,
                           reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InputError(f"cannot listen on {self.config.host}:{self.config.port}: {exc}; pick a free port with --port") from None
        addresses = runner.addresses  # the bound (host, port): --port 0 picks a free port
        self.port = addresses[0][1] if addresses else self.config.port
        log.info("listening on http://%s:%d (live; loading models from %s)", self.config.host, self.port, self.repo)
        load = asyncio.ensure_future(self.load_models())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()
            n_ok = sum(m.ready for vs in self.models.values() for m in vs.values())
            n_all = sum(len(vs) for vs in self.models.values())
            log.info("%d of %d model version(s) loaded; server %s on http://%s:%d", n_ok, n_all,
                     "ready" if self.ready else "NOT ready (a model failed to load)", self.config.host, self.port)
            if on_ready:
                on_ready(self)
        await stop
        t0 = time.perf_counter()
        at_stop = self.inflight
        if self.inflight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), self.config.shutdown_timeout_s)
            except asyncio.TimeoutError:
                pass
        lost = self.inflight
        # Keep answering 503 + Connection: close for a moment, so keep-alive clients learn of the shutdown from a
        # response instead of a reset connection; then stop listening and close what is left.
        await asyncio.sleep(min(DRAIN_GRACE_S, self.config.shutdown_timeout_s))
        await runner.cleanup()
        if not load.done():
            load.cancel()
        for vs in self.models.values():
            for m in vs.values():
                if m.batcher:
                    m.batcher.close()
                for r in m.runners:
                    r.deactivate()
        log.info("shutdown: %d request(s) in flight at the signal, %d finished, %d abandoned after %.2f s; exiting",
                 at_stop, at_stop - lost, lost, time.perf_counter() - t0)
        return 0 if lost == 0 else 1


def _json(obj: Any, status: int = 200) -> Any:
    import json

    from aiohttp import web

    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode("utf-8"), status=status,
                        content_type="application/json")


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
    return asyncio.run(ModelServer(repo, config).run())


__all__ = ["LoadedModel", "ModelServer", "ServerConfig", "serve"]
