"""The gRPC endpoint's HTTP/2 connection on python-hyper's ``h2`` state machine, for the A/B against the
hand-written frame layer (resdeploy/serve/http2.py): the same interface (``H2App`` callbacks, ``respond``,
``goaway``, ``streams``, ``ready``), the same limits advertised, flow control by h2.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from resdeploy.serve.http2 import DEFAULT_WINDOW, LINGER_S, Fields, H2App, H2Limits, Stream

_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                                    normalize_outbound_headers=False, normalize_inbound_headers=False)


class H2LibConnection(asyncio.Protocol):
    """The server side of one HTTP/2 connection, framed by ``h2``."""

    def __init__(self, app: H2App, limits: H2Limits = H2Limits()) -> None:
        self.app = app
        self.limits = limits
        self.transport: Any = None
        self.streams: dict[int, Stream] = {}
        self.opened_at = self.idle_since = time.monotonic()
        self.closed = False
        self.ready = False
        self.h2 = h2.connection.H2Connection(config=_CONFIG)
        self._blocked: list[Stream] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        lim = self.limits
        s = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            s.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams, s.INITIAL_WINDOW_SIZE: lim.stream_window,
            s.MAX_FRAME_SIZE: lim.max_frame_size, s.MAX_HEADER_LIST_SIZE: lim.max_header_list, s.ENABLE_PUSH: 0})
        # Settings given as initial values count as applied: h2's inbound limits follow them only if told here.
        self.h2.max_inbound_frame_size = lim.max_frame_size
        self.h2.decoder.max_header_list_size = lim.max_header_list
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(lim.connection_window - DEFAULT_WINDOW)
        transport.write(self.h2.data_to_send())
        self.app.connection_made(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        streams, self.streams = list(self.streams.values()), {}
        for st in streams:
            if not st.answered:
                self.app.stream_reset(self, st)
        self.app.connection_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 queued its GOAWAY
            self.closed = True
            self.transport.close()
            return
        for ev in events:
            self._event(ev)
        self._flush()

    def _event(self, ev: Any) -> None:
        kind = type(ev)
        if kind is h2.events.DataReceived:
            st = self.streams.get(ev.stream_id)
            if ev.flow_controlled_length:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if st is not None and not st.answered:
                st.body += ev.data
                self.app.stream_data(self, st)
        elif kind is h2.events.RequestReceived:
            st = Stream(ev.stream_id, ev.headers, time.monotonic())
            self.streams[ev.stream_id] = st
            self.app.stream_opened(self, st)
        elif kind is h2.events.StreamEnded:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.remote_ended = True
                if not st.answered:
                    self.app.stream_ended(self, st)
                else:
                    self._close_if_done(st)
        elif kind is h2.events.StreamReset:
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                self._gone(st)
                if not st.answered:
                    self.app.stream_reset(self, st)
        elif kind in (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged):
            self.ready = True
            self._flush_blocked()
        elif kind is h2.events.ConnectionTerminated:
            self.closed = True

    def respond(self, stream: Stream, headers: Fields, data: bytes | None = None, trailers: Fields | None = None) -> None:
        """As :meth:`resdeploy.serve.http2.H2Connection.respond` (blocks as tuples of fields)."""
        if stream.answered or self.closed or self.streams.get(stream.sid) is not stream:
            return
        stream.answered = True
        only = data is None and trailers is None
        self.h2.send_headers(stream.sid, headers, end_stream=only)
        if not only:
            stream.pending = [(0, 0, data or b""), (1, 0, trailers or ())]  # type: ignore[list-item]
            if not self._send_pending(stream):
                self._blocked.append(stream)
        self._close_if_done(stream)
        self._flush()

    def _send_pending(self, st: Stream) -> bool:
        """Send what the windows allow; True once the answer is out."""
        while st.pending:
            kind, _, payload = st.pending[0]
            if kind == 1:
                if payload:
                    self.h2.send_headers(st.sid, payload, end_stream=True)
                else:
                    self.h2.end_stream(st.sid)
            else:
                room = min(self.h2.local_flow_control_window(st.sid), self.h2.max_outbound_frame_size)
                if payload and room <= 0:
                    return False
                if len(payload) > room:
                    self.h2.send_data(st.sid, payload[:room])
                    st.pending[0] = (0, 0, payload[room:])
                    continue
                if payload:
                    self.h2.send_data(st.sid, payload)
            st.pending.pop(0)
        return True

    def _flush_blocked(self) -> None:
        still = []
        for st in self._blocked:
            if self.streams.get(st.sid) is st and not self._send_pending(st):
                still.append(st)
            else:
                self._close_if_done(st)
        self._blocked = still

    def _close_if_done(self, st: Stream) -> None:
        if st.pending or self.streams.get(st.sid) is not st:
            return
        del self.streams[st.sid]
        if not st.remote_ended:
            self.h2.reset_stream(st.sid, h2.errors.ErrorCodes.NO_ERROR)
        self._gone(st)

    def _gone(self, st: Stream) -> None:
        if st in self._blocked:
            self._blocked.remove(st)
        if not self.streams:
            self.idle_since = time.monotonic()

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out and not self.transport.is_closing() and not (self.closed and not self.transport.can_write_eof()):
            self.transport.write(out)

    def goaway(self, message: str = "server is closing the connection") -> None:
        if self.closed:
            return
        self.closed = True
        self.h2.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, additional_data=message.encode()[:256])
        self._flush()
        t = self.transport
        if t.can_write_eof():  # as the hand-written layer: end our side, let the client close (see its goaway)
            t.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, t.close)
        else:
            t.close()


__all__ = ["H2LibConnection"]
