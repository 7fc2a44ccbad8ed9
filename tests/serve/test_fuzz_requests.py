"""Fuzzing the request decoder with hypothesis: mutated JSON and binary requests never give a 5xx.

In process, the decoder (parse + model check + encode) must raise only 4xx ServeErrors, for 2,000 examples.
Over HTTP, the real server answers 300 mutated requests with zero 5xx and only strict RFC 8259 JSON bodies,
and still serves a good request afterwards (tests/stress sends 5,000 over HTTP). Bounded: fixed example counts, no deadline flakiness
(``deadline=None``), derandomized so CI failures reproduce. The stress suite runs a longer fuzz.
"""

from __future__ import annotations

import copy
import http.client
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resdeploy.serve.loadgen import encode_request
from resdeploy.serve.protocol import (IOSpec, ServeError, check_inputs, check_outputs, encode_infer_response,
                                      parse_header_length, parse_infer_request)

SPECS = [IOSpec("input", "FP32", (-1, 1, 28, 28))]
FUZZ_IN_PROCESS = 2000
FUZZ_HTTP = 300  # CI's share; tests/stress/test_stress.py sends 5,000

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=8), st.sampled_from(["FP32", "BYTES", "INT64", "input", "logits", "binary_data_size"]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                          max_leaves=12)
KEYS = ["inputs", "outputs", "parameters", "id", "name", "datatype", "shape", "data", "binary_data_size", "timeout",
        "classification", "binary_data", "binary_data_output"]


def _base(binary: bool) -> tuple[dict, bytes]:
    x = np.linspace(-1, 1, 784, dtype=np.float32).reshape(1, 1, 28, 28)
    if binary:
        header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                              "parameters": {"binary_data_size": x.nbytes}}],
                  "outputs": [{"name": "logits", "parameters": {"binary_data": True, "classification": 0}}],
                  "parameters": {"timeout": 5_000_000}, "id": "r1"}
        return header, x.tobytes()
    return ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.ravel().tolist()}],
             "outputs": [{"name": "logits"}], "parameters": {"binary_data_output": False}, "id": "r2"}, b"")


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list) and len(obj) < 16:  # not into the 784 data values one by one
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_request(draw) -> tuple[bytes, dict[str, str]]:
    """A valid request (JSON or binary) with 1-3 mutations: a value replaced, a key dropped or added, nesting
    wrapped, the binary tail cut or grown, the header length skewed, or raw bytes flipped."""
    binary = draw(st.booleans())
    header, tail = _base(binary)
    header = copy.deepcopy(header)
    raw_flip = None
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(header) if p]
        kind = draw(st.sampled_from(["replace", "drop", "add", "wrap", "tail", "hlen", "flip"]))
        path = draw(st.sampled_from(paths))
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        if kind == "replace":
            parent[path[-1]] = draw(json_value)
        elif kind == "drop" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(json_value)
        elif kind == "wrap":
            parent[path[-1]] = [parent[path[-1]]] * draw(st.integers(1, 3))
        elif kind == "tail":
            tail = tail[:draw(st.integers(0, len(tail)))] + b"\0" * draw(st.integers(0, 8))
        elif kind == "flip":
            raw_flip = draw(st.integers(0, 10**6))
    body = json.dumps(header).encode()
    hlen = len(body)
    if binary:
        if draw(st.booleans()):
            hlen = max(0, hlen + draw(st.integers(-8, 8)))
        body += tail
    if raw_flip is not None and body:
        i = raw_flip % len(body)
        body = body[:i] + bytes([body[i] ^ 0x5A]) + body[i + 1:]
    return body, ({"Inference-Header-Content-Length": str(hlen)} if binary else {})


def decode_like_the_server(body: bytes, headers: dict[str, str]) -> None:
    hlen = parse_header_length(headers.get("Inference-Header-Content-Length"), len(body))
    req = parse_infer_request(body, hlen)
    batch = check_inputs(req, SPECS, "m", 32)
    check_outputs(req, ["logits"], "m")
    _ = req.timeout_us
    logits = np.linspace(-3, 3, batch * 10, dtype=np.float32).reshape(batch, 10)
    enc = encode_infer_response("m", "1", req, {"logits": logits}, {"logits": [str(i) for i in range(10)]})
    json.loads(enc.body[:enc.header_length] if enc.header_length else enc.body,
               parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"{c} in JSON")))


@settings(max_examples=FUZZ_IN_PROCESS, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(mutated_request())
def test_decoder_raises_only_4xx(req):
    body, headers = req
    try:
        decode_like_the_server(body, headers)
    except ServeError as exc:
        assert 400 <= exc.status < 500, f"{exc.status}: {exc}"
        assert str(exc)


def test_server_answers_mutated_requests_without_a_5xx(server, mnist_images):
    fuzz_server(server, mnist_images, FUZZ_HTTP)


def fuzz_server(server, mnist_images, n: int) -> dict[int, int]:
    """Send ``n`` mutated requests to ``server``; assert zero 5xx, strict JSON bodies, a good request after."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    statuses: dict[int, int] = {}

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_request())
    def one(req):
        nonlocal conn
        body, headers = req
        conn.request("POST", "/v2/models/resnet20/infer", body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
        assert r.status < 500, (r.status, data[:300], body[:300])
        n = r.getheader("Inference-Header-Content-Length")
        json.loads(data[:int(n)] if n else data, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
        if r.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    one()
    conn.close()
    print(f"{sum(statuses.values())} mutated requests over HTTP: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= n and statuses.get(400, 0) > 0
    body, headers = encode_request({"input": mnist_images[:1]})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("POST", "/v2/models/resnet20/infer", body=body, headers=headers)
    assert c.getresponse().status == 200
    assert server.get("/v2/health/live")[0] == 200
    return statuses
