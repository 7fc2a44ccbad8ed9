"""The server's connections: who is connected, what each is doing, deadlines, a cap, and the SIGTERM drain.

aiohttp alone gives an idle keep-alive connection an hour and a request's headers no deadline at all, so one
client that connects and trickles (or never sends) its headers holds a socket and memory forever; and its
``runner.cleanup()`` shutdown cannot tell a request that is half received from an idle connection. This
module owns the listening socket instead of ``web.TCPSite`` and tracks every connection's phase:

* ``new``: accepted, no byte yet; ``head``: bytes of a request arrived, the handler has not started
  (headers still coming); ``busy``: a handler runs (it reads the body under its own body deadline);
  ``idle``: between requests on a keep-alive connection.
* A sweeper closes ``new``/``head`` connections older than ``header_timeout_s`` (``head`` ones get a 408
  first: the client sent something and deserves an answer) and ``idle`` ones older than
  ``keepalive_timeout_s``.
* Past ``max_connections`` open connections a new one gets a 503 and is closed at once: a flood of idle
  sockets costs a file descriptor each for a moment, never the server.
* :meth:`ConnectionGuard.drain` is the shutdown: keep listening (answering 503, ``Connection: close``)
  until no request is in progress and nothing new is arriving, stop listening, let the connections
  accepted up to that moment finish, then close what is left and say how many requests (if any) were
  abandoned. Every request whose bytes reached the server gets a response.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from resdeploy.serve.fastpath import Declined

log = logging.getLogger("resdeploy.serve")

NEW, HEAD, BUSY, IDLE = "new", "head", "busy", "idle"
SETTLE_S = 0.1  # a connection accepted this recently may still have its request bytes in flight
SWEEP_S = 0.25  # how often deadlines are checked (a deadline is met to within this)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection deadlines and the connection cap (``resdeploy serve`` flags of the same names)."""

    header_timeout_s: float = 10.0  # from accept (or the end of the last response) to a complete request head
    body_timeout_s: float = 60.0  # to receive a request body once its headers are in
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this (nginx's default)
    max_connections: int = 1024  # open connections; one more is answered 503 and closed

    def __post_init__(self) -> None:
        from resdeploy.errors import InputError

        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} is {getattr(self, name)}; give a positive number of seconds")
        if self.max_connections < 1:
            raise InputError(f"max_connections is {self.max_connections}; give at least 1")


def _raw_response(status: int, reason: str, message: str) -> bytes:
    import json

    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 at once, then closed (after a moment, so the client can read it)."""

    def __init__(self, message: bytes) -> None:
        self._message = message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._message)
        asyncio.get_running_loop().call_later(0.5, transport.close)

    def data_received(self, data: bytes) -> None:  # whatever the client sends is not read
        pass


# The aiohttp internals the fast path reads to know aiohttp holds nothing of this connection's next request.
_AIOHTTP_STATE = ("_messages", "_payload_parser", "_upgraded", "_force_close", "_close", "_request_in_progress",
                  "_next_keepalive_close_time", "_keepalive_timeout", "_loop")
FAST_PATH_POSSIBLE = all(hasattr(web.RequestHandler, a) for a in _AIOHTTP_STATE)


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler plus the phase the guard reads; aiohttp parses and dispatches as usual,
    except a whole plain infer request on an idle connection, which ``guard.fast`` may answer itself."""

    def __init__(self, guard: "ConnectionGuard", manager: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.phase = NEW
        self.since = time.monotonic()
        self.requests = 0
        self.aiohttp_only = not FAST_PATH_POSSIBLE  # set for good once aiohttp may hold part of a later request
        self.rest = 0  # bytes still to come of a request the fast path declined before it was whole

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard._opened(self, transport)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase in (NEW, IDLE):  # the first bytes of a request: its header deadline starts now
            fast = self.guard.fast
            if fast is not None and not self.aiohttp_only:
                if not self.aiohttp_idle():  # still finishing a response: this read queues behind it, unframed
                    self.aiohttp_only = True
                else:
                    declined = fast(self, data)
                    if declined is None:  # answered (or being answered) by the fast path
                        return
                    self.aiohttp_only, self.rest = declined.rest is None, declined.rest or 0
            self.phase, self.since = HEAD, time.monotonic()
        elif not self.aiohttp_only:  # the rest of a declined request; a byte past its end is a pipelined request
            self.aiohttp_only, self.rest = len(data) > self.rest, max(0, self.rest - len(data))
        super().data_received(data)

    def aiohttp_idle(self) -> bool:
        """aiohttp holds no queued, partial or in-progress request on this connection."""
        return not (self._messages or self._payload_parser is not None or self._upgraded or self._force_close
                    or self._close or self._request_in_progress)

    def fast_started(self, transport: asyncio.Transport) -> None:
        """The fast path took a request: busy, no more reads until it is answered (one response at a time)."""
        self.guard.request_started(self)
        transport.pause_reading()
        self._push_keepalive()

    def fast_finished(self, transport: asyncio.Transport) -> None:
        self.guard.request_finished(self)
        self._push_keepalive()
        if not transport.is_closing():
            transport.resume_reading()

    def _push_keepalive(self) -> None:
        # aiohttp's own keep-alive timer (a backstop behind the sweeper) only moves on aiohttp's responses; without
        # this it would close a connection the fast path keeps busy, as idle, a while after accept.
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard._closed(self)
        super().connection_lost(exc)


@dataclass
class DrainReport:
    """What the drain did; ``abandoned`` > 0 means requests were cut off (the exit code says so too)."""

    in_progress_at_signal: int = 0
    answered_during_drain: int = 0
    abandoned: int = 0
    idle_closed: int = 0
    seconds: float = 0.0
    listening_s: float = 0.0


@dataclass
class ConnectionGuard:
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    conns: dict[GuardedHandler, asyncio.BaseTransport] = field(default_factory=dict)
    refused: int = 0
    header_timeouts: int = 0
    keepalive_closes: int = 0
    accepted: int = 0
    last_accept: float = 0.0
    draining: bool = False
    answered_while_draining: int = 0
    # The server's HTTP fast path: fast(handler, data) answers a whole plain infer request and returns None, or
    # returns why it left the read to aiohttp (resdeploy/serve/fastpath.py). None here: everything through aiohttp.
    fast: Callable[[GuardedHandler, bytes], Declined | None] | None = None
    _server: asyncio.AbstractServer | None = None
    _sweeper: asyncio.Task | None = None

    # -- bookkeeping (called by GuardedHandler and the server's middleware) ------------------------------
    def _opened(self, handler: GuardedHandler, transport: asyncio.BaseTransport) -> None:
        self.conns[handler] = transport
        self.accepted += 1
        self.last_accept = time.monotonic()

    def _closed(self, handler: GuardedHandler) -> None:
        self.conns.pop(handler, None)

    def request_started(self, handler: Any) -> None:
        if isinstance(handler, GuardedHandler):
            handler.phase, handler.since = BUSY, time.monotonic()
            handler.requests += 1

    def request_finished(self, handler: Any) -> None:
        if isinstance(handler, GuardedHandler):
            handler.phase, handler.since = IDLE, time.monotonic()
        if self.draining:
            self.answered_while_draining += 1

    def count(self, *phases: str) -> int:
        return sum(1 for h in self.conns if h.phase in phases)

    # -- listening ---------------------------------------------------------------------------------------
    async def listen(self, runner: web.AppRunner, host: str, port: int, backlog: int = 1024, reuse_port: bool = False) -> int:
        """Start accepting on host:port (0 = any free port) with ``runner``'s application; returns the port."""
        loop = asyncio.get_running_loop()
        manager = runner.server
        assert manager is not None, "runner.setup() first"
        # aiohttp's own keep-alive timer also runs from accept and closes silently; it stays as a backstop only,
        # later than the sweeper, so a client with a half-sent request gets the sweeper's 408 first.
        backstop = max(self.limits.keepalive_timeout_s, self.limits.header_timeout_s) + 4 * SWEEP_S
        kwargs = dict(loop=loop, keepalive_timeout=backstop, access_log=None,
                      lingering_time=min(10.0, self.limits.body_timeout_s),
                      # Bodies are read raw: the server inflates gzip/deflate itself, bounded by the body's size.
                      auto_decompress=False)
        over_cap = _raw_response(503, "Service Unavailable",
                                 f"server has {self.limits.max_connections} open connections (--max-connections); "
                                 "retry later or reuse a keep-alive connection")

        def factory() -> asyncio.Protocol:
            if len(self.conns) >= self.limits.max_connections:
                self.refused += 1
                return _Refuse(over_cap)
            return GuardedHandler(self, manager, **kwargs)

        self._server = await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True, reuse_port=reuse_port or None,
                                                family=socket.AF_INET if host and ":" not in host else socket.AF_UNSPEC)
        self._sweeper = asyncio.ensure_future(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        timeout408 = _raw_response(408, "Request Timeout",
                                   f"request headers not received within {self.limits.header_timeout_s} s "
                                   "(--header-timeout); send the whole request promptly")
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for h, transport in list(self.conns.items()):
                age = now - h.since
                if h.phase in (NEW, HEAD) and age > self.limits.header_timeout_s:
                    self.header_timeouts += 1
                    if h.phase == HEAD and isinstance(transport, asyncio.Transport):
                        transport.write(timeout408)
                    self._close(h, transport)
                elif h.phase == IDLE and age > self.limits.keepalive_timeout_s:
                    self.keepalive_closes += 1
                    self._close(h, transport)

    def _close(self, handler: GuardedHandler, transport: asyncio.BaseTransport) -> None:
        handler.force_close()
        transport.close()
        self.conns.pop(handler, None)

    # -- shutdown ----------------------------------------------------------------------------------------
    async def drain(self, deadline: float, grace_s: float) -> DrainReport:
        """Answer everything that arrives until the requests in progress are done; then stop listening, finish
        what was accepted meanwhile, and close the rest. ``deadline`` is a ``time.monotonic()`` instant."""
        t0 = time.monotonic()
        self.draining = True
        report = DrainReport(in_progress_at_signal=self.count(HEAD, BUSY))

        def settled(now: float, listening: bool) -> bool:
            if self.count(HEAD, BUSY):
                return False
            # A connection accepted a moment ago may have its request on the wire: give it time to arrive.
            if any(h.phase == NEW and now - h.since < SETTLE_S for h in self.conns):
                return False
            return not listening or (now - t0 >= grace_s and now - self.last_accept >= SETTLE_S)

        # 1. Still listening: late clients get a 503 with Connection: close rather than a refused connection.
        while time.monotonic() < deadline and not settled(time.monotonic(), True):
            await asyncio.sleep(0.01)
        if self._server is not None:
            self._server.close()  # no more accepts; the connections already accepted stay open
        report.listening_s = time.monotonic() - t0
        # 2. Connections accepted up to the close finish their requests (each gets its answer).
        await asyncio.sleep(0)
        while time.monotonic() < deadline and not settled(time.monotonic(), False):
            await asyncio.sleep(0.01)
        report.abandoned = self.count(HEAD, BUSY)
        report.idle_closed = len(self.conns) - report.abandoned
        if self._sweeper is not None:
            self._sweeper.cancel()
        for h, transport in list(self.conns.items()):
            self._close(h, transport)
        report.answered_during_drain = self.answered_while_draining
        report.seconds = time.monotonic() - t0
        return report

    def close(self) -> None:
        """Stop listening and close every connection at once (startup failures, tests)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for h, transport in list(self.conns.items()):
            self._close(h, transport)


__all__ = ["ConnectionGuard", "ConnectionLimits", "DrainReport", "GuardedHandler"]
