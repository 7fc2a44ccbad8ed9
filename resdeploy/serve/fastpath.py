"""The HTTP fast path for the one request that matters for speed: a whole, plain ``POST .../infer``.

aiohttp costs about a quarter of a millisecond per request on the event loop (parser callbacks, a Task, the
router, the middleware, a StreamWriter). A request that arrives whole in one read, on an idle keep-alive
connection, with nothing unusual in its head, is answered here instead: its head is split once, and its body
goes to the core's one inference sequence (:meth:`resdeploy.serve.core.DataPlane.infer`) with the same decoder
and encoder as aiohttp's route; the answer, an error included, is written straight to the transport, in the
bytes aiohttp writes for the same response.

Anything else goes to aiohttp untouched, before a byte is consumed: a request in pieces, pipelined requests,
chunked or compressed bodies, ``Expect``, ``Connection: close``, an odd or oversized head, a body over the
limit. ``parse_plain_infer`` decides. A declined request framed by Content-Length is counted to its last byte,
so the connection's next request may take the fast path again; after anything else aiohttp's parser may hold
part of the next request, so that connection stays on aiohttp for good (a later read must never be taken for a
fresh request).

Knowing that aiohttp holds nothing of a connection takes 9 of aiohttp's private attributes (``AIOHTTP_STATE``).
The fast path is therefore on only for the aiohttp versions it is tested on (``TESTED_AIOHTTP``, the range
pyproject.toml pins): with any other version, or if one attribute is missing, :func:`unsupported_reason` says
why, the server logs it and every request goes through aiohttp (correct, ~0.1-0.2 ms slower per request).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from resdeploy.serve.core import DataPlane
from resdeploy.serve.protocol import EncodedResponse, ServeError, encode_http_infer, json_error, parse_http_infer

# The aiohttp releases the fast path is tested on: [low, high). pyproject.toml pins the same range.
TESTED_AIOHTTP = ((3, 14), (3, 15))
# The aiohttp internals the connection handler reads to know aiohttp holds nothing of a connection's next request.
AIOHTTP_STATE = ("_messages", "_payload_parser", "_upgraded", "_force_close", "_close", "_request_in_progress",
                 "_next_keepalive_close_time", "_keepalive_timeout", "_loop")

# /v2/models/{model}/infer or /v2/models/{model}/versions/{version}/infer, as aiohttp's router matches them
# ({name} is one path segment); "%" is left to aiohttp, which decodes it.
_PATH = re.compile(rb"/v2/models/([^/%?#\s{}]+)(?:/versions/([^/%?#\s{}]+))?/infer")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
MAX_HEAD = 8190  # aiohttp's default max_line_size / max_field_size: a longer head is aiohttp's to refuse
MAX_FIELDS = 64
_FRAMING_FIELDS = frozenset({b"transfer-encoding", b"upgrade"})  # aiohttp frames (or switches) these differently
_DECLINE_FIELDS = frozenset({b"expect", b"content-encoding"})
SERVER = SERVER_SOFTWARE.encode()  # the Server header aiohttp writes


@dataclass(frozen=True, slots=True)
class PlainInfer:
    """A whole infer request as the fast path takes it."""

    model: str
    version: str | None
    header_length: str | None  # the Inference-Header-Content-Length header, unparsed
    body: bytes


@dataclass(frozen=True, slots=True)
class Declined:
    """The fast path left a read to aiohttp. ``rest``: how many more bytes of that same request aiohttp will
    read (0: the read is one whole request; aiohttp's parser is clean after them). None: unknown (several
    requests, chunked or no framing, a head the fast path does not read): aiohttp may hold what follows."""

    rest: int | None


WHOLE, UNKNOWN = Declined(0), Declined(None)


def parse_plain_infer(data: bytes, max_body: int) -> PlainInfer | Declined:
    """``data`` as one whole plain infer request, or why not (then aiohttp handles it)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD:
        return UNKNOWN
    lines = data[:end].split(b"\r\n")
    if len(lines) > MAX_FIELDS:
        return UNKNOWN
    length: int | None = None
    header_length: str | None = None
    plain = True
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # obs-fold, a space before the colon, a bad name
            return UNKNOWN
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 12:
                return UNKNOWN
            length = int(value)
        elif name == b"inference-header-content-length":
            plain = plain and header_length is None
            header_length = value.decode("latin-1")
        elif name == b"connection":
            plain = plain and value.lower() == b"keep-alive"
        elif name in _FRAMING_FIELDS:
            return UNKNOWN
        elif name in _DECLINE_FIELDS:
            plain = False
    if length is None:
        return UNKNOWN
    rest = end + 4 + length - len(data)
    if rest < 0:
        return UNKNOWN  # a pipelined request behind this one
    if rest > 0:
        return Declined(rest)  # the body comes in later reads: aiohttp's, and the count says when it is whole
    first = lines[0]
    path = _PATH.fullmatch(first[5:-9]) if first.startswith(b"POST /v2/models/") and first.endswith(b" HTTP/1.1") else None
    if not plain or path is None or length > max_body:
        return WHOLE
    try:
        model = path.group(1).decode("utf-8")
        version = path.group(2).decode("utf-8") if path.group(2) is not None else None
    except UnicodeDecodeError:
        return WHOLE
    return PlainInfer(model, version, header_length, data[end + 4:])


_date = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if now != _date[0]:  # aiohttp also formats the Date header once per second
        _date[0], _date[1] = now, formatdate(now, usegmt=True).encode()
    return _date[1]


def response_bytes(status: int, content_type: str, body: bytes, header_length: int | None = None,
                   close: bool = False) -> bytes:
    """One HTTP/1.1 response, with the headers aiohttp writes for the same web.Response, in its order."""
    head = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    if header_length is not None:
        head.append(b"Inference-Header-Content-Length: %d" % header_length)
    head += [b"Content-Type: " + content_type.encode(), b"Content-Length: %d" % len(body),
             b"Date: " + _http_date(), b"Server: " + SERVER]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def unsupported_reason(version: str | None = None, handler: type = web.RequestHandler) -> str | None:
    """None when the fast path may run on aiohttp ``version`` (default: the installed one), else why not (a
    sentence for the log)."""
    version = aiohttp.__version__ if version is None else version
    low, high = TESTED_AIOHTTP
    try:
        parsed = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    except ValueError:
        parsed = ()
    tested = f"{low[0]}.{low[1]} up to (not including) {high[0]}.{high[1]}"
    if len(parsed) != 2 or not low <= parsed < high:
        return (f"aiohttp {version} is outside the range the fast path is tested on ({tested}); "
                f"install aiohttp>={low[0]}.{low[1]},<{high[0]}.{high[1]} to turn it on")
    missing = [a for a in AIOHTTP_STATE if not hasattr(handler, a)]
    if missing:
        return f"aiohttp {version}'s RequestHandler lacks {', '.join(missing)}, which the fast path reads"
    return None


class FastPath:
    """``guard.fast`` of the HTTP connections: takes a whole plain infer request off aiohttp (see above)."""

    def __init__(self, core: DataPlane) -> None:
        self.core = core
        self.max_body = core.config.max_body_bytes
        self.answered = 0  # requests the fast path took

    def __call__(self, handler: Any, data: bytes) -> Declined | None:
        """Answer ``data`` if it is one whole plain infer request (None), else say why not: nothing is consumed
        then and aiohttp answers it."""
        plain = parse_plain_infer(data, self.max_body)
        if isinstance(plain, Declined):
            return plain
        transport = handler.transport
        handler.fast_started(transport)
        self.answered += 1
        core = self.core

        def answer(enc: EncodedResponse | None, exc: BaseException | None) -> None:
            close = core.draining  # the client must not reuse a connection that is about to close
            if enc is not None:
                ctype = "application/json" if enc.header_length is None else "application/octet-stream"
                out = response_bytes(200, ctype, enc.body, enc.header_length, close)
            elif isinstance(exc, ServeError):
                out = response_bytes(exc.status, "application/json", json_error(str(exc)), close=close)
            else:  # cancelled: nothing cancels a fast-path request, but this connection reads nothing until answered
                assert isinstance(exc, asyncio.CancelledError), exc
                gone = f"model '{plain.model}': request cancelled before it ran; retry"
                out, close = response_bytes(503, "application/json", json_error(gone), close=True), True
            if not transport.is_closing():
                transport.write(out)
                if close:
                    transport.close()
            handler.fast_finished(transport)

        core.infer(plain.model, plain.version, lambda m: parse_http_infer(m, plain.body, plain.header_length),
                   encode_http_infer, answer)
        return None


__all__ = ["AIOHTTP_STATE", "Declined", "FastPath", "PlainInfer", "TESTED_AIOHTTP", "UNKNOWN", "WHOLE",
           "parse_plain_infer", "response_bytes", "unsupported_reason"]
