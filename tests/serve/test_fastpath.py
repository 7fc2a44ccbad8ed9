"""The HTTP fast path: what it takes, what it leaves to aiohttp, and that a client cannot tell them apart.

The parser is tested on its own (a valid request, then each way of breaking it must decline); then two real
servers, one with ``--no-http-fast-path``, get the same raw bytes and must answer byte for byte the same (the
Date header aside), and the fast one's shutdown line must count exactly the requests the fast path could take.
"""

from __future__ import annotations

import json
import re
import socket
import time

import numpy as np
import pytest

from resdeploy.serve.fastpath import UNKNOWN, WHOLE, Declined, PlainInfer, parse_plain_infer, response_bytes
from tests.serve.conftest import start_server, stop_server

X = np.arange(784, dtype=np.float32).reshape(1, 1, 28, 28) / 784


def binary_body(x: np.ndarray = X, extra: dict | None = None) -> tuple[bytes, int]:
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}, **(extra or {})}).encode()
    return header + raw, len(header)


def request(path: str = "/v2/models/resnet20/infer", body: bytes | None = None, hlen: int | None = None,
            headers: tuple[str, ...] = (), method: str = "POST", version: str = "HTTP/1.1") -> bytes:
    if body is None:
        body, hlen = binary_body()
    head = [f"{method} {path} {version}", "Host: localhost", *headers]
    if hlen is not None:
        head.append(f"Inference-Header-Content-Length: {hlen}")
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# -- the parser -----------------------------------------------------------------------------------------------
def test_a_plain_infer_request_is_taken():
    body, hlen = binary_body()
    got = parse_plain_infer(request(body=body, hlen=hlen), max_body=1 << 20)
    assert got == PlainInfer("resnet20", None, str(hlen), body)
    got = parse_plain_infer(request("/v2/models/resnet20/versions/3/infer", body, hlen), max_body=1 << 20)
    assert (got.model, got.version) == ("resnet20", "3")
    assert isinstance(parse_plain_infer(request(headers=("Connection: keep-alive",)), max_body=1 << 20), PlainInfer)


W, P = WHOLE, UNKNOWN


@pytest.mark.parametrize(("data", "why"), [
    # Whole requests framed by Content-Length: aiohttp answers, and the connection may use the fast path again.
    pytest.param(request(method="PUT"), W, id="not-POST"),
    pytest.param(request(version="HTTP/1.0"), W, id="HTTP/1.0"),
    pytest.param(request("/v2/models/resnet20/infer?x=1"), W, id="query"),
    pytest.param(request("/v2/models/res%6Eet20/infer"), W, id="percent-encoded"),
    pytest.param(request("/v2/models/resnet20/ready"), W, id="other-route"),
    pytest.param(request("/v2/models/a/b/infer"), W, id="extra-segment"),
    pytest.param(request(headers=("Connection: close",)), W, id="connection-close"),
    pytest.param(request(headers=("Expect: 100-continue",)), W, id="expect"),
    pytest.param(request(headers=("Content-Encoding: gzip",)), W, id="compressed"),
    pytest.param(request(headers=("Inference-Header-Content-Length: 1",)), W, id="two-header-lengths"),
    # Anything else may leave aiohttp's parser mid-request: that connection stays on aiohttp.
    pytest.param(request()[:-1], Declined(1), id="body-not-all-here"),  # counted: aiohttp reads the last byte
    pytest.param(request().split(b"\r\n\r\n")[0], P, id="head-not-all-here"),
    pytest.param(request() + request(), P, id="pipelined"),
    pytest.param(request(headers=("Transfer-Encoding: chunked",)), P, id="chunked"),
    pytest.param(request(headers=("Upgrade: h2c", "Connection: upgrade")), P, id="upgrade"),
    pytest.param(request(headers=("Content-Length: 3", "Content-Length: 3")), P, id="two-lengths"),
    pytest.param(request(headers=("Content-Length: +3",)), P, id="signed-length"),
    pytest.param(request(headers=("X-A: 1", " folded")), P, id="obs-fold"),
    pytest.param(request(headers=("Bad Name: 1",)), P, id="space-in-name"),
    pytest.param(request(headers=tuple(f"X-{i}: {i}" for i in range(70))), P, id="many-fields"),
    pytest.param(request(headers=("X-Big: " + "a" * 9000,)), P, id="huge-head"),
    pytest.param(b"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: x\r\n\r\n", P, id="no-length"),
])
def test_anything_else_is_left_to_aiohttp(data, why):
    assert parse_plain_infer(data, max_body=1 << 20) == why


def test_a_body_over_the_limit_is_left_to_aiohttp():  # aiohttp's route answers the 413
    data = request()
    assert parse_plain_infer(data, max_body=len(binary_body()[0]) - 1) == WHOLE
    assert isinstance(parse_plain_infer(data, max_body=len(binary_body()[0])), PlainInfer)


def test_response_head():
    r = response_bytes(503, "application/json", b"{}", close=True)
    head, body = r.split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable" and body == b"{}"
    assert [line.split(b":")[0] for line in lines[1:]] == [b"Content-Type", b"Content-Length", b"Date", b"Server",
                                                          b"Connection"]


# -- the same bytes from both servers -------------------------------------------------------------------------
def read_response(sock: socket.socket, buf: bytearray) -> bytes:
    """One whole HTTP response (head + Content-Length body) from ``sock``; what follows stays in ``buf``."""
    deadline = time.monotonic() + 20
    while b"\r\n\r\n" not in buf:
        assert time.monotonic() < deadline, bytes(buf)
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {bytes(buf)!r}"
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    length = int(re.search(rb"\r\nContent-Length: (\d+)", bytes(buf[:end])).group(1))
    while len(buf) < end + length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        buf += chunk
    out = bytes(buf[:end + length])
    del buf[:end + length]
    return re.sub(rb"Date: [^\r]*\r\n", b"", out)


def conversation(port: int) -> list[bytes]:
    """Every response to a fixed script of requests, over three connections."""
    json_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                        "data": X.ravel().tolist()}]}).encode()
    classify, chl = binary_body(extra={"outputs": [{"name": "logits", "parameters": {"classification": 3}}]})
    bad_dtype = request().replace(b'"FP32"', b'"FP16"')
    out = []
    with socket.create_connection(("127.0.0.1", port)) as s:  # keep-alive: plain requests and refusals mixed
        buf = bytearray()
        for data in (request(), request(body=json_body), request("/v2/models/resnet20/versions/1/infer"),
                     request(body=classify, hlen=chl), bad_dtype, request("/v2/models/nope/infer"),
                     request("/v2/models/resnet20_nobatch/infer"), request(), request(headers=("Connection: close",))):
            s.sendall(data)
            out.append(read_response(s, buf))
    # A request whose body comes in a second read: aiohttp reads it, counted to its last byte, so the next one is
    # the fast path's again; then two pipelined in one read, after which this connection stays on aiohttp.
    with socket.create_connection(("127.0.0.1", port)) as s:
        buf = bytearray()
        data = request()
        s.sendall(data[:len(data) - 100])
        time.sleep(0.05)
        s.sendall(data[len(data) - 100:])
        out.append(read_response(s, buf))
        s.sendall(request())
        out.append(read_response(s, buf))
        s.sendall(request() + request("/v2/models/resnet20/versions/1/infer"))
        out += [read_response(s, buf), read_response(s, buf)]
        s.sendall(request())
        out.append(read_response(s, buf))
    with socket.create_connection(("127.0.0.1", port)) as s:  # a head in two reads: aiohttp's for good
        buf = bytearray()
        s.sendall(data[:40])
        time.sleep(0.05)
        s.sendall(data[40:])
        out.append(read_response(s, buf))
        s.sendall(request())
        out.append(read_response(s, buf))
    return out


FAST_IN_SCRIPT = 9  # the first connection's plain requests (refusals included), the second's after the split one


def test_fast_path_answers_byte_for_byte_like_aiohttp(model_repo, tmp_path):
    fast = start_server(model_repo, tmp_path, "--no-strict-readiness")
    slow = start_server(model_repo, tmp_path, "--no-strict-readiness", "--no-http-fast-path")
    try:
        got_fast, got_slow = conversation(fast.port), conversation(slow.port)
    finally:
        stop_server(fast)
        stop_server(slow)
    assert len(got_fast) == len(got_slow) == 16
    for i, (a, b) in enumerate(zip(got_fast, got_slow)):
        assert a == b, f"response {i} differs:\nfast path: {a[:400]!r}\naiohttp:   {b[:400]!r}"
    statuses = [int(r.split(b" ", 2)[1]) for r in got_fast]
    assert statuses == [200, 200, 200, 200, 400, 404, 200, 200, 200] + [200] * 7
    assert b"Connection: close" in got_fast[8]
    assert fast_count(fast.log()) == FAST_IN_SCRIPT, fast.log()[-600:]
    assert fast_count(slow.log()) == 0, slow.log()[-600:]


def fast_count(log: str) -> int:
    found = re.search(r"HTTP request\(s\) served, (\d+) of them on the fast path", log)
    assert found, log[-600:]
    return int(found.group(1))


def test_fast_path_under_concurrency_matches_the_reference(model_repo, tmp_path, runner_reference):
    """16 keep-alive clients at once (batches form): every answer is the model's own output for its input."""
    import threading

    sp = start_server(model_repo, tmp_path, "--no-strict-readiness")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 1, 28, 28)).astype(np.float32) for _ in range(16)]
    wants = [runner_reference.infer({"input": x})["logits"] for x in inputs]
    errors: list[str] = []

    def client(k: int) -> None:
        body, hlen = binary_body(inputs[k])
        with socket.create_connection(("127.0.0.1", sp.port)) as s:
            buf = bytearray()
            for _ in range(30):
                s.sendall(request(body=body, hlen=hlen))
                r = read_response(s, buf)
                head, payload = r.split(b"\r\n\r\n", 1)
                n = int(re.search(rb"Inference-Header-Content-Length: (\d+)", head).group(1))
                got = np.frombuffer(payload[n:], np.float32).reshape(1, 10)
                if not np.allclose(got, wants[k], rtol=1e-4, atol=1e-4):
                    errors.append(f"client {k}: {got} != {wants[k]}")
                    return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        stop_server(sp)
    assert not errors, errors[:3]
    assert fast_count(sp.log()) == 480


# -- the aiohttp versions it runs on --------------------------------------------------------------------------
def test_the_fast_path_runs_only_on_the_aiohttp_it_is_tested_on():
    from aiohttp import web

    from resdeploy.serve.fastpath import TESTED_AIOHTTP, unsupported_reason

    (lo, lo_minor), (hi, hi_minor) = TESTED_AIOHTTP
    assert unsupported_reason(f"{lo}.{lo_minor}.0") is None and unsupported_reason(f"{lo}.{lo_minor}.9") is None
    for version in (f"{hi}.{hi_minor}.0", f"{lo}.{lo_minor - 1}.5", "4.0.0a1", "nonsense"):
        why = unsupported_reason(version)
        assert why and "outside the range" in why and f"aiohttp>={lo}.{lo_minor},<{hi}.{hi_minor}" in why, version

    # aiohttp 3.13's RequestHandler has no _upgraded, for one: a handler without the attributes is refused by name
    why = unsupported_reason(f"{lo}.{lo_minor}.0", type("Bare", (), {"_messages": None}))
    assert why.startswith(f"aiohttp {lo}.{lo_minor}.0's RequestHandler lacks _payload_parser, _upgraded"), why
    assert unsupported_reason(f"{lo}.{lo_minor}.0", web.RequestHandler) is None


def test_the_installed_aiohttp_is_the_tested_one_and_pyproject_pins_that_range():
    """CI fails here, not silently slower, when the environment or the pin drifts from the tested range."""
    import re
    from pathlib import Path

    from resdeploy.serve.fastpath import TESTED_AIOHTTP, unsupported_reason

    assert unsupported_reason() is None, unsupported_reason()
    (lo, lo_minor), (hi, hi_minor) = TESTED_AIOHTTP
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(rf'"aiohttp>={lo}\.{lo_minor},<{hi}\.{hi_minor}"', pyproject), "pyproject.toml's aiohttp pin"


def test_an_untested_aiohttp_turns_the_fast_path_off_with_a_log_line(model_repo, monkeypatch, caplog):
    """In-process server with aiohttp claiming a version outside the range: it says why, and still answers."""
    import asyncio
    import logging
    import threading
    import urllib.request

    import aiohttp

    from resdeploy.serve.config import ServerConfig
    from resdeploy.serve.server import ModelServer

    monkeypatch.setattr(aiohttp, "__version__", "3.99.0")
    server = ModelServer(model_repo, ServerConfig(port=0, grpc_port=None, threads=1, warmup=False, strict_readiness=False))
    ready, result = threading.Event(), {}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: result.update(rc=loop.run_until_complete(server.run(lambda s: ready.set()))))
    with caplog.at_level(logging.INFO, logger="resdeploy.serve"):
        thread.start()
        try:
            assert ready.wait(60)
            body, hlen = binary_body()
            req = urllib.request.Request(f"http://127.0.0.1:{server.http.port}/v2/models/resnet20/infer", data=body,
                                         headers={"Inference-Header-Content-Length": str(hlen)}, method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
        finally:
            loop.call_soon_threadsafe(server.request_stop)
            thread.join(30)
            loop.close()
    assert result["rc"] == 0
    assert server.fast is None
    assert "HTTP fast path off: aiohttp 3.99.0 is outside the range the fast path is tested on" in caplog.text
    assert "HTTP request(s) served, 0 of them on the fast path" in caplog.text
