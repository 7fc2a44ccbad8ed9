"""Clients that keep opening new connections (a rolling update behind a load balancer), for the SIGTERM drain.

Each client loops: connect, send one batch-1 infer request (HTTP/1.1, or gRPC over HTTP/2 with h2 as the
client), read the answer, close. Every outcome is classified:

* ``ok``: a whole 200 / grpc-status 0 answer;
* ``turned_away``: a whole 503 / UNAVAILABLE answer (the server was draining);
* ``refused``: the connection was refused (or not accepted before the client's connect timeout), or the server's
  GOAWAY said the stream was never processed: nothing was accepted, the client may retry elsewhere;
* ``cancelled``: grpc-status CANCELLED, which grpc.aio's own shutdown gives the calls it has received but not yet
  handed to the application (the native transport never does): counted apart, and lost for the native one;
* anything else is ``lost``: the connection was accepted and the request sent, and no whole answer came (a
  reset, an end of stream, a timeout).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import struct
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

import h2.config
import h2.connection
import hpack
import numpy as np
from tritonclient.grpc import service_pb2 as pb

X = np.zeros((1, 1, 28, 28), np.float32)


def http_request(port: int, model: str = "resnet20") -> bytes:
    raw = X.tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(X.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nInference-Header-Content-Length: "
            f"{len(header)}\r\nContent-Length: {len(header) + len(raw)}\r\n\r\n").encode() + header + raw


def grpc_message(model: str = "resnet20") -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    req.raw_input_contents.append(X.tobytes())
    payload = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


GRPC_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
                (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str = "") -> None:
        self.outcomes[kind] += 1
        if kind.startswith("lost") and len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail[:200]}")

    @property
    def lost(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("lost"))


async def _connect(port: int, tally: Tally) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3.0)
    except (OSError, asyncio.TimeoutError):
        tally.add("refused")
        await asyncio.sleep(0.01)
        return None


async def http_client(port: int, stop: asyncio.Event, tally: Tally) -> None:
    req = http_request(port)
    while not stop.is_set():
        conn = await _connect(port, tally)
        if conn is None:
            continue
        r, w = conn
        try:
            w.write(req)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
            await asyncio.wait_for(r.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))), 20)
            status = head.split(b" ", 2)[1]
            tally.add({b"200": "ok", b"503": "turned_away"}.get(status, f"lost:http {status.decode()}"))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            tally.add(f"lost:{type(exc).__name__}", repr(exc))
        finally:
            w.close()


async def grpc_client(port: int, stop: asyncio.Event, tally: Tally) -> None:
    message = grpc_message()
    while not stop.is_set():
        conn = await _connect(port, tally)
        if conn is None:
            continue
        r, w = conn
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        c.initiate_connection()
        c.send_headers(1, GRPC_HEADERS)
        c.send_data(1, message, end_stream=True)
        try:
            w.write(c.data_to_send())
            tally.add(*await _grpc_outcome(r))
        except (OSError, asyncio.TimeoutError) as exc:
            tally.add(f"lost:{type(exc).__name__}", repr(exc))
        finally:
            w.close()


async def _grpc_outcome(r: asyncio.StreamReader) -> tuple[str, str]:
    """Stream 1's outcome, read frame by frame (h2's client state machine rejects the frames a server may still
    send after its first GOAWAY, such as grpc.aio's PING and the answers to streams it did process)."""
    decoder, buf, goaway = hpack.Decoder(), b"", None
    while True:
        try:
            data = await asyncio.wait_for(r.read(65536), 20)
        except OSError:
            if goaway is not None and goaway < 1:  # told first that stream 1 was not processed
                return "refused", "GOAWAY before the stream was processed, then a reset"
            raise
        if not data:
            if goaway is not None and goaway < 1:
                return "refused", "GOAWAY before the stream was processed"
            return "lost:eof", f"connection closed without an answer (GOAWAY last stream {goaway})"
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n, kind, flags, sid = int.from_bytes(buf[:3], "big"), buf[3], buf[4], int.from_bytes(buf[5:9], "big")
            payload, buf = buf[9:9 + n], buf[9 + n:]
            if kind == 1:  # HEADERS (responses here are one frame: END_HEADERS)
                if flags & 0x8:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & 0x20:
                    payload = payload[5:]
                fields = dict(decoder.decode(payload, raw=True))
                if b"grpc-status" in fields:
                    code = fields[b"grpc-status"]
                    kind = {b"0": "ok", b"14": "turned_away", b"1": "cancelled"}.get(code, f"lost:grpc {code.decode()}")
                    return kind, repr(fields)
            elif kind == 7:  # GOAWAY
                goaway = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            elif kind == 3 and sid == 1:  # RST_STREAM: REFUSED_STREAM (7) means never processed
                code = int.from_bytes(payload[:4], "big")
                return ("refused" if code == 7 else f"lost:reset {code}"), f"RST_STREAM {code}"


@dataclass
class Round:
    exit_code: int | None
    exit_s: float  # from SIGTERM to the process's exit
    http: Tally
    grpc: Tally

    @property
    def lost(self) -> int:
        return self.http.lost + self.grpc.lost


async def drain_round(proc: subprocess.Popen, http_port: int, grpc_port: int | None, clients: int, grpc_clients: int,
                      signal_after_s: float) -> Round:
    """Load the server, SIGTERM it after ``signal_after_s``, wait for its exit (30 s at most), stop the clients."""
    stop = asyncio.Event()
    http, grpc = Tally(), Tally()
    tasks = [asyncio.ensure_future(http_client(http_port, stop, http)) for _ in range(clients)]
    if grpc_port is not None:
        tasks += [asyncio.ensure_future(grpc_client(grpc_port, stop, grpc)) for _ in range(grpc_clients)]
    await asyncio.sleep(signal_after_s)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 30:
        await asyncio.sleep(0.005)
    took = time.monotonic() - t0
    await asyncio.sleep(0.2)  # clients see the closed port
    stop.set()
    await asyncio.gather(*tasks)
    return Round(proc.returncode, took, http, grpc)
