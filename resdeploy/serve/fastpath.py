"""The HTTP fast path for the one request that matters for speed: a whole, plain ``POST .../infer``.

aiohttp costs about a quarter of a millisecond per request on the event loop (parser callbacks, a Task, the
router, the middleware, a StreamWriter; issue 15's 1-client profile). A request that arrives whole in one
read, on an idle keep-alive connection, with nothing unusual in its head, is answered here instead: its head
is split once, its body handed to the same parser, checks, batcher and encoder as aiohttp's route uses, and
the response is written straight to the transport.

Anything else goes to aiohttp untouched, before a byte is consumed: a request in pieces, pipelined requests,
chunked or compressed bodies, ``Expect``, ``Connection: close``, an odd or oversized head, a body over the
limit, and every request that would be refused (unknown model, bad header, bad tensor), so each error keeps
the one implementation and message it has. ``parse_plain_infer`` decides. A declined request framed by
Content-Length is counted to its last byte, so the connection's next request may take the fast path again;
after anything else aiohttp's parser may hold part of the next request, so that connection stays on aiohttp
for good (a later read must never be taken for a fresh request).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

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
