"""The same HTTP requests to real Triton and to `resdeploy serve` on the same repository: the statuses must match.

Each row is (id, method, path, body, headers). Exceptions, each with its reason:

* ``TRITON_500``: Triton answers 500 for some malformed input (it treats those as its own bugs, since they are
  the client's fault); resdeploy answers 400. The row checks exactly that pair.
* Nothing else: the differences issue 11 listed (statistics and readiness statuses, raw binary requests,
  load/unload) are closed, and their rows compare plainly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

X = np.zeros((1, 1, 28, 28), np.float32)
GOOD = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def binary(header: dict, raw: bytes, hlen: str | None = None) -> tuple[bytes, dict]:
    h = js(header)
    return h + raw, {"Inference-Header-Content-Length": hlen if hlen is not None else str(len(h)),
                     "Content-Type": "application/octet-stream"}


def infer(body: dict) -> tuple[bytes, None]:
    return js(body), None


BIN_GOOD = binary({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                               "parameters": {"binary_data_size": 3136}}],
                   "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, X.tobytes())
BIN_SHORT = binary({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                "parameters": {"binary_data_size": 3000}}]}, X.tobytes())

TRITON_500 = "triton-500"  # Triton 500 for bad input (a Triton bug by its own rules), resdeploy 400: allowed


def row(id, method, path, body=None, headers=None, exception=None):
    assert exception in (None, TRITON_500), "the only exception allowed is Triton's 500 for bad input"
    return pytest.param(method, path, body, headers, exception == TRITON_500, id=id)


M = "/v2/models/resnet20"
ROWS = [
    # health and server
    row("live", "GET", "/v2/health/live"),
    row("ready", "GET", "/v2/health/ready"),
    row("server-metadata", "GET", "/v2"),
    row("unknown-route", "GET", "/v2/nothing"),
    row("wrong-method-infer", "GET", f"{M}/infer"),
    row("wrong-method-live", "DELETE", "/v2/health/live"),
    row("put-infer", "PUT", f"{M}/infer", js({"inputs": [GOOD]})),
    # model metadata, readiness, config
    row("metadata", "GET", M),
    row("metadata-version", "GET", f"{M}/versions/1"),
    row("metadata-unknown-version", "GET", f"{M}/versions/9"),
    row("metadata-unknown-model", "GET", "/v2/models/nope"),
    row("model-ready", "GET", f"{M}/ready"),
    row("model-ready-version", "GET", f"{M}/versions/1/ready"),
    row("model-ready-unknown-version", "GET", f"{M}/versions/9/ready"),
    row("model-ready-unknown-model", "GET", "/v2/models/nope/ready"),
    row("model-ready-policy-excluded", "GET", "/v2/models/specific/versions/2/ready"),
    row("config", "GET", f"{M}/config"),
    row("config-version", "GET", f"{M}/versions/1/config"),
    row("config-unknown-model", "GET", "/v2/models/nope/config"),
    row("config-unknown-version", "GET", f"{M}/versions/9/config"),
    # statistics
    row("stats-all", "GET", "/v2/models/stats"),
    row("stats-model", "GET", f"{M}/stats"),
    row("stats-version", "GET", f"{M}/versions/1/stats"),
    row("stats-unknown-model", "GET", "/v2/models/nope/stats"),
    row("stats-unknown-version", "GET", f"{M}/versions/9/stats"),
    row("stats-policy-excluded", "GET", "/v2/models/specific/versions/2/stats"),
    # repository
    row("index", "POST", "/v2/repository/index", b"{}"),
    row("index-empty-body", "POST", "/v2/repository/index", b""),
    row("index-ready-only", "POST", "/v2/repository/index", js({"ready": True})),
    row("load", "POST", "/v2/repository/models/resnet20/load", b"{}"),  # model control mode none: 503
    row("unload", "POST", "/v2/repository/models/resnet20/unload", b"{}"),
    row("load-unknown", "POST", "/v2/repository/models/nope/load", b"{}"),
    # inference that works
    row("infer-json", "POST", f"{M}/infer", js({"inputs": [GOOD]})),
    row("infer-json-nested-data", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "data": [[[[0.0] * 28] * 28]]}]})),
    row("infer-binary", "POST", f"{M}/infer", *BIN_GOOD),
    row("infer-binary-output-param", "POST", f"{M}/infer", js({"inputs": [GOOD], "parameters": {"binary_data_output": True}})),
    row("infer-classification", "POST", f"{M}/infer",
        js({"inputs": [GOOD], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]})),
    row("infer-request-id", "POST", f"{M}/infer", js({"id": "abc", "inputs": [GOOD]})),
    row("infer-version", "POST", f"{M}/versions/1/infer", js({"inputs": [GOOD]})),
    row("infer-no-batching-model", "POST", "/v2/models/nobatch/infer", js({"inputs": [GOOD]})),
    row("infer-raw-binary", "POST", f"{M}/infer", X.tobytes(), {"Inference-Header-Content-Length": "0"}),
    row("infer-raw-binary-mbs0", "POST", "/v2/models/mbs0/infer", X.tobytes(), {"Inference-Header-Content-Length": "0"}),
    row("infer-raw-binary-short", "POST", f"{M}/infer", X.tobytes()[:100], {"Inference-Header-Content-Length": "0"}),
    row("infer-raw-binary-empty", "POST", f"{M}/infer", b"", {"Inference-Header-Content-Length": "0"}),
    # bad requests
    row("unknown-model", "POST", "/v2/models/nope/infer", js({"inputs": [GOOD]})),
    row("unknown-version", "POST", f"{M}/versions/9/infer", js({"inputs": [GOOD]})),
    row("policy-excluded-version", "POST", "/v2/models/specific/versions/2/infer", js({"inputs": [GOOD]})),
    row("empty-body", "POST", f"{M}/infer", b""),
    row("not-json", "POST", f"{M}/infer", b"{not json", exception=TRITON_500),
    row("no-inputs-key", "POST", f"{M}/infer", js({"outputs": []}), exception=TRITON_500),
    row("unknown-input", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "name": "x"}]})),
    row("input-twice", "POST", f"{M}/infer", js({"inputs": [GOOD, GOOD]})),
    row("wrong-datatype", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "datatype": "INT32", "data": [0] * 784}]})),
    row("unknown-datatype", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "datatype": "FOO"}]})),
    row("wrong-shape", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "shape": [1, 1, 28, 27], "data": [0.0] * 756}]})),
    row("data-count", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "data": [0.0] * 10}]}), exception=TRITON_500),
    row("data-strings", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "data": ["a"] * 784}]}), exception=TRITON_500),
    row("batch-over-max", "POST", f"{M}/infer", js({"inputs": [{**GOOD, "shape": [33, 1, 28, 28], "data": [0.0] * 784 * 33}]})),
    row("unknown-output", "POST", f"{M}/infer", js({"inputs": [GOOD], "outputs": [{"name": "nope"}]})),
    row("negative-classification", "POST", f"{M}/infer",
        js({"inputs": [GOOD], "outputs": [{"name": "logits", "parameters": {"classification": -1}}]}), exception=TRITON_500),
    row("binary-size-mismatch", "POST", f"{M}/infer", *BIN_SHORT),
    row("header-length-over-body", "POST", f"{M}/infer", *binary({"inputs": [GOOD]}, b"", hlen="99999")),
    row("header-length-not-a-number", "POST", f"{M}/infer", *binary({"inputs": [GOOD]}, b"", hlen="abc")),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "triton_500"), ROWS)
def test_same_status(pair, method, path, body, headers, triton_500):
    (ts, tb, _), (rs, rb, _) = pair.both(method, path, body, headers)
    detail = f"{method} {path}: triton {ts} {tb[:200]!r} / resdeploy {rs} {rb[:200]!r}"
    if triton_500:
        assert (ts, rs) == (500, 400), detail
    else:
        assert ts == rs, detail
    if rs >= 400:  # every resdeploy error is Triton's JSON form, with a message
        assert isinstance(json.loads(rb).get("error"), str) and json.loads(rb)["error"], detail


def test_infer_bodies_agree(pair):
    """JSON, binary and raw binary answers carry the same outputs (names, datatypes, shapes, values)."""
    raw = (X.tobytes(), {"Inference-Header-Content-Length": "0"})
    for body, headers in (infer({"inputs": [GOOD]}), BIN_GOOD, raw):
        (ts, tb, th), (rs, rb, rh) = pair.both("POST", f"{M}/infer", body, headers)
        assert ts == rs == 200
        if headers:
            tl, rl = int(th["Inference-Header-Content-Length"]), int(rh["Inference-Header-Content-Length"])
            tj, rj = json.loads(tb[:tl]), json.loads(rb[:rl])
            assert tb[tl:] == rb[rl:] or np.allclose(np.frombuffer(tb[tl:], np.float32), np.frombuffer(rb[rl:], np.float32),
                                                     atol=1e-5)
        else:
            tj, rj = json.loads(tb), json.loads(rb)
            np.testing.assert_allclose(tj["outputs"][0].pop("data"), rj["outputs"][0].pop("data"), rtol=1e-5, atol=1e-5)
        assert tj == rj
