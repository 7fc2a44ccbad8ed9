"""Every config `resdeploy repo` writes loads on real Triton and serves what ONNX Runtime computes, as on `resdeploy serve`.

One repository holds a model per variant (conftest.VARIANTS): defaults, no dynamic batching, max_batch_size 0,
queue policy, several instances, the TensorRT accelerator option, no warmup, and three version policies.
"""

from __future__ import annotations

import json
import numpy as np
import pytest

from triton_cases import SERVED, VARIANTS

http = pytest.importorskip("tritonclient.http")

MODELS = sorted(VARIANTS)


def _client(url: str):
    return http.InferenceServerClient(url, connection_timeout=30, network_timeout=120, concurrency=8)


@pytest.fixture(scope="module")
def clients(pair):
    cs = {"triton": _client(pair.triton.url), "resdeploy": _client(pair.resdeploy.url)}
    yield cs
    for c in cs.values():
        c.close()


def _infer(client, model, x, binary, class_count=0, version=""):
    inp = http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = http.InferRequestedOutput("logits", binary_data=binary, class_count=class_count)
    return client.infer(model, [inp], outputs=[out], model_version=version)


def _index(url_pair, which):
    status, body, _ = url_pair.both("POST", "/v2/repository/index", b"{}")[0 if which == "triton" else 1]
    assert status == 200
    return {(r["name"], r["version"]): r.get("state") for r in json.loads(body)}


def test_every_variant_loads_on_both_servers(pair):
    triton, resdeploy = _index(pair, "triton"), _index(pair, "resdeploy")
    assert triton == resdeploy, pair.triton.log()[-4000:]
    assert set(triton.values()) == {"READY"}
    expected = {(m, v) for m in MODELS for v in SERVED.get(m, ["1"])}
    assert set(triton) == expected
    (ts, _, _), (rs, _, _) = pair.both("GET", "/v2/health/ready")
    assert ts == rs == 200


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_onnxruntime_on_both(clients, model, binary, digits, ort_reference):
    x = digits[:1] if model == "mbs0" else digits  # max_batch_size 0: the model's own shape [-1,1,28,28]; fine at 8 too
    want = ort_reference(x)
    for name, c in clients.items():
        res = _infer(c, model, x, binary)
        got = res.as_numpy("logits")
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name} / {model}")
        assert res.get_response()["model_version"] == SERVED.get(model, ["1"])[-1]


def test_classification_agrees(clients, digits, ort_reference):
    want = ort_reference(digits)
    rows = {}
    for name, c in clients.items():
        out = _infer(c, "resnet20", digits, binary=False, class_count=3).as_numpy("logits")
        rows[name] = [[(s.decode() if isinstance(s, bytes) else s).split(":") for s in row] for row in out]
    for name, parsed in rows.items():
        for k, row in enumerate(parsed):
            assert [int(i) for _, i, _ in row] == list(np.argsort(-want[k])[:3]), name
            np.testing.assert_allclose([float(s) for s, _, _ in row], np.sort(want[k])[::-1][:3], rtol=1e-5, atol=1e-5)
    assert [[r[1:] for r in row] for row in rows["triton"]] == [[r[1:] for r in row] for row in rows["resdeploy"]]


@pytest.mark.parametrize("model", ["latest2", "all", "specific"])
def test_version_policies_serve_the_same_versions(pair, clients, model, digits, ort_reference):
    for name, c in clients.items():
        assert c.get_model_metadata(model)["versions"] == SERVED[model], name
    for v in ("1", "2", "3", "9"):
        (ts, _, _), (rs, _, _) = pair.both("GET", f"/v2/models/{model}/versions/{v}")
        assert ts == rs == (200 if v in SERVED[model] else 404), (model, v)
    for v in SERVED[model]:
        for c in clients.values():
            res = _infer(c, model, digits[:2], True, version=v)
            assert res.get_response()["model_version"] == v
            np.testing.assert_allclose(res.as_numpy("logits"), ort_reference(digits[:2]), rtol=1e-5, atol=1e-5)


def test_metadata_is_identical(pair):
    for model in MODELS:
        (ts, tb, _), (rs, rb, _) = pair.both("GET", f"/v2/models/{model}")
        assert ts == rs == 200
        assert json.loads(tb) == json.loads(rb), model


def _config(pair, model):
    (ts, tb, _), (rs, rb, _) = pair.both("GET", f"/v2/models/{model}/config")
    assert ts == rs == 200
    return json.loads(tb), json.loads(rb)


@pytest.mark.parametrize("model", MODELS)
def test_config_fields_resdeploy_writes_agree(pair, model):
    """What the generated config.pbtxt states reads back the same from both servers."""
    t, r = _config(pair, model)
    if not VARIANTS[model].get("preferred_batch_sizes") and "dynamic_batching" in t:
        # Triton fills preferred_batch_size [max_batch_size] when the config gives none; so does resdeploy
        assert t["dynamic_batching"]["preferred_batch_size"] == [t["max_batch_size"]]
    for key in ("name", "platform", "backend", "version_policy", "max_batch_size", "input", "output", "dynamic_batching",
                "model_warmup"):
        assert t.get(key) == r.get(key), f"{model}: {key}: triton {t.get(key)} / resdeploy {r.get(key)}"
    assert [(g["count"], g["kind"]) for g in t["instance_group"]] == [(g["count"], g["kind"]) for g in r["instance_group"]]
    if model == "queue":
        policy = t["dynamic_batching"]["default_queue_policy"]
        assert policy["max_queue_size"] == 16 and policy["default_timeout_microseconds"] == 10_000_000
        assert policy["timeout_action"] == "REJECT" and t["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    if model == "instances":
        assert t["instance_group"][0]["count"] == 2 and t["instance_group"][0]["kind"] == "KIND_CPU"
    if model == "trt_accelerator":
        acc = t["optimization"]["execution_accelerators"]["gpu_execution_accelerator"]
        assert acc[0]["name"] == "tensorrt" and acc[0]["parameters"]["precision_mode"] == "FP32"


def test_several_instances_under_concurrent_load(clients, digits, ort_reference):
    """16 concurrent requests on the two-instance model: every answer is the right one, on both servers."""
    want = ort_reference(digits)
    for name, c in clients.items():
        pending = []
        for k in range(16):  # tritonclient's own concurrency (gevent), 8 connections
            inp = http.InferInput("input", [1, 1, 28, 28], "FP32")
            inp.set_data_from_numpy(digits[k % 8:k % 8 + 1], binary_data=True)
            pending.append((k, c.async_infer("instances", [inp], outputs=[http.InferRequestedOutput("logits", binary_data=True)])))
        for k, p in pending:
            got = p.get_result(timeout=120).as_numpy("logits")
            np.testing.assert_allclose(got, want[k % 8:k % 8 + 1], rtol=1e-5, atol=1e-5, err_msg=name)


def _stats(pair, model):
    (ts, tb, _), (rs, rb, _) = pair.both("GET", f"/v2/models/{model}/stats")
    assert ts == rs == 200
    return json.loads(tb)["model_stats"][0], json.loads(rb)["model_stats"][0]


def test_success_counters_agree(pair, clients, digits):
    before = _stats(pair, "counted")
    for c in clients.values():
        _infer(c, "counted", digits[:3], True)
    after = _stats(pair, "counted")
    for b, a in zip(before, after):
        assert a["inference_stats"]["success"]["count"] - b["inference_stats"]["success"]["count"] == 1
        assert a["inference_count"] - b["inference_count"] == 3 and a["execution_count"] - b["execution_count"] == 1


@pytest.mark.parametrize("model", MODELS)
def test_whole_config_is_tritons(pair, model):
    """Every field of the auto-completed config reads the same from both servers, but the runtime: Triton names
    the harness's Python stand-in ("model.py"), resdeploy what real Triton's onnxruntime backend would."""
    t, r = _config(pair, model)
    assert t.pop("runtime") == "model.py" and r.pop("runtime") == "libtriton_onnxruntime.so"
    assert t == r


def test_failure_counters_skip_invalid_requests(pair):
    bad = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 27], "datatype": "FP32", "data": [0.0] * 756}]})
    before = _stats(pair, "counted")
    (ts, _, _), (rs, _, _) = pair.both("POST", "/v2/models/counted/infer", bad.encode())
    assert ts == rs == 400
    after = _stats(pair, "counted")
    t_fail, r_fail = (a["inference_stats"]["fail"]["count"] - b["inference_stats"]["fail"]["count"] for b, a in zip(before, after))
    assert t_fail == 0
    assert r_fail == t_fail
