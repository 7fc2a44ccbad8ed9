"""The HTTP adapter: KServe v2 / Triton REST over the core, on aiohttp behind resdeploy's connection guard.

Endpoints (Open Inference Protocol v2 REST plus Triton's extensions that its clients use):
``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/<m>[/versions/<v>]`` (metadata),
``.../ready``, ``.../config`` (Triton's JSON form, what perf_analyzer reads), ``.../stats`` and
``/v2/models/stats`` (statistics extension), ``POST .../infer`` (JSON and binary tensors, classification),
``POST /v2/repository/index``, ``POST /v2/repository/models/<m>/load|unload`` and ``GET /metrics``
(Prometheus, Triton's metric names).

Request bodies may be ``Content-Encoding: gzip`` or ``deflate`` (as tritonclient sends them); they are inflated
here, to at most ``max_inflate_ratio`` times the bytes received and never past ``max_body_bytes``, so a
compressed bomb costs a 413, not memory. Every error is ``{"error": message}`` with the ServeError's status.
See :mod:`resdeploy.serve.connections` for the connection deadlines, the cap and the drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from typing import Any

from aiohttp import web

from resdeploy.errors import InputError
from resdeploy.serve.connections import ConnectionGuard, DrainReport, FastCall
from resdeploy.serve.core import CONTROL_OFF, DataPlane
from resdeploy.serve.metrics import stats_json
from resdeploy.serve.protocol import (BadRequest, PayloadTooLarge, RequestTimeout, ServeError, Unavailable,
                                      UnsupportedMediaType, encode_http_infer, json_error, parse_http_infer)
from resdeploy.serve.repository import config_to_json

log = logging.getLogger("resdeploy.serve")


def json_response(obj: Any, status: int = 200) -> web.Response:
    # allow_nan=False: responses are RFC 8259 JSON; a NaN reaching here is a bug that must not reach clients.
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return web.Response(body=body, status=status, content_type="application/json")


def error_response(status: int, message: str, close: bool = False) -> web.Response:
    resp = web.Response(body=json_error(message), status=status, content_type="application/json")
    if close:
        resp.force_close()
    return resp


class RestServer:
    """The aiohttp application over ``core`` and its listener; ``fast`` answers plain infer requests itself."""

    def __init__(self, core: DataPlane, fast: FastCall | None = None) -> None:
        self.core = core
        self.config = core.config
        self.requests = 0  # requests aiohttp routed (every path)
        self.guard = ConnectionGuard(core.config, fast)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen on the configured host and port; returns the port."""
        c = self.config
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        try:
            self.port = await self.guard.listen(self.runner, c.host, c.port, reuse_port=c.reuse_port)
        except OSError as exc:
            await self.runner.cleanup()
            raise InputError(f"cannot listen on {c.host}:{c.port}: {exc}; pick a free port with --port") from None
        return self.port

    async def drain(self, deadline: float, grace_s: float) -> DrainReport:
        """See :meth:`ConnectionGuard.drain`; then aiohttp's application is shut down."""
        report = await self.guard.drain(deadline, grace_s)
        await self.stop()
        return report

    async def stop(self) -> None:
        self.guard.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def app(self) -> web.Application:
        # One middleware (not two): each aiohttp middleware layer costs a coroutine and a wrapper per request.
        @web.middleware
        async def guarded(request: web.Request, handler: Any) -> web.StreamResponse:
            # The guard reads each connection's phase: a request being handled is never closed by the drain.
            self.requests += 1
            self.guard.request_started(request.protocol)
            try:
                resp = await self._answer(request, handler)
                if self.core.draining:  # the client must not reuse a connection that is about to close
                    resp.force_close()
                return resp
            finally:
                self.guard.request_finished(request.protocol)

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

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The handler's response, or the error's: every failure becomes ``{"error": ...}``."""
        try:
            return await handler(request)
        except ServeError as exc:
            # 408/413: the body was not (fully) read, so the connection cannot carry another request.
            return error_response(exc.status, str(exc), close=exc.status in (408, 413))
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes (--max-body-mb); "
                                       "send smaller batches")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            msg = (f"no route for {request.method} {request.path}; see /v2 for the protocol"
                   if exc.status in (404, 405) else exc.reason)
            return error_response(exc.status, msg)
        except Exception as exc:  # a bug must not take the server down; the client gets the reason
            log.exception("internal error on %s %s", request.method, request.path)
            return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")

    # -- handlers --------------------------------------------------------------------------------------
    async def h_server_metadata(self, request: web.Request) -> web.Response:
        return json_response(self.core.server_metadata())

    async def h_live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def h_ready(self, request: web.Request) -> web.Response:
        # Triton answers 400 when not ready; while draining, 503 (retry elsewhere), as every request then gets.
        ready = self.core.ready
        return json_response({"ready": ready}, status=200 if ready else 503 if self.core.draining else 400)

    async def h_model_metadata(self, request: web.Request) -> web.Response:
        return json_response(self.core.model_metadata(request.match_info["model"], request.match_info.get("version")))

    async def h_model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version")
        ready, why = self.core.model_ready(name, version)
        body: dict[str, Any] = {"name": name, "version": version or "", "ready": ready}
        if not ready:
            body["error"] = why
        return json_response(body, status=200 if ready else 503 if self.core.draining else 400)

    async def h_model_config(self, request: web.Request) -> web.Response:
        m = self.core.available(request.match_info["model"], request.match_info.get("version"))
        return json_response(config_to_json(m.entry.config))

    async def h_stats(self, request: web.Request) -> web.Response:
        return json_response(stats_json(self.core.stats(request.match_info.get("model"), request.match_info.get("version"))))

    async def h_index(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        ready_only = False
        if body.strip():
            try:
                obj = json.loads(body)
            except ValueError as exc:
                raise BadRequest(f"repository index request is not JSON ({exc}); send {{}} or {{\"ready\": true}}") from None
            ready_only = isinstance(obj, dict) and obj.get("ready") is True
        return json_response(self.core.index(ready_only))

    async def h_load(self, request: web.Request) -> web.Response:
        params = await self._control_params(request)
        await self.core.load(request.match_info["model"], params)
        return json_response({})

    async def h_unload(self, request: web.Request) -> web.Response:
        await self._control_params(request)
        await self.core.unload(request.match_info["model"])
        return json_response({})

    async def _control_params(self, request: web.Request) -> dict[str, Any]:
        if self.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        body = await self.read_body(request)
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

    async def h_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.core.metrics_text(), content_type="text/plain", charset="utf-8")

    async def h_infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version")
        self.core.available(name, version)  # an unknown model is refused before its body is read
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is "
                                  f"{self.config.max_body_bytes} (--max-body-mb); send smaller batches")
        body = await self.read_body(request)
        header_length = request.headers.get("Inference-Header-Content-Length")
        enc = await self.core.infer_async(name, version, lambda m: parse_http_infer(m, body, header_length),
                                          encode_http_infer)
        if enc.header_length is None:
            return web.Response(body=enc.body, content_type="application/json")
        return web.Response(body=enc.body, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(enc.header_length)})

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, inflated when gzip/deflate, within the body deadline and the size limits."""
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
        return self._inflate(body, encoding, limit)

    def _inflate(self, body: bytes, encoding: str, limit: int) -> bytes:
        # At most ratio x the received size (and never past the body limit): a 64 KiB gzip bomb must cost about
        # 2 MiB, not the 64 MiB (or gigabytes) it expands to.
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


__all__ = ["RestServer", "error_response", "json_response"]
