"""A small HTTP/2 server connection (RFC 9113) for the gRPC endpoint: frames, flow control, HPACK.

Why not grpc.aio, or python-hyper's ``h2`` under the same gRPC mapping: both were measured against this layer
(docs/design-notes.md, serving). grpc.aio's C core costs ~0.17 ms of server CPU per trivial unary RPC and its
threads contend with the inference thread for the GIL; this connection costs ~0.04 ms. h2's state machine
more than doubled the event loop's time per RPC and cost 23-42 % of gRPC's 16-client throughput, past the 10 %
that would have made it the replacement. It speaks only what a gRPC server needs:

* the client preface, SETTINGS (and their ACK), PING ACK, GOAWAY, RST_STREAM, PRIORITY (ignored), unknown
  frame types (ignored); PUSH_PROMISE from a client is a protocol error;
* HEADERS + CONTINUATION with PADDED / PRIORITY flags, decoded in order by ``hpack.Decoder`` (every block,
  also a refused stream's, so the dynamic table stays in sync), the block and the decoded list capped;
* flow control both ways: the receive windows are replenished as frames arrive (the message-size limit, not
  the window, bounds what a stream may buffer); sends respect the peer's connection and stream windows and
  its maximum frame size, and wait in order for WINDOW_UPDATE;
* responses are encoded statelessly (static-table names, literals never indexed, no Huffman), so a
  response's header block is the same bytes every time and needs no encoder state.

Every violation is a connection error (GOAWAY with the RFC's code and a reason, then close) or a stream error
(RST_STREAM), as the RFC assigns them. What a stream carries (paths, content types, messages) is the
application's: it gets ``stream_opened`` once the header block is in, ``stream_data`` per DATA frame,
``stream_ended`` when the request is whole and ``stream_reset`` when the peer or the connection gives up on
it, and answers with :meth:`H2Connection.respond`. Writes made while a read is processed go out as one
``transport.write``; a peer that stops reading, or grants no window, stops being read once what waits for it
passes ``write_buffer_high`` (4 MiB), so one connection holds a bounded amount of answers.

Three classes: :class:`H2Connection` reads frames and keeps the streams; its base :class:`H2Output` sends (flow
control toward the peer, framing, GOAWAY); :class:`HeaderDecoder` holds the connection's HPACK table.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import hpack
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes (RFC 9113 section 7)
(NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR,
 REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM) = range(12)
# settings (section 6.5.2)
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, \
    S_MAX_HEADER_LIST_SIZE = range(1, 7)
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
LINGER_S = 1.0  # after a graceful GOAWAY, how long the client has to close before the connection is cut

_HEAD = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, kind, flags, sid) + payload


@dataclass(frozen=True)
class H2Limits:
    """What this side advertises and enforces. The defaults suit unary gRPC with messages up to tens of MiB."""

    max_concurrent_streams: int = 1024  # per connection; more get RST_STREAM(REFUSED_STREAM)
    stream_window: int = 1 << 20  # SETTINGS_INITIAL_WINDOW_SIZE: what a stream may send before our WINDOW_UPDATE
    connection_window: int = 16 << 20  # the connection's receive window (raised from 65,535 at the start)
    max_frame_size: int = 1 << 20  # SETTINGS_MAX_FRAME_SIZE: fewer frames per large message
    max_header_list: int = 16 << 10  # SETTINGS_MAX_HEADER_LIST_SIZE: decoded header fields, RFC 7541 sizes
    max_header_block: int = 64 << 10  # one encoded header block, CONTINUATIONs included
    write_buffer_high: int = 4 << 20  # stop reading while this much waits to be sent (a client that does not read)


class H2Error(Exception):
    """A connection error: GOAWAY with ``code``, then the connection closes."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, eq=False)
class Stream:
    """One request stream. ``headers``: the decoded request fields; ``body``: its DATA payloads so far."""

    sid: int
    headers: list[tuple[bytes, bytes]]
    opened_at: float
    body: bytearray = field(default_factory=bytearray)
    remote_ended: bool = False  # the client sent END_STREAM
    answered: bool = False  # respond() was called (what is left may still wait for the peer's window)
    recv_window: int = 0
    send_window: int = 0
    pending: list[tuple[int, int, bytes]] = field(default_factory=list)  # frames waiting for send window
    app: Any = None  # the application's handle (what to cancel on reset)


class H2App(Protocol):
    def connection_made(self, conn: "H2Connection") -> None: ...
    def stream_opened(self, conn: "H2Connection", stream: Stream) -> None: ...
    def stream_data(self, conn: "H2Connection", stream: Stream) -> None: ...
    def stream_ended(self, conn: "H2Connection", stream: Stream) -> None: ...
    def stream_reset(self, conn: "H2Connection", stream: Stream) -> None: ...
    def connection_lost(self, conn: "H2Connection") -> None: ...


# -- HPACK encoding (stateless) ----------------------------------------------------------------------------
_STATIC_NAMES = {name: i + 1 for i, (name, _) in reversed(list(enumerate(hpack.table.HeaderTable.STATIC_TABLE)))}
_STATIC_FULL = {entry: i + 1 for i, entry in enumerate(hpack.table.HeaderTable.STATIC_TABLE)}


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A header block that never touches the dynamic table: a static-table entry where one matches whole,
    else a literal without indexing (static name where there is one), no Huffman."""
    out = []
    for name, value in fields:
        full = _STATIC_FULL.get((name, value))
        if full is not None:
            out.append(_int(full, 7, 0x80))
            continue
        idx = _STATIC_NAMES.get(name)
        if idx is not None:
            out.append(_int(idx, 4, 0x00))
        else:
            out.append(b"\x00" + _int(len(name), 7, 0x00) + name)
        out.append(_int(len(value), 7, 0x00) + value)
    return b"".join(out)


Fields = tuple[tuple[bytes, bytes], ...]


@functools.lru_cache(maxsize=64)
def encode_fields(fields: Fields) -> bytes:
    """:func:`encode_headers` of a tuple of fields, remembered: a response's constant blocks are encoded once."""
    return encode_headers(fields)


_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})


def check_request_headers(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request header list is malformed (RFC 9113 8.2-8.3), or None."""
    seen: set[bytes] = set()
    regular = False
    for name, value in fields:
        if name.startswith(b":"):
            if regular:
                return f"pseudo-header {name.decode('latin-1')} after a regular field"
            if name not in _REQUEST_PSEUDO or name in seen:
                return f"pseudo-header {name.decode('latin-1')} unknown or repeated"
            seen.add(name)
            continue
        regular = True
        if name != name.lower():
            return "a field name has upper-case letters"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return f"connection-specific field {name.decode('latin-1')}"
    if not {b":method", b":scheme", b":path"} <= seen:
        return "a request needs :method, :scheme and :path"
    return None


class HeaderDecoder:
    """HPACK decoding of the client's header blocks (RFC 7541), the decoded list capped; one per connection, whose
    dynamic table it keeps. Every block is decoded in order, also a refused stream's, so the table stays in sync."""

    __slots__ = ("_decoder", "_indexed")

    def __init__(self, max_header_list: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list)
        self._indexed: dict[bytes, list[tuple[bytes, bytes]]] = {}  # all-indexed blocks decoded since the table changed

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's (name, value) fields; H2Error(COMPRESSION_ERROR) when it cannot be decoded."""
        fields = self._indexed.get(block)
        if fields is not None:
            return fields
        try:
            fields = self._decoder.decode(block, raw=True)
        except HPACKError as exc:  # the table is out of sync now: nothing more on this connection can be decoded
            raise H2Error(COMPRESSION_ERROR, f"header block cannot be decoded: {type(exc).__name__}: {exc}") from None
        # A block of one-byte indexed fields only (0x80-0xFE each) reads the table without changing it, so the
        # same bytes mean the same fields until a block that does change it: a client that indexed its
        # headers sends that one block for every request (hpack's decode is ~12 us of Python each time).
        if block and min(block) >= 0x80 and max(block) < 0xFF:
            if len(self._indexed) < 64:
                self._indexed[block] = fields
        else:
            self._indexed.clear()
        return fields


class H2Output:
    """The sending half of a server connection: flow control toward the peer (its SETTINGS and WINDOW_UPDATEs),
    answers framed to its frame size and held in order for its windows, the writes of one read sent as one, reading
    paused while too much waits, RST_STREAM, GOAWAY and the close.

    A base of :class:`H2Connection`, which owns the state named below; split from it so that each half reads on
    its own, without a call between them on the per-frame path."""

    transport: Any
    app: H2App
    limits: H2Limits
    streams: dict[int, Stream]
    last_sid: int
    closed: bool

    def __init__(self) -> None:
        super().__init__()
        self._send_window = DEFAULT_WINDOW
        self._peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._table_update = False  # the peer shrank its HPACK table: our next block starts with a size update
        self._blocked: list[Stream] = []  # streams with frames waiting for send window, in order
        self._out: list[bytes] | None = None  # while a read is processed: the writes, sent as one
        self._paused = False  # the transport's write buffer is over write_buffer_high
        self._holding = False  # answers held for the peer's window are over write_buffer_high
        self._reading = True
        self._linger = False  # the GOAWAY sent was graceful: end our side and wait for the client to close
        self._eof_sent = False

    # -- back-pressure ---------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self._paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._set_reading()

    def _set_reading(self) -> None:
        """Read only while what waits to be sent is bounded: a peer that reads nothing, or grants no window,
        gets no more requests answered (and so cannot make this connection hold more)."""
        want = not (self._paused or self._holding or self.closed)
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _held_changed(self) -> None:
        held = sum(len(p) for st in self._blocked for _, _, p in st.pending)
        self._holding = held > self.limits.write_buffer_high
        self._set_reading()

    # -- what the peer allows: its settings and windows ------------------------------------------------
    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6 bytes")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, off)
            if key == S_HEADER_TABLE_SIZE:
                self._table_update = self._table_update or value < 4096
            elif key == S_ENABLE_PUSH and value > 1:
                raise H2Error(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2**31-1")
                delta, self._peer_window = value - self._peer_window, value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise H2Error(FLOW_CONTROL_ERROR, f"stream {st.sid}'s window over 2**31-1")
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise H2Error(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside 16384..16777215")
                self._peer_max_frame = value
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "the connection's send window over 2**31-1")
        else:
            st = self.streams.get(sid)
            if st is None:
                if sid > self.last_sid:
                    raise H2Error(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
                return
            if not inc:
                self._rst(sid, PROTOCOL_ERROR)
                return
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                self._rst(sid, FLOW_CONTROL_ERROR)
                return
        self._flush_blocked()

    # -- sending ---------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif not self.transport.is_closing() and not self._eof_sent:
            self.transport.write(data)

    def _rst(self, sid: int, code: int) -> None:
        st = self.streams.pop(sid, None)
        self._write(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        if st is not None:
            self._unblock(st)
            self._stream_gone()
            if not st.answered:
                self.app.stream_reset(self, st)

    def _goaway(self, code: int, message: str, linger: bool = False) -> None:
        if self.closed:
            return
        self._write(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_sid, code) + message.encode("utf-8")[:256]))
        self.closed = True
        self._linger = linger
        if self._out is None:
            self._finish()

    def _finish(self) -> None:
        """After GOAWAY: close, or (graceful) end our side and drop what still comes until the client closes."""
        t = self.transport
        if t.is_closing() or self._eof_sent:
            return
        if self._linger and t.can_write_eof():
            try:
                t.write_eof()
            except OSError:  # the client is gone already (reset): nothing to wait for
                t.close()
                return
            self._eof_sent = True
            t.resume_reading()
            asyncio.get_running_loop().call_later(LINGER_S, t.close)
        else:
            t.close()

    def goaway(self, message: str = "server is closing the connection") -> None:
        """Close gracefully: GOAWAY(NO_ERROR) with the last stream processed (the client may retry later ones
        elsewhere), then our side ends and what the client still sends is read and dropped until it closes, at
        most ``LINGER_S``: closing with unread bytes would make the kernel reset the connection."""
        self._goaway(NO_ERROR, message, linger=True)

    def _header_frames(self, sid: int, block: bytes, end_stream: bool) -> list[bytes]:
        if self._table_update:
            block = b"\x20" + block  # dynamic table size 0: we never index, so any smaller table is fine
            self._table_update = False
        flags = END_STREAM if end_stream else 0
        step = self._peer_max_frame
        if len(block) <= step:
            return [frame(HEADERS, flags | END_HEADERS, sid, block)]
        out = [frame(HEADERS, flags, sid, block[:step])]
        for off in range(step, len(block), step):
            out.append(frame(CONTINUATION, END_HEADERS if off + step >= len(block) else 0, sid, block[off:off + step]))
        return out

    def respond(self, stream: Stream, headers: Fields | bytes, data: bytes | None = None,
                trailers: Fields | bytes | None = None) -> None:
        """Answer ``stream``: a header block, then ``data`` (flow-controlled, split to the peer's frame size),
        then a trailer block that ends the stream (or, with neither data nor trailers, ``headers`` ends it:
        gRPC's trailers-only response). A block is a tuple of (name, value) fields (encoded by :func:`encode_fields`,
        constant ones once) or bytes from :func:`encode_headers`. Once the answer is out, a
        stream the client has not ended is reset with NO_ERROR (RFC 9113 8.1: it need not send the rest)."""
        if stream.answered or self.closed or self.streams.get(stream.sid) is not stream:
            return
        stream.answered = True
        if not isinstance(headers, bytes):
            headers = encode_fields(headers)
        if trailers is not None and not isinstance(trailers, bytes):
            trailers = encode_fields(trailers)
        only = data is None and trailers is None
        frames: list[bytes] = self._header_frames(stream.sid, headers, only)
        pending: list[tuple[int, int, bytes]] = []
        if data:
            step = self._peer_max_frame
            for off in range(0, len(data), step):
                pending.append((DATA, 0, data[off:off + step]))
        if trailers is not None:
            pending.append((HEADERS, END_STREAM, trailers))
        elif data is not None:
            pending.append((DATA, END_STREAM, b""))
        stream.pending = pending
        sent = self._send_pending(stream, frames)
        self._write(b"".join(frames) if len(frames) > 1 else frames[0])
        if sent:
            self._close_if_done(stream)
        else:
            self._blocked.append(stream)
            self._held_changed()

    def _send_pending(self, st: Stream, frames: list[bytes]) -> bool:
        """Move what the windows allow from ``st.pending`` to ``frames``; True once nothing is left."""
        pending = st.pending
        while pending:
            kind, flags, payload = pending[0]
            if kind == HEADERS:
                frames.extend(self._header_frames(st.sid, payload, True))
            else:
                n = len(payload)
                room = min(self._send_window, st.send_window)
                if n and room <= 0:
                    return False
                if n > room:
                    pending[0] = (kind, flags, payload[room:])
                    payload, n, flags = payload[:room], room, 0
                    frames.append(frame(DATA, 0, st.sid, payload))
                    self._send_window -= n
                    st.send_window -= n
                    continue
                frames.append(frame(DATA, flags, st.sid, payload))
                self._send_window -= n
                st.send_window -= n
            pending.pop(0)
        return True

    def _flush_blocked(self) -> None:
        if not self._blocked:
            return
        still: list[Stream] = []
        for st in self._blocked:
            if self.streams.get(st.sid) is not st:
                continue
            frames: list[bytes] = []
            done = self._send_pending(st, frames)
            if frames:
                self._write(b"".join(frames))
            if done:
                self._close_if_done(st)
            else:
                still.append(st)
        self._blocked = still
        self._held_changed()

    def _unblock(self, st: Stream) -> None:
        if st.pending:
            st.pending = []
            self._blocked = [s for s in self._blocked if s is not st]
            self._held_changed()

    def _close_if_done(self, st: Stream) -> None:
        """A stream whose answer is out is closed; one the client has not ended yet is reset with NO_ERROR."""
        if st.pending or self.streams.get(st.sid) is not st:
            return
        del self.streams[st.sid]
        if not st.remote_ended:
            self._write(frame(RST_STREAM, 0, st.sid, _U32.pack(NO_ERROR)))
        self._stream_gone()

    def _stream_gone(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()


class H2Connection(H2Output, asyncio.Protocol):
    """The server side of one HTTP/2 connection: reads the client's frames, keeps its streams, and hands each
    request to the application (sending is :class:`H2Output`'s, header decoding :class:`HeaderDecoder`'s)."""

    def __init__(self, app: H2App, limits: H2Limits = H2Limits()) -> None:
        super().__init__()
        self.app = app
        self.limits = limits
        self.transport: Any = None
        self.streams: dict[int, Stream] = {}
        self.last_sid = 0  # the highest stream id the client opened
        self.opened_at = self.idle_since = time.monotonic()
        self._stage = 0  # 0: waiting for the client preface; 1: for its first SETTINGS; 2: open
        self.closed = False
        self._buf = b""
        self._hpack = HeaderDecoder(limits.max_header_list)
        self._continuing: tuple[int, int, bytearray] | None = None  # (sid, flags, block) until END_HEADERS
        self._recv_window = limits.connection_window

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        lim = self.limits
        settings = b"".join(struct.pack(">HL", k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, lim.max_concurrent_streams), (S_INITIAL_WINDOW_SIZE, lim.stream_window),
            (S_MAX_FRAME_SIZE, lim.max_frame_size), (S_MAX_HEADER_LIST_SIZE, lim.max_header_list),
            (S_ENABLE_PUSH, 0)))
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, _U32.pack(lim.connection_window - DEFAULT_WINDOW)))
        self.app.connection_made(self)

    @property
    def ready(self) -> bool:
        """The preface and the client's first SETTINGS have arrived."""
        return self._stage == 2

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        streams, self.streams = list(self.streams.values()), {}
        for st in streams:
            if not st.answered:
                self.app.stream_reset(self, st)
        self.app.connection_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:  # GOAWAY sent: what still arrives before the close is dropped
            return
        buf = self._buf + data if self._buf else data
        self._out = []
        try:
            if self._stage == 0:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(buf):
                        raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 client preface (this port speaks gRPC over h2c)")
                    self._buf = buf
                    return
                if not buf.startswith(PREFACE):
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 client preface (this port speaks gRPC over h2c)")
                buf = buf[len(PREFACE):]
                self._stage = 1
            pos, n = 0, len(buf)
            max_frame = self.limits.max_frame_size
            while n - pos >= 9 and not self.closed:
                hi, lo, kind, flags, sid = _HEAD.unpack_from(buf, pos)
                length = (hi << 8) | lo
                if length > max_frame:
                    raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes; SETTINGS_MAX_FRAME_SIZE is {max_frame}")
                if n - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(kind, flags, sid & 0x7FFFFFFF, payload)
            self._buf = buf[pos:]
        except H2Error as exc:
            self._goaway(exc.code, str(exc))
        finally:
            out, self._out = self._out, None
            if out and not self.transport.is_closing():
                self.transport.write(b"".join(out))
            if self.closed:
                self._finish()

    # -- frames ----------------------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "a header block was interrupted by another frame")
        if self._stage == 1:
            if kind != SETTINGS or flags & ACK:
                raise H2Error(PROTOCOL_ERROR, "the client preface must be followed by SETTINGS")
            self._stage = 2
        if kind == DATA:
            self._data(flags, sid, payload)
        elif kind == HEADERS:
            self._headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if self._continuing is None or self._continuing[0] != sid:
                raise H2Error(PROTOCOL_ERROR, "CONTINUATION without a header block in progress on that stream")
            block = self._continuing[2]
            block += payload
            if len(block) > self.limits.max_header_block:
                raise H2Error(ENHANCE_YOUR_CALM, f"header block over {self.limits.max_header_block} bytes")
            if flags & END_HEADERS:
                _, first_flags, _ = self._continuing
                self._continuing = None
                self._header_block(first_flags, sid, bytes(block))
        elif kind == SETTINGS:
            self._settings(flags, sid, payload)
        elif kind == PING:
            if sid:
                raise H2Error(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise H2Error(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == RST_STREAM:
            if not sid:
                raise H2Error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise H2Error(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
            if sid > self.last_sid:
                raise H2Error(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            st = self.streams.pop(sid, None)
            if st is not None:
                self._unblock(st)
                self._stream_gone()
                if not st.answered:
                    self.app.stream_reset(self, st)
        elif kind == PRIORITY:
            if not sid:
                raise H2Error(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._rst(sid, FRAME_SIZE_ERROR)
        elif kind == GOAWAY:
            if sid:
                raise H2Error(PROTOCOL_ERROR, "GOAWAY on a stream")
            # the client opens no more streams; the ones it has get their answers, then it closes
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "DATA beyond the connection's flow-control window")
        if self._recv_window < self.limits.connection_window // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.limits.connection_window - self._recv_window)))
            self._recv_window = self.limits.connection_window
        st = self.streams.get(sid)
        if st is None or st.remote_ended:
            if sid > self.last_sid:
                raise H2Error(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if st is not None:
                self._rst(sid, STREAM_CLOSED)
            return  # a stream we answered and reset: its late DATA only counts against the window
        st.recv_window -= length
        if st.recv_window < 0:
            self._rst(sid, FLOW_CONTROL_ERROR)
            return
        if flags & PADDED:
            payload = self._unpad(payload)
        if not st.answered:
            if payload:
                st.body += payload
            self.app.stream_data(self, st)
        if flags & END_STREAM:
            st.remote_ended = True
            if not st.answered:
                self.app.stream_ended(self, st)
            else:
                self._close_if_done(st)
        elif st.recv_window < self.limits.stream_window // 2 and not st.answered:
            self._write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(self.limits.stream_window - st.recv_window)))
            st.recv_window = self.limits.stream_window

    def _unpad(self, payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise H2Error(PROTOCOL_ERROR, "padding is as long as the frame")
        return payload[1:len(payload) - payload[0]]

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}; a client opens odd-numbered streams")
        if flags & PADDED:
            payload = self._unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                raise H2Error(PROTOCOL_ERROR, f"stream {sid} depends on itself")
            payload = payload[5:]
        if len(payload) > self.limits.max_header_block:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block over {self.limits.max_header_block} bytes")
        if not flags & END_HEADERS:
            self._continuing = (sid, flags, bytearray(payload))
            return
        self._header_block(flags, sid, payload)

    def _header_block(self, flags: int, sid: int, block: bytes) -> None:
        fields = self._hpack.decode(block)
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client end its stream
            if not flags & END_STREAM:
                raise H2Error(PROTOCOL_ERROR, f"a second header block on stream {sid} without END_STREAM")
            if st.remote_ended:
                self._rst(sid, STREAM_CLOSED)
                return
            st.remote_ended = True
            if not st.answered:
                self.app.stream_ended(self, st)
            else:
                self._close_if_done(st)
            return
        if sid <= self.last_sid:
            self._rst(sid, STREAM_CLOSED)  # a stream that has ended already
            return
        self.last_sid = sid
        if self.closed:
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._rst(sid, REFUSED_STREAM)
            return
        why = check_request_headers(fields)
        if why is not None:
            self._rst(sid, PROTOCOL_ERROR)
            return
        st = Stream(sid, fields, time.monotonic(), recv_window=self.limits.stream_window, send_window=self._peer_window)
        self.streams[sid] = st
        self.app.stream_opened(self, st)
        if flags & END_STREAM and sid in self.streams:
            st.remote_ended = True
            if not st.answered:
                self.app.stream_ended(self, st)
            else:
                self._close_if_done(st)


__all__ = ["H2App", "H2Connection", "H2Error", "H2Limits", "Stream", "check_request_headers", "encode_fields", "encode_headers", "frame"]
