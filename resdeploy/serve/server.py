"""The inference server process: the core (:mod:`resdeploy.serve.core`) and its transports, from start to exit.

    serve("REPO", ServerConfig(host="127.0.0.1", port=8000))   # blocks until SIGTERM/SIGINT, returns 0

This module only composes: it makes the :class:`resdeploy.serve.core.DataPlane`, starts the HTTP adapter
(:mod:`resdeploy.serve.rest`, with the fast path of :mod:`resdeploy.serve.fastpath` where the installed aiohttp
allows it) and one gRPC adapter (:mod:`resdeploy.serve.grpc_native` or :mod:`resdeploy.serve.grpc_aio`), and
with ``--workers N`` hands over to the supervisor (:mod:`resdeploy.serve.workers`).

Lifecycle: the ports are bound first (live answers at once), models load and warm up in threads, then
``/v2/health/ready`` turns 200. On SIGTERM/SIGINT, under any load:

1. readiness turns false at once, and every request that arrives from then on gets 503 / UNAVAILABLE;
2. the requests accepted before the signal are answered (within ``shutdown_timeout_s``);
3. then the listeners close (late clients are refused, never reset), what the kernel had already accepted is
   answered, and quiet connections are closed;
4. the process exits 0, well within a second of the last accepted answer (1 if a request had to be abandoned
   at the deadline; the log says how many).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from resdeploy.errors import InputError, ResdeployError
from resdeploy.serve.config import ServerConfig, parse_workers
from resdeploy.serve.core import DataPlane
from resdeploy.serve.fastpath import FastPath, unsupported_reason
from resdeploy.serve.rest import RestServer

log = logging.getLogger("resdeploy.serve")

DRAIN_GRACE_S = 0.3  # after SIGTERM the listeners stay open at least this long, answering 503 rather than refusing


class ModelServer:
    """One server process over one repository; ``run()`` serves until stopped and returns the exit code."""

    def __init__(self, repo: str | Path, config: ServerConfig | None = None, core: DataPlane | None = None) -> None:
        self.config = config or ServerConfig()
        self.core = core or DataPlane(repo, self.config)
        self.fast: FastPath | None = None
        self.http: RestServer | None = None
        self.grpc: Any = None  # NativeGrpc or AioGrpc, once run() listens (grpc_port not None)
        self._stop: asyncio.Event | None = None

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: readiness false at once; ``run`` then drains and exits."""
        self.core.begin_drain()
        if self._stop is not None:
            self._stop.set()

    async def run(self, on_ready: Any = None) -> int:
        self._stop = asyncio.Event()
        if self.core.draining:  # stopped before it ran
            self._stop.set()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals (Windows)
                pass
        c = self.config
        if c.reuse_port:
            # A worker of --workers N opens the shared ports only once its models are loaded: a connection the
            # kernel hands to it must not find it still loading while another worker already answers ready.
            await self.core.load_all()
        await self._listen()
        load = asyncio.ensure_future(self.core.load_all() if not c.reuse_port else asyncio.sleep(0))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()
            models = [m for vs in self.core.models.values() for m in vs.values()]
            log.info("%d of %d model version(s) loaded; server %s on http://%s:%d", sum(m.ready for m in models),
                     len(models), "ready" if self.core.ready else "NOT ready (a model failed to load)", c.host,
                     self.http.port)
            if on_ready:
                on_ready(self)
        await stop
        return await self._drain(load)

    async def _listen(self) -> None:
        c = self.config
        if c.http_fast_path:
            why = unsupported_reason()
            if why:
                log.warning("HTTP fast path off: %s; every request goes through aiohttp", why)
            else:
                self.fast = FastPath(self.core)
        self.http = RestServer(self.core, self.fast)
        port = await self.http.start()
        log.info("listening on http://%s:%d (live; loading models from %s); limits: header %gs, body %gs, keep-alive "
                 "%gs, %d connections, body %d bytes (inflated at most %gx); repository symlinks %s; fast path %s",
                 c.host, port, self.core.repo, c.header_timeout_s, c.body_timeout_s, c.keepalive_timeout_s,
                 c.max_connections, c.max_body_bytes, c.max_inflate_ratio,
                 "FOLLOWED outside model folders (--follow-symlinks)" if c.follow_symlinks else "kept inside model folders",
                 "on" if self.fast else "off")
        if c.grpc_port is not None:
            # grpc and the HTTP/2 code are imported only when gRPC is served
            if c.grpc_transport == "grpcio":
                from resdeploy.serve.grpc_aio import AioGrpc as Service
            else:
                from resdeploy.serve.grpc_native import NativeGrpc as Service

            self.grpc = Service(self.core)
            try:
                grpc_port = await self.grpc.start(c.host, c.grpc_port)
            except InputError:
                await self.http.stop()
                raise
            log.info("listening on grpc://%s:%d (KServe v2 GRPCInferenceService on %s; messages up to %d bytes, %d RPCs "
                     "at once)", c.host, grpc_port, "resdeploy's HTTP/2" if c.grpc_transport == "native" else "grpc.aio",
                     c.max_body_bytes, c.max_connections)
        log.info("model control mode %s%s", c.model_control_mode,
                 f" (loading at start: {', '.join(c.load_models) or 'none'})" if c.model_control_mode == "explicit" else "")

    async def _drain(self, load: asyncio.Future) -> int:
        """Both transports drain at once (see the module docstring); then the models close."""
        c = self.config
        t0 = time.monotonic()
        deadline = t0 + c.shutdown_timeout_s
        assert self.http is not None
        grpc_drain = asyncio.ensure_future(self.grpc.drain(deadline, DRAIN_GRACE_S)) if self.grpc else None
        report = await self.http.drain(deadline, DRAIN_GRACE_S)
        grpc_abandoned = await grpc_drain if grpc_drain is not None else 0
        if not load.done():
            load.cancel()
        await self.core.close(deadline - time.monotonic())
        fast = self.fast.answered if self.fast else 0
        log.info("shutdown: %d request(s) in progress at the signal; %d answered during the drain (503 for those that "
                 "arrived after it began); %d abandoned at the %gs deadline; %d connection(s) taken from the accept "
                 "queue, %d quiet one(s) closed; listener closed after %.2f s; exiting after %.2f s",
                 report.in_progress_at_signal, report.answered_during_drain, report.abandoned, c.shutdown_timeout_s,
                 report.taken_from_backlog, report.idle_closed, report.listening_s, time.monotonic() - t0)
        if self.grpc is not None:
            log.info("shutdown: gRPC stopped; %d RPC(s) abandoned at the deadline", grpc_abandoned)
        log.info("shutdown: %d HTTP request(s) served, %d of them on the fast path", self.http.requests + fast, fast)
        return 0 if report.abandoned == 0 and grpc_abandoned == 0 else 1


def serve(repo: str | Path, config: ServerConfig | None = None) -> int:
    """Serve ``repo`` until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    config = config or ServerConfig()
    if not Path(repo).is_dir():
        raise InputError(f"model repository {repo} is not a folder; make one with `resdeploy repo MODEL.onnx --out {repo}`")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.workers > 1:
        from resdeploy.serve.workers import supervise

        return supervise(Path(repo), config, [sys.executable, "-m", "resdeploy.serve.server"])
    return asyncio.run(ModelServer(repo, config).run())


def worker_main() -> int:
    """One ``--workers`` process: its config from the supervisor (resdeploy.serve.workers), then serve."""
    from resdeploy.serve.workers import worker_spec

    repo, config, index = worker_spec()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    try:
        return asyncio.run(ModelServer(repo, config).run())
    except ResdeployError as exc:
        log.error("%s", exc)
        return 2


__all__ = ["DRAIN_GRACE_S", "ModelServer", "ServerConfig", "parse_workers", "serve", "worker_main"]

if __name__ == "__main__":
    raise SystemExit(worker_main())
