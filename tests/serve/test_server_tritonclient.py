"""The real tritonclient.http client against `resdeploy serve` in a subprocess: it must work unchanged."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from resdeploy.serve.metrics import parse_prometheus

tritonclient_http = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def client(server):
    c = tritonclient_http.InferenceServerClient(server.url, connection_timeout=30, network_timeout=60)
    yield c
    c.close()


def _infer(client, model, x, binary, outputs=("logits",), class_count=0, request_id="", datatype="FP32"):
    inp = tritonclient_http.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = None if outputs is None else [tritonclient_http.InferRequestedOutput(o, binary_data=binary, class_count=class_count)
                                         for o in outputs]
    return client.infer(model, [inp], outputs=outs, request_id=request_id)


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "statistics", "model_configuration"} <= set(meta["extensions"])


def test_model_metadata(client):
    meta = client.get_model_metadata("resnet20")
    assert meta["name"] == "resnet20" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("resnet20", model_version="1")["name"] == "resnet20"
    assert client.get_model_metadata("resnet20_uint8")["inputs"][0]["datatype"] == "UINT8"


def test_model_config_has_what_perf_analyzer_reads(client):
    cfg = client.get_model_config("resnet20")
    assert cfg["name"] == "resnet20" and cfg["max_batch_size"] == 32
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg["input"][0]["name"] == "input" and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["input"][0]["dims"] == [1, 28, 28]  # numbers, not protobuf's int64 strings
    assert "dynamic_batching" in cfg and cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    assert "sequence_batching" not in cfg and "ensemble_scheduling" not in cfg
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU" and cfg["instance_group"][0]["count"] == 1
    assert cfg["output"][0]["label_filename"] == "labels.txt"
    assert "dynamic_batching" not in client.get_model_config("resnet20_nobatch")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_infer_equals_the_runner(client, runner_reference, mnist_images, binary):
    x = mnist_images[:5]
    res = _infer(client, "resnet20", x, binary, request_id=f"req-{binary}")
    got = res.as_numpy("logits")
    want = runner_reference.infer({"input": x})["logits"]
    assert got.shape == (5, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert res.get_response()["id"] == f"req-{binary}"
    out = res.get_output("logits")
    assert ("parameters" in out and "binary_data_size" in out["parameters"]) == binary


def test_default_outputs_come_back_binary(client, runner_reference, mnist_images):
    res = _infer(client, "resnet20", mnist_images[:1], True, outputs=None)
    np.testing.assert_allclose(res.as_numpy("logits"), runner_reference.infer({"input": mnist_images[:1]})["logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_infer_equals_the_runner(client, resnet20_uint8_onnx, mnist_raw, binary):
    from resdeploy.engines import open_runner

    x = np.round(mnist_raw[0][:3] * 255).astype(np.uint8)
    got = _infer(client, "resnet20_uint8", x, binary, datatype="UINT8").as_numpy("logits")
    with open_runner(str(resnet20_uint8_onnx), backend="onnxruntime", provider="cpu", threads=1) as r:
        want = r.infer({"input": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == mnist_raw[1][:3]).sum() >= 2  # raw pixels in, right digits out


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_returns_labels(client, runner_reference, mnist_images, mnist_raw, binary):
    x = mnist_images[:8]
    got = _infer(client, "resnet20", x, binary, class_count=3).as_numpy("logits")
    assert got.shape == (8, 3)
    logits = runner_reference.infer({"input": x})["logits"]
    for row, lg in zip(got, logits):
        fields = [(c.decode() if isinstance(c, bytes) else c).split(":") for c in row]
        idx = [int(f[1]) for f in fields]
        assert idx == list(np.argsort(-lg)[:3])
        assert [f[2] for f in fields] == [str(i) for i in idx]  # labels "0".."9" from the ONNX metadata / labels.txt
        assert float(fields[0][0]) == pytest.approx(float(lg[idx[0]]), rel=1e-5, abs=1e-5)
    # the model is right on real digits: top-1 labels match the test labels for most of them
    top1 = [int((r[0].decode() if isinstance(r[0], bytes) else r[0]).split(":")[2]) for r in got]
    assert sum(int(a == b) for a, b in zip(top1, mnist_raw[1][:8])) >= 7


def test_statistics_and_metrics(client, server, mnist_images):
    _infer(client, "resnet20", mnist_images[:2], True)
    stats = client.get_inference_statistics("resnet20")["model_stats"][0]
    assert stats["name"] == "resnet20" and stats["version"] == "1"
    assert stats["inference_count"] >= 2 and stats["execution_count"] >= 1
    inf = stats["inference_stats"]
    assert inf["success"]["count"] >= 1 and inf["success"]["ns"] > 0 and inf["compute_infer"]["ns"] > 0
    assert {b["batch_size"] for b in stats["batch_stats"]} >= {2}
    everything = client.get_inference_statistics()["model_stats"]
    # Like Triton, the all-models form lists the available versions only (not the model that failed to load).
    assert {s["name"] for s in everything} >= {"resnet20", "resnet20_nobatch"} and "broken" not in {s["name"] for s in everything}
    status, body = server.get("/metrics")
    assert status == 200
    m = parse_prometheus(body.decode())
    key = frozenset({("model", "resnet20"), ("version", "1")})
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert (name, key) in m, name
    assert m[("nv_inference_request_success", key)] >= 1 and m[("nv_inference_compute_infer_duration_us", key)] > 0
    assert ("nv_inference_request_failure", frozenset({("model", "resnet20"), ("version", "1"), ("reason", "REJECTED")})) in m


def test_broken_model_is_reported_and_others_keep_serving(client, server, mnist_images):
    assert not client.is_model_ready("broken")
    assert client.is_model_ready("resnet20")
    status, body = server.get("/v2/models/broken/ready")
    # The server reads the graph itself first (external-data check), so its parser names the broken file.
    assert status == 400 and re.search(r"could not load.*broken/1/model.onnx", json.loads(body)["error"])  # Triton: 400
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE" and index["resnet20"]["state"] == "READY"
    assert "failed to load" in server.log()
    assert _infer(client, "resnet20", mnist_images[:1], True).as_numpy("logits").shape == (1, 10)
