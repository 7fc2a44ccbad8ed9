"""The gRPC adapter on resdeploy's own HTTP/2 connection (resdeploy/serve/http2.py), on the server's event loop.

The same service as the grpc.aio adapter (:mod:`resdeploy.serve.grpc_api`: messages, codes, the RPCs), the same
limits; only the transport differs. grpc.aio stays available as ``--grpc-transport grpcio``. ModelInfer, the one
RPC that matters for speed, goes from the request's last DATA frame into the core's inference sequence with no
task or coroutine, and is answered from its callback (as the HTTP fast path); the other RPCs run as tasks.

gRPC over HTTP/2, as the server side of https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md needs it:
``POST /inference.GRPCInferenceService/<Method>``, ``content-type: application/grpc[+proto]`` (else HTTP 415),
one length-prefixed message (``grpc-encoding`` identity, gzip or deflate; anything else UNIMPLEMENTED with
``grpc-accept-encoding``), ``grpc-timeout`` as the deadline (DEADLINE_EXCEEDED once it passes), the answer in
``grpc-status`` / ``grpc-message`` (percent-encoded) trailers, errors as trailers-only responses.

Limits (shared with HTTP, as grpc.aio enforces them): a message whose length prefix (or inflated
size) is over ``max_body_bytes`` gets RESOURCE_EXHAUSTED before more of it is buffered; at most
``max_connections`` RPCs run at once server-wide and at most ``max_connections`` connections are open (more get
RESOURCE_EXHAUSTED / GOAWAY); a connection that sends no preface within ``header_timeout_s``, a request whose
message does not arrive within ``body_timeout_s`` of its headers (DEADLINE_EXCEEDED) and a connection idle for
``keepalive_timeout_s`` are closed by a once-a-second sweep. On SIGTERM new RPCs get UNAVAILABLE while those in
progress finish; then the listener stops (:class:`resdeploy.serve.listener.Listener`) and every connection gets
GOAWAY with the last stream it processed, so a client knows the later ones were not and may retry them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import zlib
from typing import Any

from resdeploy.errors import InputError
from resdeploy.serve.core import SHUTTING_DOWN, DataPlane
from resdeploy.serve.grpc_api import (CANCELLED, DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
                                      SERVICE, UNAVAILABLE, UNIMPLEMENTED, GrpcApi, encode_infer, parse_request,
                                      status_code)
from resdeploy.serve.http2 import Fields, H2Connection, H2Limits, Stream
from resdeploy.serve.listener import Listener
from resdeploy.serve.protocol import ServeError

log = logging.getLogger("resdeploy.serve")

ACCEPT_ENCODING = b"identity,deflate,gzip"
_WBITS = {b"gzip": 31, b"deflate": 15}  # zlib's framing of each grpc-encoding
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_S = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_PREFIX = struct.Struct(">BL")

RESPONSE_HEAD: Fields = ((b":status", b"200"), (b"content-type", b"application/grpc"))
TRAILER_OK: Fields = ((b"grpc-status", b"0"),)


def _percent(message: str) -> bytes:
    """grpc-message: UTF-8, with '%' and every byte outside 0x20..0x7E percent-encoded."""
    out = bytearray()
    for b in message.encode("utf-8")[:4096]:
        out += b"%%%02X" % b if b < 0x20 or b > 0x7E or b == 0x25 else bytes([b])
    return bytes(out)


def status_block(code: int, message: str, http_status: int = 200, extra: Fields = ()) -> Fields:
    """A trailers-only response: the whole answer in one header block."""
    fields = [(b":status", str(http_status).encode()), (b"content-type", b"application/grpc"),
              (b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", _percent(message)))
    return tuple(fields) + tuple(extra)


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout (``1-8 digits`` + unit) in seconds, or None when malformed."""
    m = _TIMEOUT.fullmatch(value)
    return int(m.group(1)) * _UNIT_S[m.group(2)] if m else None


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


class NativeGrpc:
    """The gRPC service on resdeploy's HTTP/2 connections (see the module docstring); the H2App of each."""

    def __init__(self, core: DataPlane) -> None:
        self.core = core
        self.api = GrpcApi(core)
        c = core.config
        self.max_message = c.max_body_bytes
        self.limits = H2Limits(max_concurrent_streams=c.max_connections)
        self.connections: set[H2Connection] = set()
        self.rpcs = 0  # RPCs between their headers and their answer, server-wide
        self.listener: Listener | None = None
        self.port: int | None = None
        self._sweep: asyncio.TimerHandle | None = None
        from tritonclient.grpc import service_pb2 as pb

        # path -> (method name, request class); None for the RPCs not served (UNIMPLEMENTED, as Triton's extras)
        self.paths: dict[bytes, tuple[str, Any] | None] = {}
        for md in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            unary = not (md.client_streaming or md.server_streaming)
            self.paths[f"/{SERVICE}/{md.name}".encode()] = (
                (md.name, getattr(pb, md.input_type.name)) if md.name in GrpcApi.SERVED and unary else None)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        self.listener = Listener(lambda: H2Connection(self, self.limits))
        try:
            self.port = await self.listener.open(host, port, self.core.config.reuse_port)
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise InputError(f"cannot listen for gRPC on {address}: {exc}; pick a free port with --grpc-port "
                             "(0 = any free port) or turn gRPC off with --no-grpc") from None
        self._sweep = asyncio.get_running_loop().call_later(1.0, self._sweep_connections)
        return self.port

    async def drain(self, deadline: float, grace_s: float) -> int:
        """After SIGTERM (the core refuses new RPCs: they get UNAVAILABLE): wait for the RPCs in progress, at least
        ``grace_s`` and until ``deadline`` at most; stop listening; then every connection gets GOAWAY (the RPCs
        in flight on it are answered first, as they were accepted). Returns the RPCs still running at the end."""
        t0 = time.monotonic()
        while (self.rpcs or time.monotonic() - t0 < grace_s) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.listener is not None:
            await self.listener.stop()  # the connections taken from the accept queue are made: they get GOAWAY too
        while self.rpcs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        abandoned = self.rpcs
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in list(self.connections):
            conn.goaway("server is shutting down")
        settle = min(deadline, time.monotonic() + 0.25)
        while self.connections and time.monotonic() < settle:  # clients close on GOAWAY: no reset at exit
            await asyncio.sleep(0.01)
        return abandoned

    def _sweep_connections(self) -> None:
        c = self.core.config
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
        if len(self.connections) >= self.core.config.max_connections:
            conn.goaway(f"too many connections (at most {self.core.config.max_connections}); retry later")
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
        if self.core.draining:
            self._answer(conn, st, UNAVAILABLE, SHUTTING_DOWN)
            return
        if self.rpcs >= self.core.config.max_connections:
            self._answer(conn, st, RESOURCE_EXHAUSTED, f"concurrent RPC limit exceeded (at most "
                         f"{self.core.config.max_connections}); retry later")
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
        """ModelInfer without a task: the core's sequence, answered from its callback."""
        call: _Call = st.app

        def done(response: Any, exc: BaseException | None) -> None:
            if exc is None:
                self._ok(conn, st, response.SerializeToString())
            elif isinstance(exc, ServeError):
                self._answer(conn, st, status_code(exc), str(exc))
            else:  # cancelled: the stream was reset, nothing is sent
                self._answer(conn, st, CANCELLED, "request cancelled")

        call.handle = self.core.infer(request.model_name, request.model_version, lambda m: parse_request(request),
                                      encode_infer, done, call.deadline)

    async def _unary(self, conn: H2Connection, st: Stream, name: str, request: Any) -> None:
        call: _Call = st.app
        try:
            coro = self.api.call(name, request)
            if call.deadline is None:
                response = await coro
            else:
                response = await asyncio.wait_for(coro, max(0.0, call.deadline - time.monotonic()))
        except ServeError as exc:
            self._answer(conn, st, status_code(exc), str(exc))
        except asyncio.TimeoutError:
            self._answer(conn, st, DEADLINE_EXCEEDED, f"gRPC deadline exceeded while {name} ran")
        except asyncio.CancelledError:
            self._uncount(call)  # the stream was reset: nobody to answer
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down; the client gets the reason
            log.exception("internal error in gRPC %s", name)
            self._answer(conn, st, INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
        else:
            self._ok(conn, st, response.SerializeToString())


__all__ = ["NativeGrpc", "parse_timeout", "status_block"]
