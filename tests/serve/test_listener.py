"""The listener's stop: connections the kernel completed before it are served, none is reset, later ones refused."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from resdeploy.serve.listener import Listener, bind, drop_new_connections


class Echo(asyncio.Protocol):
    def connection_made(self, transport):  # noqa: ANN001
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)
        self.transport.close()


def test_stop_serves_the_accept_queue_and_refuses_later_clients():
    async def main() -> tuple[list[bytes], int, type]:
        listener = Listener(Echo)
        port = await listener.open("127.0.0.1", 0)
        # Blocking connects from the loop's own thread: the kernel completes them while the loop cannot accept,
        # so all five sit in the accept queue, their requests sent, when stop() runs.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
        taken = await listener.stop()
        late = None
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError as exc:
            late = type(exc)
        loop = asyncio.get_running_loop()
        answers = [await loop.run_in_executor(None, c.recv, 100) for c in clients]
        for c in clients:
            c.close()
        return answers, taken, late

    answers, taken, late = asyncio.run(main())
    assert taken == 5
    assert answers == [b"echo:hello %d" % i for i in range(5)]  # served, none reset
    assert late is ConnectionRefusedError


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters (SO_ATTACH_FILTER) are Linux's")
def test_the_drop_filter_stops_handshakes_from_completing():
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        before = socket.create_connection(("127.0.0.1", port), timeout=2)  # completes: in the accept queue
        assert drop_new_connections(sock)
        with pytest.raises((socket.timeout, TimeoutError)):  # the SYN is dropped: no answer at all
            socket.create_connection(("127.0.0.1", port), timeout=0.3)
        sock.setblocking(True)
        conn, _ = sock.accept()  # what was queued before the filter is still there
        conn.close()
        before.close()
    finally:
        sock.close()
