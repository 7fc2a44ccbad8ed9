"""The gRPC endpoint on resdeploy's own HTTP/2 connection (resdeploy/serve/http2.py), on the server's event loop.

The same service as :class:`resdeploy.serve.grpc_service.GrpcService` (its methods answer every RPC but one),
the same messages (tritonclient's ``service_pb2``), codes, messages and limits; only the transport differs.
grpc.aio stays available as ``--grpc-transport grpcio``. ModelInfer, the one RPC that matters for speed, goes
from the request's last DATA frame to the batcher with no task or coroutine, and is answered from the
batcher's callback (as the HTTP fast path); the other RPCs run the service's coroutines.

gRPC over HTTP/2, as the server side of https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md needs it:
``POST /inference.GRPCInferenceService/<Method>``, ``content-type: application/grpc[+proto]`` (else HTTP 415),
one length-prefixed message (``grpc-encoding`` identity, gzip or deflate; anything else UNIMPLEMENTED with
``grpc-accept-encoding``), ``grpc-timeout`` as the deadline (DEADLINE_EXCEEDED once it passes), the answer in
``grpc-status`` / ``grpc-message`` (percent-encoded) trailers, errors as trailers-only responses.

Limits (issue 10's, shared with HTTP, as grpc.aio enforced them): a message whose length prefix (or inflated
size) is over ``max_body_bytes`` gets RESOURCE_EXHAUSTED before more of it is buffered; at most
``max_connections`` RPCs run at once server-wide and at most ``max_connections`` connections are open (more get
RESOURCE_EXHAUSTED / GOAWAY); a connection that sends no preface within ``header_timeout_s``, a request whose
message does not arrive within ``body_timeout_s`` of its headers (DEADLINE_EXCEEDED) and a connection idle for
``keepalive_timeout_s`` are closed by a once-a-second sweep. On SIGTERM new RPCs get UNAVAILABLE while those in
progress finish; at the end every connection gets GOAWAY.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import zlib
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from resdeploy.errors import InputError
from resdeploy.serve.grpc_service import GrpcService, RpcAbort, encode_response, parse_request
from resdeploy.serve.http2 import H2Connection, H2Limits, Stream, encode_headers
from resdeploy.serve.protocol import ServeError, Unavailable, check_inputs, check_outputs

log = logging.getLogger("resdeploy.serve")

SERVICE = "inference.GRPCInferenceService"
# gRPC status codes (grpc.StatusCode without importing grpc)
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
# HTTP status of a ServeError -> gRPC status code (as grpc_service.CODES)
CODES = {400: INVALID_ARGUMENT, 404: NOT_FOUND, 408: DEADLINE_EXCEEDED, 413: RESOURCE_EXHAUSTED, 415: INVALID_ARGUMENT,
         503: UNAVAILABLE}
ACCEPT_ENCODING = b"identity,deflate,gzip"
_WBITS = {b"gzip": 31, b"deflate": 15}  # zlib's framing of each grpc-encoding
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_S = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_PREFIX = struct.Struct(">BL")

RESPONSE_HEAD = encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
TRAILER_OK = encode_headers([(b"grpc-status", b"0")])


def _percent(message: str) -> bytes:
    """grpc-message: UTF-8, with '%' and every byte outside 0x20..0x7E percent-encoded."""
    out = bytearray()
    for b in message.encode("utf-8")[:4096]:
        out += b"%%%02X" % b if b < 0x20 or b > 0x7E or b == 0x25 else bytes([b])
    return bytes(out)


def status_block(code: int, message: str, http_status: int = 200, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A trailers-only response: the whole answer in one header block."""
    fields = [(b":status", str(http_status).encode()), (b"content-type", b"application/grpc"),
              (b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", _percent(message)))
    return encode_headers(fields + list(extra))


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout (``1-8 digits`` + unit) in seconds, or None when malformed."""
    m = _TIMEOUT.fullmatch(value)
    return int(m.group(1)) * _UNIT_S[m.group(2)] if m else None


class _Context:
    """What the service's coroutines ask of their gRPC context: abort and the time left."""

    __slots__ = ("deadline",)

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    async def abort(self, code: Any, details: str) -> None:
        raise RpcAbort(code.value[0], details)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class _Call:
    """One RPC's state on its stream."""

    __slots__ = ("method", "request_type", "deadline", "wbits", "handle", "counted")

    def __init__(self, method: str, request_type: Any, deadline: float | None, wbits: int | None) -> None:
        self.method = method
        self.request_type = request_type
        self.deadline = deadline  # monotonic
        self.wbits = wbits  # the request's compression (None: identity)
        self.handle: Any = None  # the batcher's future or the RPC's task: cancelled when the stream is reset
        self.counted = False  # counted in NativeGrpc.rpcs


class NativeGrpc(GrpcService):
    """The gRPC service on resdeploy's HTTP/2 connections (see the module docstring)."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        c = server.config
        self.max_message = c.max_body_bytes
        self.limits = H2Limits(max_concurrent_streams=c.max_connections)
        self.connections: set[H2Connection] = set()
        self.rpcs = 0  # RPCs between their headers and their answer, server-wide
        self.listener: asyncio.base_events.Server | None = None
        self._sweep: asyncio.TimerHandle | None = None
        methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
        base = GrpcService.__mro__[1]  # the generated servicer: its methods answer UNIMPLEMENTED
        # path -> (method name, request class); None for the RPCs not served (UNIMPLEMENTED, as Triton's extras)
        self.paths: dict[bytes, tuple[str, Any] | None] = {}
        for md in methods:
            served = getattr(type(self), md.name, None) is not getattr(base, md.name, None)
            unary = not (md.client_streaming or md.server_streaming)
            self.paths[f"/{SERVICE}/{md.name}".encode()] = (
                (md.name, getattr(pb, md.input_type.name)) if served and unary else None)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        c = self.server.config
        loop = asyncio.get_running_loop()
        try:
            self.listener = await loop.create_server(lambda: H2Connection(self, self.limits), host, port,
                                                     reuse_port=c.reuse_port or None, backlog=1024)
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise InputError(f"cannot listen for gRPC on {address}: {exc}; pick a free port with --grpc-port "
                             "(0 = any free port) or turn gRPC off with --no-grpc") from None
        self.port = self.listener.sockets[0].getsockname()[1]
        self._sweep = loop.call_later(1.0, self._sweep_connections)
        return self.port

    async def drain(self, deadline: float) -> int:
        """As GrpcService.drain: new RPCs get UNAVAILABLE (``server.draining``) while those in progress finish
        until ``deadline``; then every connection gets GOAWAY. Returns the RPCs still running then."""
        while self.rpcs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        abandoned = self.rpcs
        if self.listener is not None:
            self.listener.close()
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in list(self.connections):
            conn.goaway("server is shutting down")
        return abandoned

    def _sweep_connections(self) -> None:
        c = self.server.config
        now = time.monotonic()
        for conn in list(self.connections):
            if not conn.ready and now - conn.opened_at > c.header_timeout_s:
                conn.goaway(f"no HTTP/2 preface and SETTINGS within {c.header_timeout_s:g} s")
            elif not conn.streams and now - conn.idle_since > c.keepalive_timeout_s:
                conn.goaway(f"idle for {c.keepalive_timeout_s:g} s")
            else:
                for st in list(conn.streams.values()):
                    if not st.remote_ended and not st.answered and now - st.opened_at > c.body_timeout_s:
                        self._answer(conn, st, DEADLINE_EXCEEDED,
                                     f"request message not received within {c.body_timeout_s:g} s of its headers")
        self._sweep = asyncio.get_running_loop().call_later(1.0, self._sweep_connections)

    # -- H2App ---------------------------------------------------------------------------------------------
    def connection_made(self, conn: H2Connection) -> None:
        if len(self.connections) >= self.server.config.max_connections:
            conn.goaway(f"too many connections (at most {self.server.config.max_connections}); retry later")
            return
        self.connections.add(conn)

    def connection_lost(self, conn: H2Connection) -> None:
        self.connections.discard(conn)

    def stream_opened(self, conn: H2Connection, st: Stream) -> None:
        fields = dict(st.headers)
        path = fields.get(b":path", b"")
        if fields.get(b":method") != b"POST":
            self._answer(conn, st, UNIMPLEMENTED, "gRPC needs :method POST", http_status=405)
            return
        ctype = fields.get(b"content-type", b"")
        if not (ctype == b"application/grpc" or ctype.startswith((b"application/grpc+", b"application/grpc;"))):
            self._answer(conn, st, INVALID_ARGUMENT, f"content-type {ctype[:60].decode('latin-1')!r} is not "
                         "application/grpc", http_status=415)
            return
        if path not in self.paths:
            self._answer(conn, st, UNIMPLEMENTED, f"unknown method {path[:200].decode('latin-1')}; this server "
                         f"serves {SERVICE}")
            return
        target = self.paths[path]
        if target is None:
            self._answer(conn, st, UNIMPLEMENTED, f"{path.decode()} is not implemented by resdeploy")
            return
        encoding = fields.get(b"grpc-encoding", b"identity")
        if encoding != b"identity" and encoding not in _WBITS:
            self._answer(conn, st, UNIMPLEMENTED, f"grpc-encoding {encoding[:40].decode('latin-1')!r} is not "
                         "supported; use identity, gzip or deflate", extra=((b"grpc-accept-encoding", ACCEPT_ENCODING),))
            return
        deadline = None
        if b"grpc-timeout" in fields:
            timeout = parse_timeout(fields[b"grpc-timeout"])
            if timeout is None:
                self._answer(conn, st, INTERNAL, f"grpc-timeout {fields[b'grpc-timeout'][:20].decode('latin-1')!r} "
                             "is malformed; expected 1-8 digits and a unit (H M S m u n)")
                return
            deadline = time.monotonic() + timeout
        if self.server.draining:
            self._answer(conn, st, UNAVAILABLE, "server is shutting down; retry on another replica")
            return
        if self.rpcs >= self.server.config.max_connections:
            self._answer(conn, st, RESOURCE_EXHAUSTED, f"concurrent RPC limit exceeded (at most "
                         f"{self.server.config.max_connections}); retry later")
            return
        st.app = _Call(target[0], target[1], deadline, _WBITS.get(encoding))
        st.app.counted = True
        self.rpcs += 1

    def stream_data(self, conn: H2Connection, st: Stream) -> None:
        if st.app is None or len(st.body) < 5:
            return
        size = _PREFIX.unpack_from(st.body)[1]
        if size > self.max_message:
            self._answer(conn, st, RESOURCE_EXHAUSTED, f"received message larger than max ({size} vs. "
                         f"{self.max_message} bytes)")
        elif len(st.body) > 5 + size:
            self._answer(conn, st, INTERNAL, "a second request message on a unary call; send exactly one")

    def stream_ended(self, conn: H2Connection, st: Stream) -> None:
        call: _Call | None = st.app
        if call is None:  # refused at its headers; answered already
            return
        body = st.body
        if len(body) < 5 or len(body) != 5 + _PREFIX.unpack_from(body)[1]:
            self._answer(conn, st, INTERNAL, "the request ended without one whole length-prefixed message")
            return
        flag = body[0]
        payload = memoryview(body)[5:]
        if flag == 1:
            if call.wbits is None:
                self._answer(conn, st, INTERNAL, "message flagged compressed but grpc-encoding is identity")
                return
            d = zlib.decompressobj(call.wbits)
            try:
                raw = d.decompress(payload, self.max_message + 1)
            except zlib.error as exc:
                self._answer(conn, st, INTERNAL, f"compressed message cannot be inflated: {exc}")
                return
            if len(raw) > self.max_message or d.unconsumed_tail:
                self._answer(conn, st, RESOURCE_EXHAUSTED, f"received message inflates to more than max "
                             f"({self.max_message} bytes)")
                return
            payload = memoryview(raw)
        elif flag != 0:
            self._answer(conn, st, INTERNAL, f"message flag {flag} is neither 0 nor 1")
            return
        name, request_type = call.method, call.request_type
        try:
            request = request_type.FromString(payload)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            self._answer(conn, st, INVALID_ARGUMENT, f"cannot parse {request_type.__name__}: {exc}")
            return
        if name == "ModelInfer":
            self._model_infer(conn, st, request)
        else:
            call.handle = asyncio.ensure_future(self._unary(conn, st, name, request))

    def stream_reset(self, conn: H2Connection, st: Stream) -> None:
        call: _Call | None = st.app
        if call is None:
            return
        if call.handle is not None:
            call.handle.cancel()  # drops a queued request from the batcher; cancels a running coroutine
        self._uncount(call)

    # -- answers -------------------------------------------------------------------------------------------
    def _uncount(self, call: _Call) -> None:
        if call.counted:
            call.counted = False
            self.rpcs -= 1

    def _answer(self, conn: H2Connection, st: Stream, code: int, message: str, http_status: int = 200,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if st.app is not None:
            self._uncount(st.app)
        conn.respond(st, status_block(code, message, http_status, extra))

    def _ok(self, conn: H2Connection, st: Stream, message: bytes) -> None:
        if st.app is not None:
            self._uncount(st.app)
        conn.respond(st, RESPONSE_HEAD, _PREFIX.pack(0, len(message)) + message, TRAILER_OK)

    def _model_infer(self, conn: H2Connection, st: Stream, request: Any) -> None:
        """ModelInfer without a task: validated here, queued with a callback that answers the stream."""
        from resdeploy.serve.server import _record_failure

        t0 = time.perf_counter_ns()
        server = self.server
        call: _Call = st.app
        try:
            m = server.infer_target(request.model_name, request.model_version)
            req = parse_request(request)
            batch = check_inputs(req, m.inputs, m.name, m.max_batch_size)
            check_outputs(req, [s.name for s in m.outputs], m.name)
        except ServeError as exc:  # refused by validation: not counted in the statistics (as Triton)
            self._answer(conn, st, CODES.get(exc.status, INTERNAL), str(exc))
            return
        deadline_us = None
        if call.deadline is not None:
            deadline_us = int((call.deadline - time.monotonic()) * 1e6)
            if deadline_us <= 0:
                self._answer(conn, st, DEADLINE_EXCEEDED, "gRPC deadline exceeded before the request was queued")
                return
        server.inflight += 1

        def done(outputs: dict[str, np.ndarray] | None, exc: BaseException | None) -> None:
            server.inflight -= 1
            if exc is None:
                try:
                    message = encode_response(m.name, m.version, req, outputs, m.labels,
                                              batched=m.max_batch_size > 0).SerializeToString()
                except ServeError as e:
                    exc = e
                else:
                    m.stats.record_success(time.perf_counter_ns() - t0)
                    self._ok(conn, st, message)
                    return
            if isinstance(exc, ServeError):
                _record_failure(m, t0, exc)
                if isinstance(exc, Unavailable) and call.deadline is not None and time.monotonic() >= call.deadline:
                    self._answer(conn, st, DEADLINE_EXCEEDED, f"gRPC deadline exceeded: {exc}")
                else:
                    self._answer(conn, st, CODES.get(exc.status, INTERNAL), str(exc))
            elif isinstance(exc, asyncio.CancelledError):
                self._answer(conn, st, CANCELLED, "request cancelled")  # the stream was reset: nothing is sent
            else:  # a bug must not take the server down; the client gets the reason
                log.error("internal error in gRPC ModelInfer to %s", m.name, exc_info=exc)
                self._answer(conn, st, INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")

        try:
            call.handle = m.batcher.call(req.inputs, batch, server._timeout_us(m, req, deadline_us), done)
        except ServeError as exc:  # a full queue or a model shutting down: refused before it was queued
            done(None, exc)

    async def _unary(self, conn: H2Connection, st: Stream, name: str, request: Any) -> None:
        call: _Call = st.app
        ctx = _Context(call.deadline)
        try:
            coro = getattr(self, name)(request, ctx)
            if call.deadline is None:
                response = await coro
            else:
                response = await asyncio.wait_for(coro, max(0.0, call.deadline - time.monotonic()))
        except RpcAbort as exc:
            self._answer(conn, st, exc.code, exc.details)
        except asyncio.TimeoutError:
            self._answer(conn, st, DEADLINE_EXCEEDED, f"gRPC deadline exceeded while {name} ran")
        except asyncio.CancelledError:
            self._uncount(call)  # the stream was reset: nobody to answer
        except Exception as exc:  # noqa: BLE001 - the service's wrapper answers ServeErrors; this is a bug
            log.exception("internal error in gRPC %s", name)
            self._answer(conn, st, INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
        else:
            self._ok(conn, st, response.SerializeToString())


__all__ = ["NativeGrpc", "parse_timeout", "status_block"]
