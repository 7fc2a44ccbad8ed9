"""Test peers for resdeploy's HTTP/2 connection: a fake transport, and a blocking h2 (python-hyper) client.

h2 is an independent HTTP/2 implementation, so a test that passes with it checks our framing, flow control and
HPACK against someone else's reading of RFC 9113 / RFC 7541, not against our own.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def raw_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every whole frame in ``data``."""
    out, pos = [], 0
    while len(data) - pos >= 9:
        n = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    return out


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.data += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out


def h2_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


def grpc_headers(path: bytes, **extra: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *((k.replace("_", "-").encode(), v) for k, v in extra.items())]


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(payload)) + payload


@dataclass
class Answer:
    """What came back on one stream."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # GOAWAY error code
    ended: bool = False

    @property
    def fields(self) -> dict[bytes, bytes]:
        """Trailers, or the headers of a trailers-only answer."""
        return self.trailers or self.headers

    @property
    def status(self) -> int | None:
        s = self.fields.get(b"grpc-status")
        return int(s) if s is not None else None

    @property
    def message(self) -> str:
        from urllib.parse import unquote

        return unquote(self.fields.get(b"grpc-message", b"").decode("ascii"))

    @property
    def payload(self) -> bytes:
        assert len(self.body) >= 5, self
        return self.body[5:5 + struct.unpack(">I", self.body[1:5])[0]]


def call(address: str, headers: list[tuple[bytes, bytes]], data: bytes | None, *, end: bool = True,
         timeout: float = 15.0, sock: socket.socket | None = None) -> Answer:
    """One stream on a fresh connection (or ``sock``): send ``headers`` and ``data``, read until the stream ends
    or is reset, or the connection is closed."""
    host, port = address.rsplit(":", 1)
    s = sock or socket.create_connection((host, int(port)), timeout=timeout)
    c = h2_client()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, headers, end_stream=data is None and end)
    if data is not None:
        c.send_data(sid, data, end_stream=end)
    s.sendall(c.data_to_send())
    ans = Answer()
    deadline = time.monotonic() + timeout
    try:
        while not ans.ended and time.monotonic() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            for ev in c.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    ans.headers = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    ans.body += ev.data
                    c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    ans.trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    ans.ended = True
                elif isinstance(ev, h2.events.StreamReset):
                    ans.reset, ans.ended = ev.error_code, True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    ans.goaway, ans.ended = ev.error_code, True
            out = c.data_to_send()
            if out:
                s.sendall(out)
    finally:
        if sock is None:
            s.close()
    return ans
