"""gRPC against real Triton's gRPC port, and explicit model control (load/unload) over HTTP and gRPC.

The same tritonclient.grpc calls go to both servers; the status codes (and, where the answer is data, the data)
must match. The one exception, as for HTTP: where Triton answers INTERNAL for a client's mistake (loading a model
the repository does not have), resdeploy answers INVALID_ARGUMENT (``TRITON_INTERNAL``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")

X = np.zeros((1, 1, 28, 28), np.float32)
TRITON_INTERNAL = "triton-internal"  # Triton INTERNAL for a client's mistake, resdeploy INVALID_ARGUMENT: allowed


def _infer(model, x=X, version="", name="input", datatype="FP32", outputs=None, **kw):
    def call(c):
        inp = grpcclient.InferInput(name, list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        out = [grpcclient.InferRequestedOutput(n, class_count=k) for n, k in outputs] if outputs else None
        return c.infer(model, [inp], model_version=version, outputs=out, **kw).as_numpy(outputs[0][0] if outputs else "logits")
    return call


CALLS = {
    "live": lambda c: c.is_server_live(),
    "ready": lambda c: c.is_server_ready(),
    "model-ready": lambda c: c.is_model_ready("resnet20"),
    "model-ready-unknown": lambda c: c.is_model_ready("nope"),
    "model-ready-unknown-version": lambda c: c.is_model_ready("resnet20", "9"),
    "model-ready-policy-excluded": lambda c: c.is_model_ready("specific", "2"),
    "metadata": lambda c: c.get_model_metadata("resnet20", as_json=True),
    "metadata-versions": lambda c: c.get_model_metadata("latest2", as_json=True),
    "metadata-unknown": lambda c: c.get_model_metadata("nope"),
    "metadata-unknown-version": lambda c: c.get_model_metadata("resnet20", "9"),
    "config-unknown": lambda c: c.get_model_config("nope"),
    "stats-unknown": lambda c: c.get_inference_statistics("nope"),
    "stats-unknown-version": lambda c: c.get_inference_statistics("resnet20", "9"),
    "index": lambda c: c.get_model_repository_index(as_json=True),
    "load": lambda c: c.load_model("resnet20"),  # model control mode none: UNAVAILABLE
    "unload": lambda c: c.unload_model("resnet20"),
    "infer": _infer("resnet20"),
    "infer-mbs0": _infer("mbs0"),
    "infer-version": _infer("latest2", version="2"),
    "infer-classification": _infer("resnet20", outputs=[("logits", 3)]),
    "infer-unknown-model": _infer("nope"),
    "infer-unknown-version": _infer("resnet20", version="9"),
    "infer-policy-excluded": _infer("specific", version="2"),
    "infer-wrong-shape": _infer("resnet20", np.zeros((1, 1, 28, 27), np.float32)),
    "infer-wrong-datatype": _infer("resnet20", np.zeros((1, 1, 28, 28), np.int32), datatype="INT32"),
    "infer-unknown-input": _infer("resnet20", name="x"),
    "infer-batch-over-max": _infer("resnet20", np.zeros((33, 1, 28, 28), np.float32)),
    "infer-unknown-output": _infer("resnet20", outputs=[("nope", 0)]),
}


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_grpc_same_answer(pair, call):
    (ts, tv), (rs, rv) = pair.grpc_both(call)
    assert ts == rs, f"triton {ts} {str(tv)[:300]} / resdeploy {rs} {str(rv)[:300]}"
    if ts != "OK":
        assert isinstance(rv, str) and rv
    elif isinstance(tv, np.ndarray):
        if tv.dtype == np.object_:  # classification: the same classes in the same order
            assert [s.split(b":")[1:] for s in tv.ravel()] == [s.split(b":")[1:] for s in rv.ravel()]
        else:
            np.testing.assert_allclose(tv, rv, rtol=1e-5, atol=1e-5)
    elif isinstance(tv, dict) and "models" in tv:  # the repository index: the same models, versions and states
        assert tv == rv
    elif isinstance(tv, dict):
        assert tv == rv
    else:
        assert tv == rv


def test_grpc_config_is_the_http_config(pair):
    (ts, t), (rs, r) = pair.grpc_both(lambda c: c.get_model_config("queue", as_json=True)["config"])
    assert ts == rs == "OK"
    assert t.pop("runtime") == "model.py" and r.pop("runtime") == "libtriton_onnxruntime.so"  # the stand-in, as for HTTP
    assert t == r


def test_grpc_statistics_agree(pair):
    def counts(c):
        s = c.get_inference_statistics("counted", "1", as_json=True)["model_stats"][0]
        return int(s["inference_stats"]["success"].get("count", 0)), int(s["inference_stats"]["fail"].get("count", 0))

    (_, tb), (_, rb) = pair.grpc_both(counts)
    pair.grpc_both(_infer("counted", np.zeros((2, 1, 28, 28), np.float32)))
    pair.grpc_both(_infer("counted", np.zeros((1, 1, 28, 27), np.float32)))  # refused by validation: not a failure
    (_, ta), (_, ra) = pair.grpc_both(counts)
    assert (ta[0] - tb[0], ta[1] - tb[1]) == (ra[0] - rb[0], ra[1] - rb[1]) == (1, 0)


# -- explicit model control --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explicit_pair(start_pair, conformance_repo):
    return start_pair(conformance_repo, triton_kwargs={"model_control_mode": "explicit", "load_models": ["resnet20"]},
                      resdeploy_args=("--model-control-mode", "explicit", "--load-model", "resnet20"))


def _settled_index(server_request):
    """The repository index once no model is UNLOADING (Triton unloads in the background)."""
    deadline = time.monotonic() + 30
    while True:
        status, body = server_request()
        rows = json.loads(body)
        if not any(r.get("state") == "UNLOADING" for r in rows) or time.monotonic() > deadline:
            return status, rows
        time.sleep(0.1)


def _index_pair(p):
    t = _settled_index(lambda: p.triton.request("POST", "/v2/repository/index", b"{}"))
    r = _settled_index(lambda: p.both("POST", "/v2/repository/index", b"{}")[1][:2])
    return t, r


def test_explicit_mode_load_and_unload_over_http(explicit_pair):
    p = explicit_pair
    t, r = _index_pair(p)
    assert t == r and {"name": "nobatch"} in t[1], (t, r)  # only --load-model's model is loaded
    steps = [("GET", "/v2/health/ready", None), ("GET", "/v2/models/nobatch/ready", None),
             ("GET", "/v2/models/nobatch", None), ("POST", "/v2/repository/models/nobatch/load", b""),
             ("GET", "/v2/models/nobatch/ready", None),
             ("POST", "/v2/models/nobatch/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                                                           "datatype": "FP32", "data": [0.0] * 784}]}).encode()),
             ("POST", "/v2/repository/models/nobatch/load", b"{}"),  # a reload
             ("POST", "/v2/repository/models/nope/unload", b""),  # unloading what is not loaded succeeds
             ("POST", "/v2/repository/models/nobatch/unload", b"{}")]
    for method, path, body in steps:
        (ts, tb, _), (rs, rb, _) = p.both(method, path, body)
        assert ts == rs, f"{method} {path}: triton {ts} {tb[:200]!r} / resdeploy {rs} {rb[:200]!r}"
    t, r = _index_pair(p)
    assert t[0] == r[0] == 200
    tn, rn = ([x for x in rows if x["name"] == "nobatch"] for rows in (t[1], r[1]))
    assert [(x["version"], x["state"]) for x in tn] == [(x["version"], x["state"]) for x in rn] == [("1", "UNAVAILABLE")]
    for path in ("/v2/models/nobatch", "/v2/models/nobatch/ready", "/v2/models/nobatch/stats", "/v2/models/nobatch/config"):
        (ts, tb, _), (rs, rb, _) = p.both("GET", path)
        assert ts == rs, f"{path}: triton {ts} {tb[:200]!r} / resdeploy {rs} {rb[:200]!r}"
    (ts, tb, _), (rs, rb, _) = p.both("POST", "/v2/repository/index", b'{"ready": true}')
    assert json.loads(tb) == json.loads(rb) == [{"name": "resnet20", "version": "1", "state": "READY"}]


def test_explicit_mode_load_with_a_config_parameter(explicit_pair):
    cfg = json.dumps({"max_batch_size": 4, "instance_group": [{"kind": "KIND_CPU", "count": 1}],
                      "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}],
                      "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]})
    body = json.dumps({"parameters": {"config": cfg}}).encode()
    (ts, tb, _), (rs, rb, _) = explicit_pair.both("POST", "/v2/repository/models/mbs0/load", body)
    assert ts == rs == 200, (tb, rb)
    (_, tb, _), (_, rb, _) = explicit_pair.both("GET", "/v2/models/mbs0/config")
    t, r = json.loads(tb), json.loads(rb)
    assert t.pop("runtime") == "model.py" and r.pop("runtime") == "libtriton_onnxruntime.so"
    assert t == r and t["max_batch_size"] == 4
    explicit_pair.both("POST", "/v2/repository/models/mbs0/unload", b"")


def test_explicit_mode_refusals(explicit_pair):
    # Loading what the repository does not have, or a body that is not JSON: Triton 500 (its own rule: a bug), 400 here.
    for path, body in (("/v2/repository/models/nope/load", b""), ("/v2/repository/models/nobatch/load", b"{bad")):
        (ts, tb, _), (rs, rb, _) = explicit_pair.both("POST", path, body)
        assert (ts, rs) == (500, 400), (path, tb, rb)


def test_explicit_mode_over_grpc(explicit_pair):
    p = explicit_pair
    for call, code in ((lambda c: c.load_model("instances"), "OK"), (_infer("instances"), "OK"),
                       (lambda c: c.is_model_ready("instances"), "OK"),
                       (lambda c: c.unload_model("instances"), "OK"), (lambda c: c.unload_model("nope"), "OK"),
                       (lambda c: c.is_model_ready("instances"), "OK"),
                       (lambda c: c.get_model_metadata("all"), "NOT_FOUND"),
                       (lambda c: c.load_model("nope"), TRITON_INTERNAL)):
        (ts, tv), (rs, rv) = p.grpc_both(call)
        if code == TRITON_INTERNAL:
            assert (ts, rs) == ("INTERNAL", "INVALID_ARGUMENT"), (tv, rv)
        else:
            assert ts == rs == code, (ts, tv, rs, rv)
    time.sleep(0.5)  # Triton unloads in the background
    (ts, tv), (rs, rv) = p.grpc_both(lambda c: c.is_model_ready("instances"))
    assert tv is rv is False
