"""resdeploy's HTTP/2 connection in-process: a valid exchange with h2 as the client, then each rule broken.

The server side gets bytes from an h2 client (or hand-made frames for what h2 refuses to send) through a fake
transport; the test app answers whole requests with a configurable response.
"""

from __future__ import annotations

import struct

import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

pytest.importorskip("h2")

from resdeploy.serve import http2  # noqa: E402
from resdeploy.serve.http2 import H2Connection, H2Limits, encode_headers  # noqa: E402
from tests.serve.h2_peer import PREFACE, FakeTransport, h2_client, parse_frames, raw_frame  # noqa: E402

REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"), (b":authority", b"x"),
       (b"content-type", b"application/grpc")]
HEAD = encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
TRAIL = encode_headers([(b"grpc-status", b"0")])


class App:
    """Records the callbacks; answers a whole request with ``reply`` bytes of data (None: headers only)."""

    def __init__(self, reply: bytes | None = b"pong", answer_on_open: bool = False) -> None:
        self.reply = reply
        self.answer_on_open = answer_on_open
        self.events: list[tuple[str, int]] = []
        self.bodies: dict[int, bytes] = {}
        self.lost = False

    def connection_made(self, conn):
        pass

    def stream_opened(self, conn, st):
        self.events.append(("opened", st.sid))
        if self.answer_on_open:
            conn.respond(st, HEAD + encode_headers([(b"grpc-status", b"8")]))

    def stream_data(self, conn, st):
        self.events.append(("data", st.sid))

    def stream_ended(self, conn, st):
        self.events.append(("ended", st.sid))
        self.bodies[st.sid] = bytes(st.body)
        if self.reply is None:
            conn.respond(st, HEAD + TRAIL)
        else:
            conn.respond(st, HEAD, self.reply, TRAIL)

    def stream_reset(self, conn, st):
        self.events.append(("reset", st.sid))

    def connection_lost(self, conn):
        self.lost = True


def server(app=None, **limits):
    app = app or App()
    t = FakeTransport()
    conn = H2Connection(app, H2Limits(**limits))
    conn.connection_made(t)
    return conn, t, app


def exchange(conn, t, client):
    """Client bytes to the server, the server's answer back to the client: the client's events."""
    conn.data_received(client.data_to_send())
    events = client.receive_data(t.take())
    out = client.data_to_send()
    if out:
        conn.data_received(out)
    return events


def test_a_request_gets_its_response_and_trailers():
    conn, t, app = server()
    c = h2_client()
    c.send_headers(1, REQ)
    c.send_data(1, b"ping", end_stream=True)
    events = exchange(conn, t, c)
    kinds = [type(e).__name__ for e in events]
    assert "ResponseReceived" in kinds and "TrailersReceived" in kinds and "StreamEnded" in kinds, kinds
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert data == b"pong" and app.bodies[1] == b"ping"
    trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived)).headers
    assert dict(trailers)[b"grpc-status"] == b"0"
    assert conn.streams == {} and conn.ready
    # the connection goes on: a second stream, headers-only answer
    c.send_headers(3, REQ, end_stream=True)
    events = exchange(conn, t, c)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert app.events[-2:] == [("opened", 3), ("ended", 3)]


def test_ping_is_acked_with_its_payload_and_settings_are_acked():
    conn, t, _ = server()
    c = h2_client()
    c.ping(b"12345678")
    events = exchange(conn, t, c)
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in events)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)


def test_response_waits_for_the_peer_window_and_is_split_to_its_frame_size():
    conn, t, _ = server(App(reply=b"x" * 100_000))
    c = h2_client()
    c.send_headers(1, REQ, end_stream=True)
    conn.data_received(c.data_to_send())
    frames = parse_frames(t.data)
    data = [f for f in frames if f[0] == http2.DATA]
    assert sum(len(f[3]) for f in data) == 65535  # the default window, no more
    assert all(len(f[3]) <= 16384 for f in data)  # the default max frame size
    assert not any(f[0] == http2.HEADERS and f[1] & http2.END_STREAM for f in frames)  # trailers wait
    got, ended = b"", False
    for _ in range(10):  # the client reads, acknowledges (WINDOW_UPDATE), and the rest comes
        for e in c.receive_data(t.take()):
            if isinstance(e, h2.events.DataReceived):
                got += e.data
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            ended = ended or isinstance(e, h2.events.StreamEnded)
        if ended:
            break
        conn.data_received(c.data_to_send())
    assert ended and got == b"x" * 100_000


def test_an_early_answer_resets_the_unfinished_request_with_no_error():
    conn, t, app = server(App(answer_on_open=True))
    c = h2_client()
    c.send_headers(1, REQ)
    c.send_data(1, b"part")
    conn.data_received(c.data_to_send())
    frames = parse_frames(t.take())
    rst = [f for f in frames if f[0] == http2.RST_STREAM]
    assert rst and struct.unpack(">I", rst[0][3])[0] == http2.NO_ERROR
    assert ("data", 1) not in app.events and ("ended", 1) not in app.events  # late DATA is dropped
    assert conn.streams == {}


def test_a_client_reset_reaches_the_app():
    conn, t, app = server()
    c = h2_client()
    c.send_headers(1, REQ)
    c.reset_stream(1)
    conn.data_received(c.data_to_send())
    assert app.events == [("opened", 1), ("reset", 1)] and conn.streams == {}


def test_connection_lost_resets_open_streams():
    conn, t, app = server()
    c = h2_client()
    c.send_headers(1, REQ)
    conn.data_received(c.data_to_send())
    conn.connection_lost(None)
    assert ("reset", 1) in app.events and app.lost


def test_a_smaller_peer_header_table_gets_a_size_update_first():
    conn, t, _ = server()
    c = h2_client()
    c.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    exchange(conn, t, c)  # the server ACKs; h2 then holds its decoder to the smaller table
    c.send_headers(1, REQ, end_stream=True)
    events = exchange(conn, t, c)  # h2's decoder rejects a block that does not start with the update
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_encode_headers_round_trips_through_hpack():
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"13"),
              (b"grpc-message", b"x" * 300), (b"x-" + b"n" * 200, b"")]
    assert hpack.Decoder().decode(encode_headers(fields), raw=True) == fields
    assert encode_headers([(b":status", b"200")]) == b"\x88"  # static table entry 8


def test_too_many_streams_are_refused_the_connection_goes_on():
    conn, t, app = server(App(), max_concurrent_streams=1)
    c = h2_client()
    c.send_headers(1, REQ)
    c.send_headers(3, REQ)
    conn.data_received(c.data_to_send())
    rst = [f for f in parse_frames(t.take()) if f[0] == http2.RST_STREAM]
    assert [(f[2], struct.unpack(">I", f[3])[0]) for f in rst] == [(3, http2.REFUSED_STREAM)]
    assert list(conn.streams) == [1]


@pytest.mark.parametrize("fields, why", [
    ([(b":method", b"POST"), (b":scheme", b"http"), (b"content-type", b"x")], "no :path"),
    (REQ + [(b"Content-Length", b"1")], "upper-case name"),
    (REQ + [(b"connection", b"keep-alive")], "connection-specific field"),
    ([(b"content-type", b"x")] + REQ, "pseudo-header after a regular field"),
    (REQ + [(b":status", b"200")], "a response pseudo-header"),
])
def test_malformed_request_headers_reset_the_stream_only(fields, why):
    conn, t, app = server()
    t.take()
    conn.data_received(PREFACE + raw_frame(http2.SETTINGS, 0, 0) +
                       raw_frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, hpack.Encoder().encode(fields)))
    frames = parse_frames(t.take())
    assert [(f[0], struct.unpack(">I", f[3])[0]) for f in frames if f[0] == http2.RST_STREAM] == \
        [(http2.RST_STREAM, http2.PROTOCOL_ERROR)], why
    assert not any(f[0] == http2.GOAWAY for f in frames) and app.events == []


def _valid_headers(sid=1, flags=http2.END_HEADERS | http2.END_STREAM):
    return raw_frame(http2.HEADERS, flags, sid, hpack.Encoder().encode(REQ))


START = PREFACE + raw_frame(http2.SETTINGS, 0, 0)


@pytest.mark.parametrize("data, code, why", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", http2.PROTOCOL_ERROR, "not an HTTP/2 client preface"),
    (PREFACE + raw_frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR, "must be followed by SETTINGS"),
    (START + raw_frame(http2.DATA, 0, 0, b"x"), http2.PROTOCOL_ERROR, "DATA on stream 0"),
    (START + raw_frame(http2.DATA, 0, 5, b"x"), http2.PROTOCOL_ERROR, "DATA on idle stream 5"),
    (START + struct.pack(">I", 2 << 20)[1:] + bytes([0, 0]) + struct.pack(">I", 1), http2.FRAME_SIZE_ERROR,
     "SETTINGS_MAX_FRAME_SIZE"),
    (START + _valid_headers(sid=2), http2.PROTOCOL_ERROR, "odd-numbered streams"),
    (START + raw_frame(http2.PUSH_PROMISE, http2.END_HEADERS, 1, b"\0\0\0\2"), http2.PROTOCOL_ERROR, "PUSH_PROMISE"),
    (START + _valid_headers(flags=0) + raw_frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR,
     "interrupted"),
    (START + raw_frame(http2.CONTINUATION, http2.END_HEADERS, 1, b""), http2.PROTOCOL_ERROR, "CONTINUATION without"),
    (START + raw_frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), http2.COMPRESSION_ERROR,
     "cannot be decoded"),
    (START + raw_frame(http2.SETTINGS, 0, 0, b"\0\4\0"), http2.FRAME_SIZE_ERROR, "multiple of 6"),
    (START + raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 31)), http2.FLOW_CONTROL_ERROR,
     "INITIAL_WINDOW_SIZE"),
    (START + raw_frame(http2.SETTINGS, 0, 0, struct.pack(">HI", 5, 100)), http2.PROTOCOL_ERROR, "MAX_FRAME_SIZE"),
    (START + raw_frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1)), http2.FLOW_CONTROL_ERROR,
     "send window over"),
    (START + raw_frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), http2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
    (START + raw_frame(http2.PING, 0, 0, b"1234"), http2.FRAME_SIZE_ERROR, "PING payload"),
    (START + raw_frame(http2.RST_STREAM, 0, 7, b"\0\0\0\0"), http2.PROTOCOL_ERROR, "RST_STREAM on idle"),
    (START + raw_frame(http2.HEADERS, 0, 1, b"") + raw_frame(http2.CONTINUATION, 0, 1, b"\0" * 70000),
     http2.ENHANCE_YOUR_CALM, "header block over"),
])
def test_protocol_violations_end_the_connection_with_goaway(data, code, why):
    conn, t, app = server(max_frame_size=1 << 20)
    t.take()
    conn.data_received(data)
    frames = parse_frames(t.take())
    goaway = [f for f in frames if f[0] == http2.GOAWAY]
    assert goaway, frames
    last, got = struct.unpack(">II", goaway[0][3][:8])
    assert got == code and why in goaway[0][3][8:].decode(), (got, goaway[0][3][8:])
    assert t.closing


def test_data_beyond_the_stream_window_resets_that_stream():
    conn, t, app = server(stream_window=16384, connection_window=1 << 20)
    t.take()
    conn.data_received(START + _valid_headers(flags=http2.END_HEADERS) + raw_frame(http2.DATA, 0, 1, b"x" * 16385))
    frames = parse_frames(t.take())
    assert [(f[2], struct.unpack(">I", f[3])[0]) for f in frames if f[0] == http2.RST_STREAM] == \
        [(1, http2.FLOW_CONTROL_ERROR)]
    assert ("reset", 1) in app.events and not t.closing


def test_a_peer_that_does_not_read_stops_being_read():
    conn, t, _ = server()
    conn.pause_writing()
    assert not t.reading
    conn.resume_writing()
    assert t.reading


def test_receive_windows_are_replenished_for_a_large_request():
    conn, t, app = server(stream_window=1 << 16, connection_window=1 << 17, max_frame_size=16384)
    c = h2_client()
    c.send_headers(1, REQ)
    body = b"y" * (1 << 19)  # 8 stream windows, 4 connection windows
    sent = 0
    for _ in range(200):
        while sent < len(body) and c.local_flow_control_window(1) > 0:
            n = min(c.local_flow_control_window(1), c.max_outbound_frame_size, len(body) - sent)
            c.send_data(1, body[sent:sent + n], end_stream=sent + n == len(body))
            sent += n
        conn.data_received(c.data_to_send())
        c.receive_data(t.take())
        if ("ended", 1) in app.events:
            break
    assert app.bodies[1] == body


def test_a_repeated_all_indexed_block_is_decoded_against_the_current_table():
    # The connection reuses the fields of an all-indexed block it has seen; once a block changes the table, the
    # same bytes may mean other fields, and must be decoded again (here index 62 moves from /a to /b).
    seen = []

    class Paths(App):
        def stream_opened(self, conn, st):
            seen.append(dict(st.headers)[b":path"])

    conn, t, _ = server(Paths(reply=None))
    enc, ref = hpack.Encoder(), hpack.Decoder()

    def block(path):
        return enc.encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"x")])

    blocks = [block(b"/a"), block(b"/a")]  # the second: all indexed
    blocks += [block(b"/b"), blocks[1]]  # the table changed; the same bytes now name /b at 62
    assert min(blocks[1]) >= 0x80
    data = START + b"".join(raw_frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 2 * i + 1, b)
                            for i, b in enumerate(blocks))
    conn.data_received(data)
    want = [dict(ref.decode(b, raw=True))[b":path"] for b in blocks]
    assert seen == want and want[-1] != want[1], (seen, want)


def test_answers_held_for_a_peer_that_grants_no_window_stop_the_reading():
    conn, t, _ = server(App(reply=b"z" * (1 << 20)), write_buffer_high=2 << 20)
    c = h2_client()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})  # the peer takes no DATA until it says so
    for sid in (1, 3, 5):
        c.send_headers(sid, REQ, end_stream=True)
    conn.data_received(c.data_to_send())
    assert not t.reading, "3 MiB held for a closed window, yet the connection still reads requests"
    c.receive_data(t.take())
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 21})
    c.increment_flow_control_window(8 << 20)
    conn.data_received(c.data_to_send())
    assert t.reading  # the answers went out; reading resumes
    got = 0
    for e in c.receive_data(t.take()):
        if isinstance(e, h2.events.DataReceived):
            got += len(e.data)
    assert got == 3 << 20


_FRAME = hs.tuples(hs.integers(0, 10), hs.integers(0, 255), hs.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
                   hs.binary(max_size=40))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(hs.lists(_FRAME, max_size=12), hs.booleans())
def test_random_frames_never_raise_out_of_the_connection(frames, with_request):
    # Whatever follows a valid start, data_received handles it: an answer, a stream reset or GOAWAY, never an
    # exception into asyncio (which would log a fatal error and drop the connection without a reason).
    conn, t, _ = server(max_frame_size=1 << 14)
    data = START + (_valid_headers(flags=http2.END_HEADERS) if with_request else b"")
    data += b"".join(raw_frame(k, f, sid, p) for k, f, sid, p in frames)
    conn.data_received(data[:len(data) // 3])  # in two reads, split mid-frame
    conn.data_received(data[len(data) // 3:])
    for f in parse_frames(bytes(t.data)):
        assert f[0] in (http2.SETTINGS, http2.WINDOW_UPDATE, http2.HEADERS, http2.DATA, http2.RST_STREAM, http2.PING,
                        http2.GOAWAY)


class EofTransport(FakeTransport):
    """A transport that can end its side (FIN), or whose peer is gone already (write_eof fails)."""

    def __init__(self, peer_gone: bool = False) -> None:
        super().__init__()
        self.eof = False
        self.peer_gone = peer_gone

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.peer_gone:
            raise OSError(107, "Transport endpoint is not connected")
        self.eof = True


@pytest.mark.parametrize("peer_gone", [False, True])
def test_a_graceful_goaway_ends_our_side_and_drops_what_still_comes(peer_gone):
    import asyncio

    async def main() -> tuple[EofTransport, list]:
        app = App()
        t = EofTransport(peer_gone)
        conn = H2Connection(app, H2Limits())
        conn.connection_made(t)
        client = h2_client()
        exchange(conn, t, client)  # preface and settings
        conn.goaway("server is shutting down")
        frames = parse_frames(t.take())
        client.send_headers(1, REQ, end_stream=True)  # after the GOAWAY: not processed, nothing written
        conn.data_received(client.data_to_send())
        return t, frames, app

    t, frames, app = asyncio.run(main())
    assert frames[-1][0] == http2.GOAWAY and struct.unpack(">LL", frames[-1][3][:8]) == (0, 0)
    assert app.events == [] and t.take() == b""
    if peer_gone:
        assert t.closing and not t.eof  # write_eof failed: closed at once, no exception out of goaway
    else:
        assert t.eof and not t.closing  # our side ended; the client closes (or LINGER_S passes)
