"""Hostile requests against a real server: each gets a 4xx naming the problem (never a 5xx), the reply is strict
RFC 8259 JSON, no request makes the server allocate far more than its body, and afterwards the server is live
and still answers a good request correctly."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import zlib

import numpy as np
import pytest

from resdeploy.serve.loadgen import encode_request

URL = "/v2/models/resnet20/infer"
ONE = [0.0] * 784


def strict_json(data: bytes):
    """json.loads that refuses NaN/Infinity (not RFC 8259) instead of accepting Python's extension."""
    def bad(name):
        raise ValueError(f"non-RFC 8259 constant {name} in the response")

    return json.loads(data, parse_constant=bad)


def post(server, body: bytes, headers: dict | None = None, path: str = URL) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        assert r.getheader("Content-Type", "").startswith(("application/json", "application/octet-stream")), data[:200]
        n = r.getheader("Inference-Header-Content-Length")
        return r.status, strict_json(data[:int(n)] if n else data)
    finally:
        conn.close()


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.fixture()
def still_serving(server, mnist_images, runner_reference):
    """Asserts, after each hostile request, that the server is live and a good request gets the right answer."""
    body, headers = encode_request({"input": mnist_images[:2]})
    want = runner_reference.infer({"input": mnist_images[:2]})["logits"]

    def check() -> None:
        assert server.get("/v2/health/live")[0] == 200
        status, resp = post(server, body, headers)
        assert status == 200, resp
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", URL, body=json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28],
                                                              "data": mnist_images[:2].ravel().tolist()}]}))
        got = json.loads(conn.getresponse().read())["outputs"][0]["data"]
        conn.close()
        np.testing.assert_allclose(np.asarray(got, np.float32).reshape(2, 10), want, rtol=1e-4, atol=1e-4)

    return check


def _req(tensor: dict | None = None, **top) -> bytes:
    t = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": ONE}
    t.update(tensor or {})
    return json.dumps({"inputs": [t], **top}).encode()


def binary(header: str, n: int) -> tuple[bytes, dict]:
    """A binary-extension body: the JSON header then n zero bytes, with its Inference-Header-Content-Length."""
    h = header.encode()
    return h + b"\0" * n, {"Inference-Header-Content-Length": str(len(h))}


DEEP = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
CASES = [
    ("JSON nested 100,000 levels", DEEP, {}, "nested too deeply"),
    ("JSON array nested 100,000 levels", b"[" * 100_000 + b"]" * 100_000, {}, "nested too deeply"),
    ("data nested 40 levels", _req({"shape": [1], "data": json.loads("[" * 40 + "0" + "]" * 40)}), {}, "nested 40 levels deep but the shape has 1 dims"),
    ("33 dims", _req({"shape": [1] * 33, "data": [0.0]}), {}, "shape has 33 dims; at most 32"),
    ("100 dims of zeros", _req({"shape": [0] * 100, "data": []}), {}, "shape has 100 dims"),
    ("dims past 2**63", _req({"shape": [0, 2**70], "data": []}), {}, "more than 2\\*\\*62 elements"),
    ("datatype a list", _req({"datatype": ["FP32"]}), {}, "datatype a list unknown"),
    ("datatype an object", _req({"datatype": {"FP32": 1}}), {}, "datatype an object unknown"),
    ("datatype a number", _req({"datatype": 7}), {}, "datatype a number unknown"),
    ("request parameters a list", _req(parameters=[1, 2]), {}, "request: 'parameters' is a list; expected a JSON object"),
    ("request parameters a string", _req(parameters="x"), {}, "request: 'parameters' is a string"),
    ("input parameters a number", _req({"parameters": 5}), {}, "input 'input': 'parameters' is a number"),
    ("output parameters a list", _req(outputs=[{"name": "logits", "parameters": ["binary_data"]}]), {},
     "output 'logits': 'parameters' is a list"),
    ("output not an object", _req(outputs=[["logits"]]), {}, "a requested output \\(a list\\) has no 'name'"),
    ("binary_data a string", _req(outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}]), {},
     "binary_data is a string; expected true or false"),
    ("timeout Infinity", _req().replace(b'"inputs"', b'"parameters": {"timeout": Infinity}, "inputs"'), {},
     "'timeout' is inf; expected microseconds"),
    ("timeout -Infinity", _req().replace(b'"inputs"', b'"parameters": {"timeout": -Infinity}, "inputs"'), {}, "'timeout' is -inf"),
    ("timeout NaN", _req().replace(b'"inputs"', b'"parameters": {"timeout": NaN}, "inputs"'), {}, "'timeout' is nan"),
    ("timeout 1e300", _req(parameters={"timeout": 1e300}), {}, "'timeout' is 1e\\+300"),
    ("timeout a string", _req(parameters={"timeout": "5"}), {}, "'timeout' is a string"),
    ("id an object", _req(id={"a": [1]}), {}, "'id' is an object; expected a string"),
    ("integer of 5,000 digits", _req({"data": [int("9" * 4300)] + ONE[1:]}).replace(b"9" * 4300, b"9" * 5000), {},
     "malformed JSON.*digits"),
    ("not UTF-8", b'{"inputs": [{"name": "\xff\xfe"}]}', {}, "malformed JSON"),
    ("BYTES 2e8 elements in 113 bytes", *binary('{"inputs":[{"name":"input","datatype":"BYTES","shape":[200000000],'
                                                '"parameters":{"binary_data_size":4}}]}', 4),
     "claims 200000000 BYTES elements but binary_data_size is 4 bytes"),
    ("BYTES JSON count claim", _req({"datatype": "BYTES", "shape": [10**12], "data": ["a"]}), {},
     "'data' has 1 values but shape needs 1000000000000"),
    ("FP32 binary count claim", *binary('{"inputs":[{"name":"input","datatype":"FP32","shape":[100000000,1,28,28],'
                                        '"parameters":{"binary_data_size":4}}]}', 4),
     "binary_data_size is 4 bytes.*needs 313600000000"),
    ("header length not a number", _req(), {"Inference-Header-Content-Length": "1e9"}, "Inference-Header-Content-Length is '1e9'"),
    ("unsupported Content-Encoding", _req(), {"Content-Encoding": "br"}, "Content-Encoding 'br' is not supported"),
    ("gzip that is not gzip", b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"}, "not valid gzip data"),
    ("truncated gzip", gzip.compress(_req())[:-20], {"Content-Encoding": "gzip"}, "truncated or has trailing bytes"),
]


@pytest.mark.parametrize("what,body,headers,match", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_gets_4xx_naming_the_problem(server, still_serving, what, body, headers, match):
    status, resp = post(server, body, headers)
    assert 400 <= status < 500, (status, resp)
    assert status in (400, 413, 415), (status, resp)
    assert re.search(match, resp["error"]), resp["error"]
    still_serving()


def test_compressed_requests_are_served_like_plain_ones(server, mnist_images, runner_reference):
    # tritonclient sends gzip or deflate (zlib) bodies with request_compression_algorithm; both inflate.
    body, headers = encode_request({"input": mnist_images[:4]})
    want = runner_reference.infer({"input": mnist_images[:4]})["logits"]
    for enc, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", URL, body=data, headers={**headers, "Content-Encoding": enc})
        r = conn.getresponse()
        raw = r.read()
        assert r.status == 200, raw
        n = int(r.getheader("Inference-Header-Content-Length"))
        got = np.frombuffer(raw[n:], np.float32).reshape(4, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        conn.close()


def test_no_request_makes_the_server_allocate_far_more_than_its_body(server, still_serving):
    """The server's peak RSS (VmHWM) barely moves for requests built to amplify: a gzip bomb, BYTES and FP32
    count claims, a JSON body of many small empty lists. Before the fix a 113-byte request cost 1.5 GB."""
    pid = server.proc.pid
    bomb = gzip.compress(b" " * (60 << 20))  # ~60 KiB that inflates to 60 MiB (the session server allows 8 MiB)
    empties = _req({"shape": [200_000], "data": [[]] * 200_000})  # ~600 KB of '[],' -> Python lists
    before = vm_hwm_kib(pid)
    sizes = []
    for body, headers in [
        (bomb, {"Content-Encoding": "gzip"}),
        binary('{"inputs":[{"name":"input","datatype":"BYTES","shape":[2000000000],"parameters":{"binary_data_size":4}}]}', 4),
        (empties, {}),
    ]:
        status, resp = post(server, body, headers)
        assert status in (400, 413), resp
        sizes.append(len(body))
    grown_mib = (vm_hwm_kib(pid) - before) / 1024
    # Budget: 32x the largest body (the documented worst case, JSON objects / the inflate ratio) plus 16 MiB
    # of allocator slack; the unguarded decoder needed 15 GiB for the BYTES claim alone.
    budget_mib = 32 * max(sizes) / 2**20 + 16
    print(f"peak RSS grew {grown_mib:.1f} MiB for bodies of {sizes} bytes (budget {budget_mib:.1f} MiB)")
    assert grown_mib < budget_mib
    status, resp = post(server, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "inflates past" in resp["error"] and "--max-inflate-ratio" in resp["error"]
    still_serving()


def test_nan_and_inf_outputs_are_valid_json_strings_that_tritonclient_reads_back(server):
    """NaN in, NaN out (the network propagates it): the JSON reply is RFC 8259, the values are "NaN" strings,
    and tritonclient's own decoding (np.array(data, dtype)) turns them back into NaN."""
    x = np.full((1, 1, 28, 28), np.nan, np.float32)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": x.ravel().tolist()}]}).encode()  # Python writes NaN, which we accept
    status, resp = post(server, body)
    assert status == 200, resp
    data = resp["outputs"][0]["data"]
    assert data and set(data) <= {"NaN", "Infinity", "-Infinity"}
    assert np.isnan(np.array(data, dtype=np.float32)).any()
    from tritonclient.http import InferResult

    raw = json.dumps(resp).encode()
    r = InferResult.from_response_body(raw, header_length=None)
    assert np.isnan(r.as_numpy("logits")).all()


def test_json_encoder_refuses_to_write_nan():
    from resdeploy.serve.protocol import InferRequest, encode_infer_response

    req = InferRequest(None, {}, None)
    out = encode_infer_response("m", "1", req, {"y": np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)})
    assert strict_json(out.body)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
