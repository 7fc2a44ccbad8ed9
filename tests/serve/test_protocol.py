"""Request parsing / response encoding of the v2 protocol, checked against tritonclient's own encoder and decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resdeploy.serve.loadgen import encode_request
from resdeploy.serve.protocol import (BadRequest, IOSpec, InferRequest, RequestedOutput, check_inputs, check_outputs,
                                      classify, encode_infer_response, parse_header_length, parse_infer_request)

SPEC = [IOSpec("input", "FP32", (-1, 1, 4, 4))]


def _tritonclient_body(x: np.ndarray, datatype: str, binary: bool, outputs=None, request_id=""):
    """The exact bytes tritonclient.http would send for one input."""
    import tritonclient.http as th
    from tritonclient.http._utils import _get_inference_request

    i = th.InferInput("input", list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    body, json_size = _get_inference_request([i], request_id, outputs, 0, False, False, 0, None, None)
    return body, json_size


@pytest.mark.parametrize("datatype,dtype", [("FP32", np.float32), ("FP16", np.float16), ("UINT8", np.uint8),
                                            ("INT8", np.int8), ("INT64", np.int64)])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_parse_to_the_same_array(datatype, dtype, binary):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 1, 4, 4)) * 50).astype(dtype)
    body, json_size = _tritonclient_body(x, datatype, binary, request_id="r-7")
    req = parse_infer_request(body, json_size)
    assert req.id == "r-7"
    got = req.inputs["input"]
    assert got.dtype == np.dtype(dtype) and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert req.outputs is None and req.binary_data_output is True  # tritonclient's default when it names no outputs


def test_bytes_tensor_binary_and_json():
    x = np.array([b"ab", b"", "żółw".encode()], dtype=np.object_)
    for binary in (True, False):
        body, n = _tritonclient_body(x, "BYTES", binary)
        got = parse_infer_request(body, n).inputs["input"]
        assert list(got) == list(x)


def test_nested_and_flat_json_data_are_the_same():
    flat = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [1, 2, 3, 4]}]}
    nested = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [[[[1, 2], [3, 4]]]]}]}
    a = parse_infer_request(json.dumps(flat).encode(), None).inputs["input"]
    b = parse_infer_request(json.dumps(nested).encode(), None).inputs["input"]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (1, 1, 2, 2)


def _bad(body: bytes, header_length=None, match: str = ""):
    with pytest.raises(BadRequest, match=match) as e:
        parse_infer_request(body, header_length)
    assert e.value.status == 400
    return str(e.value)


def test_malformed_requests_name_the_problem():
    _bad(b"{not json", match="malformed JSON")
    _bad(b"[1, 2]", match="expected an object")
    _bad(b'{"inputs": []}', match="no 'inputs'")
    t = {"name": "input", "datatype": "FP32", "shape": [1, 3]}
    _bad(json.dumps({"inputs": [{**t, "data": [1, 2]}]}).encode(), match="'input': 'data' has 2 values but shape needs 3")
    _bad(json.dumps({"inputs": [{**t, "datatype": "FP128", "data": [1, 2, 3]}]}).encode(), match="datatype 'FP128' unknown")
    _bad(json.dumps({"inputs": [{**t, "shape": [1, -3], "data": [1]}]}).encode(), match="non-negative")
    _bad(json.dumps({"inputs": [{**t, "data": [[1, 2], [3]]}]}).encode(), match="ragged")
    _bad(json.dumps({"inputs": [{**t, "data": [1, "x", 3]}]}).encode(), match="non-numeric")
    _bad(json.dumps({"inputs": [{**t, "datatype": "UINT8", "data": [1, 300, 3]}]}).encode(), match="do not fit UINT8")
    _bad(json.dumps({"inputs": [{**t, "datatype": "INT64", "data": [1, 2.5, 3]}]}).encode(), match="non-integer")
    _bad(json.dumps({"inputs": [t]}).encode(), match="neither 'data' nor")


def test_binary_size_errors():
    x = np.ones((1, 3), np.float32)
    body, headers = encode_request({"input": x})
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    # declared size disagrees with the shape
    header["inputs"][0]["parameters"]["binary_data_size"] = 8
    h = json.dumps(header).encode()
    msg = _bad(h + x.tobytes()[:8], len(h), match="binary_data_size is 8 bytes")
    assert "needs 12" in msg
    # runs past the end of the body
    header["inputs"][0]["parameters"]["binary_data_size"] = 16
    h = json.dumps(header).encode()
    _bad(h + x.tobytes(), len(h), match="runs past the end")
    # extra bytes after the declared tensors
    _bad(body + b"\0\0\0\0", n, match="bytes after the binary tensors")
    # binary_data_size without the header-length header
    _bad(body[:n], None, match="no Inference-Header-Content-Length")


def test_header_length_header():
    assert parse_header_length(None, 10) is None
    assert parse_header_length("4", 10) == 4
    for bad in ("x", "-1", "11"):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
            parse_header_length(bad, 10)


def test_check_inputs_names_tensor_and_expectation():
    def req(x, name="input"):
        return InferRequest(None, {name: x}, None)

    assert check_inputs(req(np.zeros((3, 1, 4, 4), np.float32)), SPEC, "m", 8) == 3
    with pytest.raises(BadRequest, match=r"input 'input' has datatype FP16; expected FP32"):
        check_inputs(req(np.zeros((1, 1, 4, 4), np.float16)), SPEC, "m", 8)
    with pytest.raises(BadRequest, match=r"input 'input' has shape \[1, 1, 5, 4\]; expected input: FP32\[\?,1,4,4\]"):
        check_inputs(req(np.zeros((1, 1, 5, 4), np.float32)), SPEC, "m", 8)
    with pytest.raises(BadRequest, match=r"batch 9; expected 1..8"):
        check_inputs(req(np.zeros((9, 1, 4, 4), np.float32)), SPEC, "m", 8)
    with pytest.raises(BadRequest, match=r"unknown inputs \['x'\]; missing inputs \['input'\]"):
        check_inputs(req(np.zeros((1, 1, 4, 4), np.float32), "x"), SPEC, "m", 8)
    with pytest.raises(BadRequest, match="requested output 'nope' unknown"):
        check_outputs(InferRequest(None, {}, [RequestedOutput("nope", True)]), ["logits"], "m")


def test_binary_response_decodes_with_tritonclient():
    from tritonclient.http import InferResult

    y = np.arange(20, dtype=np.float32).reshape(2, 10)
    req = InferRequest("abc", {}, [RequestedOutput("logits", True)])
    enc = encode_infer_response("m", "1", req, {"logits": y})
    assert enc.header_length is not None
    r = InferResult.from_response_body(enc.body, header_length=enc.header_length)
    np.testing.assert_array_equal(r.as_numpy("logits"), y)
    assert r.get_response()["id"] == "abc" and r.get_response()["model_version"] == "1"


def test_json_response_and_fp16_uint8_outputs():
    from tritonclient.http import InferResult

    outs = {"a": np.array([[1.5, 2.5]], np.float16), "b": np.array([[7, 255]], np.uint8)}
    enc = encode_infer_response("m", "1", InferRequest(None, {}, None, binary_data_output=False), outs)
    assert enc.header_length is None
    r = InferResult.from_response_body(enc.body)
    np.testing.assert_array_equal(r.as_numpy("a"), outs["a"])
    np.testing.assert_array_equal(r.as_numpy("b"), outs["b"])
    assert r.get_output("b")["datatype"] == "UINT8"


def test_only_requested_outputs_are_returned():
    outs = {"a": np.zeros((1, 2), np.float32), "b": np.ones((1, 3), np.float32)}
    enc = encode_infer_response("m", "1", InferRequest(None, {}, [RequestedOutput("b", False)]), outs)
    body = json.loads(enc.body)
    assert [o["name"] for o in body["outputs"]] == ["b"] and body["outputs"][0]["data"] == [1.0, 1.0, 1.0]


def test_classification_top_k_with_labels():
    from tritonclient.http import InferResult

    logits = np.array([[0.1, 3.0, 2.0], [5.0, -1.0, 0.0]], np.float32)
    labels = {"logits": ["cat", "dog", "eel"]}
    for binary in (True, False):
        req = InferRequest(None, {}, [RequestedOutput("logits", binary, class_count=2)])
        enc = encode_infer_response("m", "1", req, {"logits": logits}, labels)
        r = InferResult.from_response_body(enc.body, header_length=enc.header_length)
        got = r.as_numpy("logits")
        assert got.shape == (2, 2) and r.get_output("logits")["datatype"] == "BYTES"
        rows = [[(x.decode() if isinstance(x, bytes) else x) for x in row] for row in got]
        assert rows == [["3.000000:1:dog", "2.000000:2:eel"], ["5.000000:0:cat", "0.000000:2:eel"]]
    # k larger than the class count is clamped; without labels there is no third field
    assert list(classify(np.array([1.0, 2.0], np.float32), 5, None, batched=False)) == [b"2.000000:1", b"1.000000:0"]
