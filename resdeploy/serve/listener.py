"""A listening TCP socket that can stop without resetting the connections the kernel already completed.

Closing a listening socket resets (RST) every connection still in its accept queue: clients whose handshake
completed, who may have sent their request, get "connection reset" instead of an answer or a refusal. Under
sustained load there is always such a connection. :meth:`Listener.stop` avoids that on Linux: a socket filter
that drops every packet first stops new handshakes from completing (a client's SYN goes unanswered; its retry
meets the closed port: "connection refused"), then the queue is emptied with ``accept`` and each connection is
served like any other, then the socket closes. Elsewhere (no ``SO_ATTACH_FILTER``) it empties the queue and
closes, leaving the microseconds between the two as the only window.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("resdeploy.serve")

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Linux
_DROP_ALL = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # one BPF instruction: return 0 (drop)


def bind(host: str, port: int, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (0: any free port). Raises OSError as ``bind`` does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def drop_new_connections(sock: socket.socket) -> bool:
    """Attach a drop-everything socket filter: no handshake completes on ``sock`` from now on. False where the
    platform has no socket filters."""
    prog = struct.pack("HL", 1, ctypes.addressof(_DROP_ALL))  # struct sock_fprog {len, *filter}
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    except OSError:
        return False
    return True


class Listener:
    """``factory``'s protocol on every connection to one listening socket, until :meth:`stop`.

    It accepts by itself (a reader on the socket, as asyncio's own server does) so that it knows every
    connection accepted but not yet made: :meth:`stop` returns once each of them has its protocol."""

    ACCEPT_RETRY_S = 1.0  # out of file descriptors: try accepting again after this (asyncio's delay)

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        self.sock: socket.socket | None = None
        self._making: set[asyncio.Task] = set()
        self._listening = False

    async def open(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port``; returns the port (the one picked when ``port`` is 0)."""
        self.sock = bind(host, port, reuse_port)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)
        self._listening = True
        return self.sock.getsockname()[1]

    def _accept(self) -> int:
        """Accept what the queue holds; returns how many."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        taken = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as exc:  # e.g. out of file descriptors: stop reading for a moment, as asyncio does
                log.warning("accepting a connection: %s; retrying in %g s", exc, self.ACCEPT_RETRY_S)
                if self._listening:
                    loop.remove_reader(self.sock.fileno())
                    loop.call_later(self.ACCEPT_RETRY_S, self._resume)
                return taken
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self.factory, sock=conn))
            self._making.add(task)
            task.add_done_callback(self._making.discard)
            taken += 1

    def _resume(self) -> None:
        if self._listening and self.sock is not None:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    async def stop(self) -> int:
        """Stop listening; the connections already completed by the kernel are served (made, with their
        protocols, when this returns). Returns how many were taken from the accept queue here."""
        if self.sock is None:
            return 0
        sock, self.sock = self.sock, None
        if self._listening:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._listening = False
        drop_new_connections(sock)
        self.sock = sock
        taken = self._accept()  # no await between the last accept and the close: nothing can slip in between
        self.sock = None
        sock.close()
        if self._making:
            await asyncio.gather(*self._making, return_exceptions=True)  # a client that already left is no matter
        return taken

    def close(self) -> None:
        """Stop listening at once (startup failures); queued connections are reset by the kernel."""
        if self.sock is not None:
            if self._listening:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self._listening = False
            self.sock.close()
            self.sock = None


__all__ = ["Listener", "bind", "drop_new_connections"]
