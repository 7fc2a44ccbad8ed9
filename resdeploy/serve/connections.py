"""The HTTP/1.1 server's connections: who is connected, what each is doing, deadlines, a cap, and the SIGTERM drain.

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
* :meth:`ConnectionGuard.drain` is the shutdown, bounded under any load: the requests in progress at the signal
  are answered (those that arrive meanwhile get 503 and ``Connection: close``, and never hold it open); then the
  listener stops (:class:`resdeploy.serve.listener.Listener`: late clients are refused, none is reset), each
  connection accepted up to then gets its answer, and quiet ones are closed. It says how many requests (if
  any) had to be abandoned at the deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from resdeploy.serve.listener import Listener

log = logging.getLogger("resdeploy.serve")

NEW, HEAD, BUSY, IDLE = "new", "head", "busy", "idle"
SETTLE_S = 0.25  # during the drain, a connection quiet for less than this may still have a request on the wire
SWEEP_S = 0.25  # how often deadlines are checked (a deadline is met to within this)


def raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, written without aiohttp."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 at once, then closed (after a moment, so the client can read it)."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.message)
        asyncio.get_running_loop().call_later(0.5, transport.close)

    def data_received(self, data: bytes) -> None:  # whatever the client sends is not read
        pass


# fast(handler, data): None when the fast path took the read (a whole plain infer request), else an object whose
# ``rest`` says how many more bytes of that request aiohttp will read (None: unknown; see fastpath.Declined).
FastCall = Callable[["GuardedHandler", bytes], Any]


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler plus the phase the guard reads; aiohttp parses and dispatches as usual,
    except a whole plain infer request on an idle connection, which ``guard.fast`` may answer itself."""

    def __init__(self, guard: "ConnectionGuard", manager: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.phase = NEW
        self.since = time.monotonic()
        self.requests = 0  # requests started on this connection
        self.answered = 0  # and finished
        self.aiohttp_only = guard.fast is None  # set for good once aiohttp may hold part of a later request
        self.rest = 0  # bytes still to come of a request the fast path declined before it was whole

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard.opened(self, transport)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase in (NEW, IDLE):  # the first bytes of a request: its header deadline starts now
            if not self.aiohttp_only:
                if not self.aiohttp_idle():  # still finishing a response: this read queues behind it, unframed
                    self.aiohttp_only = True
                else:
                    declined = self.guard.fast(self, data)
                    if declined is None:  # answered (or being answered) by the fast path
                        return
                    self.aiohttp_only, self.rest = declined.rest is None, declined.rest or 0
            self.phase, self.since = HEAD, time.monotonic()
        elif not self.aiohttp_only:  # the rest of a declined request; a byte past its end is a pipelined request
            self.aiohttp_only, self.rest = len(data) > self.rest, max(0, self.rest - len(data))
        super().data_received(data)

    def aiohttp_idle(self) -> bool:
        """aiohttp holds no queued, partial or in-progress request on this connection (aiohttp internals: the
        fast path is on only for the aiohttp versions it is tested on, see resdeploy.serve.fastpath)."""
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
        self.guard.closed(self)
        super().connection_lost(exc)


@dataclass
class DrainReport:
    """What the drain did; ``abandoned`` > 0 means requests were cut off (the exit code says so too)."""

    in_progress_at_signal: int = 0
    answered_during_drain: int = 0  # every response written after the signal (503s to late arrivals included)
    taken_from_backlog: int = 0  # connections the kernel had completed when the listener stopped
    abandoned: int = 0
    idle_closed: int = 0
    seconds: float = 0.0
    listening_s: float = 0.0


class ConnectionGuard:
    """Every connection of one HTTP listener, its deadlines (``limits``: a ServerConfig's ``header_timeout_s``,
    ``body_timeout_s``, ``keepalive_timeout_s`` and ``max_connections``) and the drain."""

    def __init__(self, limits: Any, fast: FastCall | None = None) -> None:
        self.limits = limits
        self.fast = fast  # the HTTP fast path (resdeploy.serve.fastpath); None: everything through aiohttp
        self.conns: dict[GuardedHandler, asyncio.BaseTransport] = {}
        self.refused = self.header_timeouts = self.keepalive_closes = self.accepted = 0
        self.draining = False
        self.answered_while_draining = 0
        self.listener: Listener | None = None
        self._sweeper: asyncio.Task | None = None

    # -- bookkeeping (called by GuardedHandler and the HTTP adapter's middleware) -------------------------
    def opened(self, handler: GuardedHandler, transport: asyncio.BaseTransport) -> None:
        self.conns[handler] = transport
        self.accepted += 1

    def closed(self, handler: GuardedHandler) -> None:
        self.conns.pop(handler, None)

    def request_started(self, handler: Any) -> None:
        if isinstance(handler, GuardedHandler):
            handler.phase, handler.since = BUSY, time.monotonic()
            handler.requests += 1

    def request_finished(self, handler: Any) -> None:
        if isinstance(handler, GuardedHandler):
            handler.phase, handler.since = IDLE, time.monotonic()
            handler.answered += 1
        if self.draining:
            self.answered_while_draining += 1

    def count(self, *phases: str) -> int:
        return sum(1 for h in self.conns if h.phase in phases)

    # -- listening ---------------------------------------------------------------------------------------
    async def listen(self, runner: web.AppRunner, host: str, port: int, reuse_port: bool = False) -> int:
        """Start accepting on host:port (0 = any free port) with ``runner``'s application; returns the port."""
        manager = runner.server
        assert manager is not None, "runner.setup() first"
        # aiohttp's own keep-alive timer also runs from accept and closes silently; it stays as a backstop only,
        # later than the sweeper, so a client with a half-sent request gets the sweeper's 408 first.
        backstop = max(self.limits.keepalive_timeout_s, self.limits.header_timeout_s) + 4 * SWEEP_S
        kwargs = dict(loop=asyncio.get_running_loop(), keepalive_timeout=backstop, access_log=None,
                      lingering_time=min(10.0, self.limits.body_timeout_s),
                      # Bodies are read raw: the server inflates gzip/deflate itself, bounded by the body's size.
                      auto_decompress=False)
        over_cap = raw_response(503, "Service Unavailable",
                                f"server has {self.limits.max_connections} open connections (--max-connections); "
                                "retry later or reuse a keep-alive connection")

        def factory() -> asyncio.Protocol:
            if len(self.conns) >= self.limits.max_connections:
                self.refused += 1
                return Refuse(over_cap)
            return GuardedHandler(self, manager, **kwargs)

        self.listener = Listener(factory)
        bound = await self.listener.open(host, port, reuse_port)
        self._sweeper = asyncio.ensure_future(self._sweep())
        return bound

    async def _sweep(self) -> None:
        timeout408 = raw_response(408, "Request Timeout",
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
        """The shutdown, after the server turned not-ready (every new request gets 503 from then on).

        1. Keep listening for ``grace_s`` and until each request in progress at the signal (head or body being
           received, or being handled) is answered. Requests that arrive meanwhile are answered 503 at once and
           do not extend this.
        2. Stop listening (new clients are refused; those the kernel already accepted are served).
        3. Answer every request on the connections accepted up to then; close each connection once it has been
           quiet for ``SETTLE_S`` (its request may be on the wire until then). A request that started after the
           signal and is still incomplete then is cut off (it was never accepted).
        ``deadline`` (``time.monotonic()``) bounds it all; what is still in progress then is abandoned."""
        t0 = time.monotonic()
        self.draining = True
        owed = {h: h.answered + 1 for h in self.conns if h.phase in (HEAD, BUSY)}
        report = DrainReport(in_progress_at_signal=len(owed))

        def owing() -> bool:
            return any(h in self.conns and h.answered < n for h, n in owed.items())

        while time.monotonic() < deadline and (owing() or time.monotonic() - t0 < grace_s):
            await asyncio.sleep(0.01)
        if self.listener is not None:
            report.taken_from_backlog = await self.listener.stop()
        report.listening_s = time.monotonic() - t0
        late = raw_response(503, "Service Unavailable", "server is shutting down; retry on another replica")
        while self.conns and time.monotonic() < deadline:
            now = time.monotonic()
            for h, transport in list(self.conns.items()):
                quiet = now - h.since
                if h.phase in (NEW, IDLE) and quiet >= SETTLE_S:
                    report.idle_closed += 1
                    self._close(h, transport)
                elif h.phase == HEAD and h.answered >= owed.get(h, 0) and quiet >= SETTLE_S and isinstance(transport, asyncio.Transport):
                    transport.write(late)  # a late request still incomplete: answered, then cut off
                    self._close(h, transport)
            await asyncio.sleep(0.01)
        report.abandoned = self.count(HEAD, BUSY)
        self.close()
        report.answered_during_drain = self.answered_while_draining
        report.seconds = time.monotonic() - t0
        return report

    def close(self) -> None:
        """Stop listening and close every connection at once (startup failures, the drain's deadline)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.listener is not None:
            self.listener.close()
        for h, transport in list(self.conns.items()):
            self._close(h, transport)


__all__ = ["ConnectionGuard", "DrainReport", "GuardedHandler", "raw_response"]
