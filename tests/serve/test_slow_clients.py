"""Slow and idle clients, the connection cap, and the SIGTERM drain race, on a server with short deadlines.

Every test ends by checking that the server is live and answers a good request: a slow client costs it a
connection for at most its deadline, never its service.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from resdeploy.serve.loadgen import encode_request

LIMITS = ("--header-timeout", "1", "--body-timeout", "1", "--keepalive-timeout", "1", "--max-connections", "12")


@pytest.fixture(scope="module")
def slow_server(model_repo, tmp_path_factory, spawn_server):
    start_server, stop_server = spawn_server
    sp = start_server(model_repo, tmp_path_factory.mktemp("slow"), "--no-strict-readiness", *LIMITS)
    yield sp
    assert stop_server(sp) == 0


def raw(sp, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", sp.port), timeout=10)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything until the server closes the connection, and how long that took."""
    t0, out = time.monotonic(), b""
    s.settimeout(limit_s)
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
    return out, time.monotonic() - t0


def good_request(sp, mnist_images) -> None:
    assert sp.get("/v2/health/live")[0] == 200
    body, headers = encode_request({"input": mnist_images[:1]})
    assert http("POST", f"http://{sp.url}/v2/models/resnet20/infer", body, headers)[0] == 200


def infer_head(sp, n: int, extra: str = "") -> bytes:
    return (f"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: 127.0.0.1:{sp.port}\r\nContent-Length: {n}\r\n{extra}"
            "Content-Type: application/json\r\n\r\n").encode()


def test_stalled_headers_get_408_and_are_closed(slow_server, mnist_images):
    s = raw(slow_server, b"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    out, took = read_all(s)
    assert out.startswith(b"HTTP/1.1 408") and b"--header-timeout" in out, out
    assert took < 3.0
    good_request(slow_server, mnist_images)


def test_trickled_headers_do_not_reset_the_deadline(slow_server, mnist_images):
    s = raw(slow_server, b"P")
    t0 = time.monotonic()
    try:
        for b in b"OST /v2/health/live HTTP/1.1\r\nX-Slow: ":
            s.sendall(bytes([b]))
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out, _ = read_all(s)
    assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4.0
    good_request(slow_server, mnist_images)


def test_connection_that_sends_nothing_is_closed(slow_server, mnist_images):
    out, took = read_all(raw(slow_server))
    assert out == b"" and took < 3.0
    good_request(slow_server, mnist_images)


def test_stalled_body_gets_408(slow_server, mnist_images):
    s = raw(slow_server, infer_head(slow_server, 1000) + b'{"inputs": [')  # 12 of 1000 bytes, then nothing
    out, took = read_all(s)
    assert out.startswith(b"HTTP/1.1 408") and b"--body-timeout" in out and b"not received within 1.0 s" in out, out
    assert took < 3.0
    good_request(slow_server, mnist_images)


def test_idle_keepalive_connection_is_closed(slow_server, mnist_images):
    s = raw(slow_server, f"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1:{slow_server.port}\r\n\r\n".encode())
    out, took = read_all(s)
    assert out.startswith(b"HTTP/1.1 200") and 0.8 < took < 3.0, (out, took)
    good_request(slow_server, mnist_images)


def test_connections_past_the_cap_get_503_and_the_server_recovers(slow_server, mnist_images):
    held = [raw(slow_server) for _ in range(12)]  # the cap is 12
    time.sleep(0.2)
    s = raw(slow_server)
    out, _ = read_all(s, 5)
    assert out.startswith(b"HTTP/1.1 503") and b"--max-connections" in out, out
    for h in held:
        h.close()
    time.sleep(0.3)
    good_request(slow_server, mnist_images)


def test_sigterm_answers_every_request_that_reached_the_server(model_repo, tmp_path, spawn_server, mnist_images):
    """The drain race: 24 connections opened and sent a complete request right at SIGTERM (some before it, some
    in the same loop tick, some after). Each one that connected gets a full HTTP response (200 or 503), none is
    reset or left hanging, and the process exits 0 promptly with an honest log."""
    import threading

    start_server, stop_server = spawn_server
    sp = start_server(model_repo, tmp_path, "--no-strict-readiness", "--shutdown-timeout", "10")
    body, headers = encode_request({"input": mnist_images[:1]})
    head = (f"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: 127.0.0.1:{sp.port}\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    results: list[tuple[str, bytes]] = []

    def client(delay: float) -> None:
        time.sleep(delay)
        try:
            s = socket.create_connection(("127.0.0.1", sp.port), timeout=10)
        except OSError as exc:  # refused after the listener closed: not accepted, so nothing was lost
            results.append(("refused", repr(exc).encode()))
            return
        try:
            s.sendall(head + body)
            out, _ = read_all(s, 15)
            results.append(("answered" if re.match(rb"HTTP/1.1 (200|503) ", out) else "LOST", out[:200]))
        except OSError as exc:
            results.append(("LOST", repr(exc).encode()))

    threads = [threading.Thread(target=client, args=(0.01 * i,)) for i in range(24)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    sp.proc.send_signal(signal.SIGTERM)
    t_sig = time.monotonic()
    rc = sp.proc.wait(15)
    took = time.monotonic() - t_sig
    for t in threads:
        t.join(20)
    stop_server(sp)
    kinds = [k for k, _ in results]
    log = sp.log()
    assert "LOST" not in kinds, [r for r in results if r[0] == "LOST"]
    assert kinds.count("answered") >= 10, kinds  # the listener stays open a moment: late clients get 503
    assert rc == 0 and took < 5.0, (rc, took, log)
    assert re.search(r"shutdown: \d+ request\(s\) in progress at the signal; \d+ answered during the drain .*; 0 abandoned", log)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
