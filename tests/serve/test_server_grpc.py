"""tritonclient.grpc, unchanged, against `resdeploy serve`'s gRPC port: every endpoint and its errors as status codes.

The session server (tests/serve/conftest.py) serves gRPC on a free port (--grpc-port 0, read from its log) with
the same models, batchers, statistics and limits as HTTP (body limit 8 MiB = the gRPC message limit).
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    import grpc

    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 64 << 20)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _infer(client, model, x, outputs=None, **kw):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32" if x.dtype == np.float32 else "INT32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=outputs, **kw)


def _code(fn) -> tuple[str, str]:
    try:
        fn()
    except InferenceServerException as exc:
        return exc.status(), exc.message()
    return "OK", ""


def _stub_code(fn) -> tuple[str, str]:
    import grpc

    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet20") and client.is_model_ready("resnet20", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("resnet20", "9")
    assert not client.is_model_ready("broken")  # failed to load: not ready, as on Triton (no error)
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "resdeploy" and "model_repository" in md["extensions"]
    mm = client.get_model_metadata("resnet20", as_json=True)
    assert mm["versions"] == ["1"] and mm["platform"] == "onnxruntime_onnx"
    assert mm["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    status, msg = _code(lambda: client.get_model_metadata("nope"))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in msg
    status, msg = _code(lambda: client.get_model_metadata("resnet20", "9"))
    assert status == "StatusCode.NOT_FOUND"
    status, msg = _code(lambda: client.get_model_metadata("broken"))  # failed to load: unknown, with the reason
    assert status == "StatusCode.NOT_FOUND" and "no available versions" in msg and "could not load" in msg


def test_config_is_the_http_config(client, server):
    cfg = client.get_model_config("resnet20", as_json=True)["config"]
    http_cfg = json.loads(server.get("/v2/models/resnet20/config")[1])
    assert cfg["name"] == http_cfg["name"] == "resnet20" and int(cfg["max_batch_size"]) == http_cfg["max_batch_size"]
    assert cfg["version_policy"] == http_cfg["version_policy"] == {"latest": {"num_versions": 1}}
    assert cfg["default_model_filename"] == "model.onnx" and cfg["instance_group"][0]["name"] == "resnet20_0"
    assert _code(lambda: client.get_model_config("nope"))[0] == "StatusCode.NOT_FOUND"
    assert _code(lambda: client.get_model_config("broken"))[0] == "StatusCode.NOT_FOUND"


def test_infer_raw_contents_match_the_runner(client, mnist_images, runner_reference):
    x = mnist_images[:3]
    res = _infer(client, "resnet20", x, request_id="r-1")
    np.testing.assert_allclose(res.as_numpy("logits"), runner_reference.infer({"input": x})["logits"], rtol=1e-5, atol=1e-5)
    resp = res.get_response()
    assert resp.model_name == "resnet20" and resp.model_version == "1" and resp.id == "r-1"
    # classification, top 3 as BYTES "value:index:label"
    out = _infer(client, "resnet20", x[:1], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    top = [s.decode().split(":") for s in out.as_numpy("logits")[0]]
    want = runner_reference.infer({"input": x[:1]})["logits"][0]
    assert [int(i) for _, i, *_ in top] == list(np.argsort(-want)[:3])
    # no dynamic batching, and a version given
    res = _infer(client, "resnet20_nobatch", x[:1], model_version="1")  # batch 1: test_server_load counts its batches
    assert res.as_numpy("logits").shape == (1, 10)


def test_infer_typed_contents_and_uint8(stub, mnist_images, mnist_raw, runner_reference):
    x = mnist_images[:2]
    req = service_pb2.ModelInferRequest(model_name="resnet20")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, runner_reference.infer({"input": x})["logits"], rtol=1e-5, atol=1e-5)
    u8 = np.round(mnist_raw[0][:1] * 255).astype(np.uint8)
    req = service_pb2.ModelInferRequest(model_name="resnet20_uint8")
    req.inputs.add(name="input", datatype="UINT8", shape=list(u8.shape)).contents.uint_contents.extend(u8.ravel().tolist())
    assert stub.ModelInfer(req).outputs[0].shape == [1, 10]
    req.inputs[0].contents.uint_contents[0] = 300  # does not fit UINT8
    code, msg = _stub_code(lambda: stub.ModelInfer(req))
    assert code == "INVALID_ARGUMENT" and "do not fit UINT8" in msg


def test_bad_requests_are_invalid_argument_or_not_found(client, stub):
    z = np.zeros((1, 1, 28, 28), np.float32)
    cases = {
        "wrong shape": (lambda: _infer(client, "resnet20", np.zeros((1, 1, 28, 27), np.float32)), "INVALID_ARGUMENT"),
        "wrong datatype": (lambda: _infer(client, "resnet20", np.zeros((1, 1, 28, 28), np.int32)), "INVALID_ARGUMENT"),
        "batch over max": (lambda: _infer(client, "resnet20", np.zeros((33, 1, 28, 28), np.float32)), "INVALID_ARGUMENT"),
        "unknown output": (lambda: _infer(client, "resnet20", z, outputs=[grpcclient.InferRequestedOutput("nope")]),
                           "INVALID_ARGUMENT"),
        "unknown model": (lambda: _infer(client, "nope", z), "NOT_FOUND"),
        "unknown version": (lambda: _infer(client, "resnet20", z, model_version="9"), "NOT_FOUND"),
        "failed model": (lambda: _infer(client, "broken", z), "NOT_FOUND"),
    }
    for what, (fn, code) in cases.items():
        status, msg = _code(fn)
        assert status == f"StatusCode.{code}" and msg, (what, status, msg)
    inp = grpcclient.InferInput("x", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(z)
    assert _code(lambda: client.infer("resnet20", [inp]))[0] == "StatusCode.INVALID_ARGUMENT"

    def raw(datatype="FP32", shape=(1, 1, 28, 28), data=z.tobytes(), n_raw=1):
        req = service_pb2.ModelInferRequest(model_name="resnet20")
        req.inputs.add(name="input", datatype=datatype, shape=list(shape))
        req.raw_input_contents.extend([data] * n_raw)
        return lambda: stub.ModelInfer(req)

    assert _stub_code(raw(data=z.tobytes()[:-4]))[0] == "INVALID_ARGUMENT"  # bytes vs shape
    assert _stub_code(raw(n_raw=2))[0] == "INVALID_ARGUMENT"  # more raw contents than inputs
    assert _stub_code(raw(datatype="FOO"))[0] == "INVALID_ARGUMENT"
    # a BYTES claim of 2**40 elements in 8 bytes is refused before anything is allocated
    code, msg = _stub_code(raw(datatype="BYTES", shape=(1 << 40,), data=b"\0" * 8))
    assert code == "INVALID_ARGUMENT" and "at most 2 fit" in msg
    assert _stub_code(raw(shape=(1 << 31, 1 << 31, 1 << 31)))[0] == "INVALID_ARGUMENT"  # > 2**62 elements
    req = service_pb2.ModelInferRequest(model_name="resnet20")
    req.inputs.add(name="input", datatype="FP16", shape=[1])  # FP16 has no typed contents
    code, msg = _stub_code(lambda: stub.ModelInfer(req))
    assert code == "INVALID_ARGUMENT" and "raw_input_contents" in msg


def test_limits_message_size_deadline_and_timeout(client, stub, mnist_images):
    big = np.zeros((9 << 20) // 4, np.float32)  # the session server's limit is 8 MiB
    req = service_pb2.ModelInferRequest(model_name="resnet20")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    req.raw_input_contents.append(big.tobytes())
    assert _stub_code(lambda: stub.ModelInfer(req))[0] == "RESOURCE_EXHAUSTED"
    x = np.repeat(mnist_images[:1], 32, axis=0)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    status, msg = _code(lambda: client.infer("resnet20", [inp], timeout=1))  # `timeout` parameter: 1 us
    assert status == "StatusCode.UNAVAILABLE" and "timed out" in msg
    status, _ = _code(lambda: client.infer("resnet20", [inp], client_timeout=0.000001))  # gRPC deadline
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    assert _infer(client, "resnet20", mnist_images[:1]).as_numpy("logits").shape == (1, 10)  # still serving


def test_statistics_shared_with_http_and_invalid_requests_not_counted(client, server, mnist_images):
    def counts():
        s = client.get_inference_statistics("resnet20", "1", as_json=True)["model_stats"][0]["inference_stats"]
        return int(s["success"].get("count", 0)), int(s["fail"].get("count", 0))

    ok0, fail0 = counts()
    _infer(client, "resnet20", mnist_images[:1])
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": mnist_images[0].ravel().tolist()}]}).encode()
    from tests.serve.conftest import http

    assert http("POST", f"http://{server.url}/v2/models/resnet20/infer", body)[0] == 200
    _code(lambda: _infer(client, "resnet20", np.zeros((1, 1, 28, 27), np.float32)))  # refused by validation
    assert counts() == (ok0 + 2, fail0)  # like Triton: a request refused by validation is not a failure
    status, msg = _code(lambda: client.get_inference_statistics("nope"))
    assert status == "StatusCode.INVALID_ARGUMENT" and "not available" in msg  # Triton's code
    assert _code(lambda: client.get_inference_statistics("resnet20", "9"))[0] == "StatusCode.INVALID_ARGUMENT"
    assert _code(lambda: client.get_inference_statistics("broken"))[0] == "StatusCode.INVALID_ARGUMENT"
    names = {s["name"] for s in client.get_inference_statistics(as_json=True)["model_stats"]}
    assert "resnet20" in names and "broken" not in names


def test_repository_index_and_no_model_control(client):
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["resnet20"]["state"] == "READY" and index["broken"]["state"] == "UNAVAILABLE"
    assert "could not load" in index["broken"]["reason"]
    status, msg = _code(lambda: client.load_model("resnet20"))
    assert status == "StatusCode.UNAVAILABLE" and "--model-control-mode explicit" in msg
    assert _code(lambda: client.unload_model("resnet20"))[0] == "StatusCode.UNAVAILABLE"
    assert _code(lambda: client.get_system_shared_memory_status())[0] == "StatusCode.UNIMPLEMENTED"


def test_sigterm_drain_finishes_rpcs_in_progress_and_refuses_new_ones(model_repo, tmp_path, spawn_server, mnist_images):
    start_server, stop_server = spawn_server
    sp = start_server(model_repo, tmp_path, "--no-strict-readiness", "--shutdown-timeout", "20")
    c = grpcclient.InferenceServerClient(sp.grpc_url)
    try:
        x = np.repeat(mnist_images[:1], 32, axis=0)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        results: list = []
        for _ in range(12):  # one instance, no batching: they run one after another (~0.1-0.5 s in all)
            c.async_infer("resnet20_nobatch", [inp], callback=lambda result, error: results.append((result, error)))
        time.sleep(0.05)
        sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while len(results) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(results) == 12, "an RPC got no answer"
        codes = [("OK" if e is None else e.status()) for _, e in results]
        assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE"} and "OK" in codes, codes
        for r, e in results:
            if e is None:
                assert r.as_numpy("logits").shape == (32, 10)
    finally:
        c.close()
        assert stop_server(sp) == 0
    assert "gRPC stopped; 0 RPC(s) abandoned" in sp.log()
