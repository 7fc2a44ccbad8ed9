"""gRPC on resdeploy's own HTTP/2 transport (the default): what tritonclient never sends, sent by hand with h2.

tests/serve/test_server_grpc.py runs tritonclient.grpc (grpcio's client) through every endpoint; this file
breaks the gRPC framing itself (content type, encodings, length prefixes, timeouts, methods) and the limits
(message size before the body is read, inflated size, idle / silent / slow connections, connection and RPC caps)
and expects the status codes and messages grpc.aio gave, or that gRPC's HTTP/2 mapping prescribes.
"""

from __future__ import annotations

import gzip
import socket
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("h2")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

from tests.serve.h2_peer import PREFACE, call, grpc_headers, grpc_message, parse_frames, raw_frame  # noqa: E402

INFER = b"/inference.GRPCInferenceService/ModelInfer"
LIVE = b"/inference.GRPCInferenceService/ServerLive"
UNAVAILABLE, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED = 14, 8, 12, 13, 3, 5, 4


def infer_request(x: np.ndarray, model: str = "resnet20") -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


def logits(answer) -> np.ndarray:
    assert answer.status == 0 and answer.headers[b":status"] == b"200", answer
    resp = pb.ModelInferResponse.FromString(answer.payload)
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))


def test_raw_infer_matches_tritonclient_and_compressed_requests_inflate(server, mnist_images):
    x = mnist_images[:2]
    plain = logits(call(server.grpc_url, grpc_headers(INFER), grpc_message(infer_request(x))))
    c = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):  # grpcio's own compression, as a user turns it on
        got = c.infer("resnet20", [inp], compression_algorithm=algorithm).as_numpy("logits")
        np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)
    c.close()
    body = infer_request(x)
    for enc, packed in ((b"gzip", gzip.compress(body)), (b"deflate", zlib.compress(body))):
        ans = call(server.grpc_url, grpc_headers(INFER, grpc_encoding=enc), grpc_message(packed, compressed=True))
        np.testing.assert_allclose(logits(ans), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("headers, data, code, http_status, says", [
    (grpc_headers(b"/inference.GRPCInferenceService/Nope"), b"", UNIMPLEMENTED, b"200", "unknown method"),
    (grpc_headers(b"/inference.GRPCInferenceService/ModelStreamInfer"), b"", UNIMPLEMENTED, b"200", "not implemented"),
    (grpc_headers(b"/inference.GRPCInferenceService/SystemSharedMemoryStatus"), b"", UNIMPLEMENTED, b"200",
     "not implemented"),
    ([(k, b"text/plain" if k == b"content-type" else v) for k, v in grpc_headers(LIVE)], b"", INVALID_ARGUMENT, b"415",
     "is not application/grpc"),
    ([(k, b"PUT" if k == b":method" else v) for k, v in grpc_headers(LIVE)], b"", UNIMPLEMENTED, b"405", "POST"),
    (grpc_headers(LIVE, grpc_encoding=b"br"), grpc_message(b""), UNIMPLEMENTED, b"200", "grpc-encoding 'br'"),
    (grpc_headers(LIVE, grpc_timeout=b"10 seconds"), grpc_message(b""), INTERNAL, b"200", "grpc-timeout"),
    (grpc_headers(LIVE), grpc_message(b"") + grpc_message(b""), INTERNAL, b"200", "second request message"),
    (grpc_headers(LIVE), grpc_message(b"", compressed=True), INTERNAL, b"200", "grpc-encoding is identity"),
    (grpc_headers(LIVE), b"\0\0\0", INTERNAL, b"200", "one whole length-prefixed message"),
    (grpc_headers(LIVE), b"\2\0\0\0\0", INTERNAL, b"200", "neither 0 nor 1"),
    (grpc_headers(LIVE, grpc_encoding=b"gzip"), grpc_message(b"not gzip", compressed=True), INTERNAL, b"200",
     "cannot be inflated"),
    (grpc_headers(INFER), grpc_message(b"\xff\xff\xff"), INVALID_ARGUMENT, b"200", "cannot parse ModelInferRequest"),
    (grpc_headers(INFER), grpc_message(pb.ModelInferRequest(model_name="n\u00e9e").SerializeToString()), NOT_FOUND,
     b"200", "unknown model 'n\u00e9e'"),
])
def test_broken_grpc_framing_gets_a_status_and_the_server_goes_on(server, headers, data, code, http_status, says):
    ans = call(server.grpc_url, headers, data)
    assert ans.headers.get(b":status") == http_status and ans.status == code and says in ans.message, ans
    if code == UNIMPLEMENTED and says.startswith("grpc-encoding"):
        assert ans.fields[b"grpc-accept-encoding"] == b"identity,deflate,gzip"
    assert call(server.grpc_url, grpc_headers(LIVE), grpc_message(b"")).status == 0


def test_an_oversized_message_is_refused_from_its_length_prefix(server):
    # The server's limit is 8 MiB; the prefix announces 9 MiB and the body never comes: the answer must not wait.
    t0 = time.monotonic()
    ans = call(server.grpc_url, grpc_headers(INFER), b"\0" + (9 << 20).to_bytes(4, "big"), end=False)
    assert ans.status == RESOURCE_EXHAUSTED and "larger than max" in ans.message, ans
    assert time.monotonic() - t0 < 10


def test_a_message_that_inflates_past_the_limit_is_refused(server):
    bomb = gzip.compress(b"\0" * (9 << 20))  # 9 MiB of zeros in ~9 KiB
    ans = call(server.grpc_url, grpc_headers(INFER, grpc_encoding=b"gzip"), grpc_message(bomb, compressed=True))
    assert ans.status == RESOURCE_EXHAUSTED and "inflates to more than max" in ans.message, ans


def test_an_expired_grpc_timeout_is_deadline_exceeded(server, mnist_images):
    ans = call(server.grpc_url, grpc_headers(INFER, grpc_timeout=b"1n"), grpc_message(infer_request(mnist_images[:1])))
    assert ans.status == DEADLINE_EXCEEDED, ans


def test_http1_on_the_grpc_port_is_turned_away(server):
    with socket.create_connection(server.grpc_url.rsplit(":", 1), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    frames = parse_frames(data)
    assert frames[-1][0] == 7 and b"client preface" in frames[-1][3]  # GOAWAY, then closed
    assert call(server.grpc_url, grpc_headers(LIVE), grpc_message(b"")).status == 0


@pytest.fixture(scope="module")
def tight_server(model_repo, tmp_path_factory):
    from tests.serve.conftest import start_server, stop_server

    sp = start_server(model_repo, tmp_path_factory.mktemp("tight"), "--no-strict-readiness", "--header-timeout", "1",
                      "--body-timeout", "1", "--keepalive-timeout", "2", "--max-connections", "3")
    yield sp
    stop_server(sp)


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_silent_idle_and_slow_connections_are_closed(tight_server):
    host, port = tight_server.grpc_url.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as silent:  # no preface
        frames = parse_frames(_read_until_closed(silent, 6))
    assert frames[-1][0] == 7 and b"no HTTP/2 preface" in frames[-1][3]
    with socket.create_connection((host, int(port))) as idle:
        idle.sendall(PREFACE + raw_frame(4, 0, 0))
        frames = parse_frames(_read_until_closed(idle, 8))
    assert frames[-1][0] == 7 and b"idle for 2 s" in frames[-1][3]
    slow = call(tight_server.grpc_url, grpc_headers(INFER), b"\0\0\0", end=False)  # the message never completes
    assert slow.status == DEADLINE_EXCEEDED and "not received within 1 s" in slow.message, slow


def test_connections_over_the_cap_get_goaway(tight_server):
    host, port = tight_server.grpc_url.rsplit(":", 1)
    held = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        for s in held:
            s.sendall(PREFACE + raw_frame(4, 0, 0))
        time.sleep(0.3)
        with socket.create_connection((host, int(port))) as extra:
            frames = parse_frames(_read_until_closed(extra, 5))
        assert frames[-1][0] == 7 and b"too many connections" in frames[-1][3]
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert call(tight_server.grpc_url, grpc_headers(LIVE), grpc_message(b"")).status == 0


def test_rpcs_over_the_cap_and_during_the_drain_are_refused_in_process():
    """NativeGrpc's own counting, without a model: a server stand-in with max_connections=1."""
    from types import SimpleNamespace

    from resdeploy.serve.grpc_native import NativeGrpc
    from resdeploy.serve.http2 import H2Connection, H2Limits
    from tests.serve.h2_peer import FakeTransport, h2_client

    fake = SimpleNamespace(config=SimpleNamespace(max_body_bytes=1 << 20, max_connections=1), draining=False)
    svc = NativeGrpc(fake)
    t = FakeTransport()
    conn = H2Connection(svc, H2Limits())
    conn.connection_made(t)
    c = h2_client()
    c.send_headers(1, grpc_headers(LIVE))  # open, message not sent yet: it holds the one RPC slot
    c.send_headers(3, grpc_headers(LIVE), end_stream=True)
    conn.data_received(c.data_to_send())
    assert svc.rpcs == 1
    events = c.receive_data(t.take())
    trailers = [dict(e.headers) for e in events if type(e).__name__ == "ResponseReceived"]
    assert trailers[0][b"grpc-status"] == str(RESOURCE_EXHAUSTED).encode() and trailers[0][b":status"] == b"200"
    c.reset_stream(1)
    conn.data_received(c.data_to_send())
    assert svc.rpcs == 0  # a reset stream gives its slot back
    fake.draining = True
    c.send_headers(5, grpc_headers(LIVE), end_stream=True)
    conn.data_received(c.data_to_send())
    events = c.receive_data(t.take())
    assert [dict(e.headers)[b"grpc-status"] for e in events if type(e).__name__ == "ResponseReceived"] == [b"14"]
    conn.connection_lost(None)
    assert svc.connections == set()


def test_the_grpcio_transport_still_serves_the_same_answers(model_repo, tmp_path, server, mnist_images):
    """--grpc-transport grpcio (grpc.aio), the A/B baseline and escape hatch: same service, same answers."""
    from tests.serve.conftest import start_server, stop_server

    x = mnist_images[:2]
    native = logits(call(server.grpc_url, grpc_headers(INFER), grpc_message(infer_request(x))))
    sp = start_server(model_repo, tmp_path, "--no-strict-readiness", "--grpc-transport", "grpcio")
    try:
        assert "GRPCInferenceService on grpc.aio" in sp.log()
        np.testing.assert_allclose(logits(call(sp.grpc_url, grpc_headers(INFER), grpc_message(infer_request(x)))),
                                   native, rtol=1e-6, atol=1e-6)
        missing = call(sp.grpc_url, grpc_headers(INFER), grpc_message(infer_request(x, model="nope")))
        assert missing.status == NOT_FOUND and "unknown model 'nope'" in missing.message
    finally:
        assert stop_server(sp) == 0
    assert "GRPCInferenceService on resdeploy's HTTP/2" in server.log()
