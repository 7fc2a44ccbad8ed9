"""Every error status over plain HTTP: a JSON {"error": ...} that names the problem, and the server stays up."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from resdeploy.serve.loadgen import encode_request


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if r.getheader("Content-Type", "").startswith("application/json") else {"raw": data})
    finally:
        conn.close()


@pytest.fixture()
def good(server, mnist_images):
    """A good binary request; calling it asserts the server still answers correctly."""
    body, headers = encode_request({"input": mnist_images[:1]})

    def check() -> None:
        status, _ = post(server, "/v2/models/resnet20/infer", body, headers)
        assert status == 200, "the server did not serve a good request after a bad one"

    return check


def _json_req(shape, data, datatype="FP32", name="input", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}).encode()


ONE = [0.0] * 784
BAD_400 = [
    ("malformed JSON", b'{"inputs": [', {}, "malformed JSON"),
    ("wrong shape", _json_req([1, 1, 27, 29], ONE[:783]), {}, r"input 'input' has shape \[1, 1, 27, 29\]; expected input: FP32\[\?,1,28,28\]"),
    ("wrong datatype", _json_req([1, 1, 28, 28], [0] * 784, "INT64"), {}, "input 'input' has datatype INT64; expected FP32"),
    ("data count", _json_req([1, 1, 28, 28], ONE[:700]), {}, "'input': 'data' has 700 values but shape needs 784"),
    ("batch too large", _json_req([33, 1, 28, 28], ONE * 33), {}, r"batch 33; expected 1..32"),
    ("unknown input", _json_req([1, 1, 28, 28], ONE, name="image"), {}, r"unknown inputs \['image'\]; missing inputs \['input'\]"),
    ("unknown output", _json_req([1, 1, 28, 28], ONE, outputs=[{"name": "probs"}]), {}, "requested output 'probs' unknown"),
    ("header length past the body", b"{}", {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length is 99"),
]


@pytest.mark.parametrize("what,body,headers,match", BAD_400, ids=[b[0] for b in BAD_400])
def test_bad_requests_get_400_naming_the_problem(server, good, what, body, headers, match):
    import re

    status, resp = post(server, "/v2/models/resnet20/infer", body, headers)
    assert status == 400, resp
    assert re.search(match, resp["error"]), resp["error"]
    good()


def test_binary_size_mismatches_get_400(server, good, mnist_images):
    body, headers = encode_request({"input": mnist_images[:1]})
    n = int(headers["Inference-Header-Content-Length"])
    status, resp = post(server, "/v2/models/resnet20/infer", body[:-4], headers)  # 4 bytes short
    assert status == 400 and "binary_data_size 3136 runs past the end" in resp["error"]
    status, resp = post(server, "/v2/models/resnet20/infer", body + b"\0" * 8, headers)
    assert status == 400 and "8 bytes after the binary tensors" in resp["error"]
    header = json.loads(body[:n])
    header["inputs"][0]["parameters"]["binary_data_size"] = 3132
    h = json.dumps(header).encode()
    status, resp = post(server, "/v2/models/resnet20/infer", h + body[n:-4], {"Inference-Header-Content-Length": str(len(h))})
    assert status == 400 and "binary_data_size is 3132 bytes" in resp["error"] and "needs 3136" in resp["error"]
    good()


def test_unknown_model_version_or_route_get_404(server, good):
    body = _json_req([1, 1, 28, 28], ONE)
    status, resp = post(server, "/v2/models/nope/infer", body)
    assert status == 404 and "unknown model 'nope'" in resp["error"] and "resnet20" in resp["error"]
    status, resp = post(server, "/v2/models/resnet20/versions/7/infer", body)
    assert status == 404 and "no version '7'" in resp["error"]
    status, raw = server.get("/v2/models/nope/ready")
    assert status == 400 and json.loads(raw)["ready"] is False  # Triton: readiness of an unknown model is a 400
    for path in ("/v2/models/nope/stats", "/v2/models/resnet20/versions/7/stats"):  # Triton: 400, not 404
        status, raw = server.get(path)
        assert status == 400 and "not available" in json.loads(raw)["error"], path
    status, raw = server.get("/v2/nothing/here")
    assert status == 404 and "no route" in json.loads(raw)["error"]
    good()


def test_body_over_the_limit_gets_413(server, good):
    # The session server runs with --max-body-mb 8; the default is 64 MiB (ServerConfig.max_body_bytes).
    from resdeploy.serve.server import ServerConfig

    assert ServerConfig().max_body_bytes == 64 << 20
    big = np.zeros((9 << 20) // 4, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                     "parameters": {"binary_data_size": len(big)}}]}).encode()
    status, resp = post(server, "/v2/models/resnet20/infer", header + big, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 413 and "limit is 8388608" in resp["error"]
    good()


def test_model_that_failed_to_load_is_unknown_like_on_triton(server, good):
    status, resp = post(server, "/v2/models/broken/infer", _json_req([1, 1, 28, 28], ONE))
    assert status == 404 and "no available versions" in resp["error"] and "could not load" in resp["error"]
    for path in ("/v2/models/broken", "/v2/models/broken/config", "/v2/models/broken/versions/1/config"):
        status, raw = server.get(path)
        assert status == 404 and "could not load" in json.loads(raw)["error"], path
    status, raw = server.get("/v2/models/broken/stats")
    assert status == 400 and "not available" in json.loads(raw)["error"]
    good()


def test_full_queue_gets_503_at_once_and_the_server_recovers(server, good, mnist_images):
    # tiny_queue: max_queue_size 1, one instance. 16 clients send batch-32 requests at once: while one executes
    # and one waits, the others must be turned away immediately with 503, not queued.
    x = np.repeat(mnist_images[:1], 32, axis=0)
    body, headers = encode_request({"input": x})

    def one(_):
        return post(server, "/v2/models/tiny_queue/infer", body, headers)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    assert any("overloaded" in r["error"] and "max_queue_size 1" in r["error"] for s, r in results if s == 503)
    status, raw = server.get("/v2/models/tiny_queue/stats")
    assert json.loads(raw)["model_stats"][0]["inference_stats"]["fail"]["count"] == statuses.count(503)  # once each
    assert post(server, "/v2/models/tiny_queue/infer", body, headers)[0] == 200
    good()


def test_request_timeout_gets_503(server, good, mnist_images):
    # A 1 us deadline (tritonclient's `timeout` parameter, in microseconds) cannot be met by a 32-sample batch.
    x = np.repeat(mnist_images[:1], 32, axis=0)
    req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
           "parameters": {"timeout": 1}}
    status, resp = post(server, "/v2/models/resnet20/infer", json.dumps(req).encode())
    assert status == 503 and "timed out" in resp["error"]
    good()


def test_strict_readiness_turns_health_ready_400(model_repo, tmp_path, spawn_server):
    # Triton's default: with a model that failed to load, the server is live but never ready.
    start_server, stop_server = spawn_server
    sp = start_server(model_repo, tmp_path, ready_path="/v2/models/resnet20/ready")
    try:
        assert sp.get("/v2/health/live")[0] == 200
        status, raw = sp.get("/v2/health/ready")
        assert status == 400 and json.loads(raw) == {"ready": False}  # Triton's status for not ready
    finally:
        assert stop_server(sp) == 0
