"""Triton's rules that `resdeploy serve` follows (checked against real Triton in tests/conformance; here fast, in CI):
config auto-complete, the configs Triton refuses (model_warmup, preferred_batch_size, KIND_GPU without a GPU), raw
binary requests, and explicit model control (load/unload over HTTP)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from tests.serve.conftest import http

IO = ('input { name: "input" data_type: TYPE_FP32 dims: [1, 28, 28] } '
      'output { name: "logits" data_type: TYPE_FP32 dims: [10] }')


def _warmup(inputs: str, batch: int = 1) -> str:
    return f'model_warmup {{ name: "w" batch_size: {batch} inputs {{ key: "input" value {{ {inputs} }} }} }}'


FP32_DIMS = "data_type: TYPE_FP32 dims: [1, 28, 28]"
FILE_X, FILE_UP, FILE_SHORT = (f'{FP32_DIMS} input_data_file: "{f}"' for f in ("x.bin", "../../x.bin", "short.bin"))
# name -> (config.pbtxt, loads?, what the refusal says)
CONFIGS = {
    "minimal": (f"max_batch_size: 8 {IO} dynamic_batching {{ }}", True, ""),
    "warmup_file": (f"max_batch_size: 8 {IO} {_warmup(FILE_X, 2)}", True, ""),
    "warmup_dims": (f"max_batch_size: 8 {IO} {_warmup('data_type: TYPE_FP32 dims: [1, 28, 27] zero_data: true')}", False,
                    "model_warmup 'w' is not a valid request"),
    "warmup_dtype": (f"max_batch_size: 8 {IO} {_warmup('data_type: TYPE_INT32 dims: [1, 28, 28] zero_data: true')}", False,
                     "datatype INT32"),
    "warmup_batch": (f"max_batch_size: 8 {IO} {_warmup(FP32_DIMS + ' zero_data: true', 9)}", False, "batch_size is 9"),
    "warmup_no_data": (f"max_batch_size: 8 {IO} {_warmup(FP32_DIMS)}", False, "has no data"),
    "warmup_escape": (f"max_batch_size: 8 {IO} {_warmup(FILE_UP)}", False,
                      "without '..'"),
    "warmup_short_file": (f"max_batch_size: 8 {IO} {_warmup(FILE_SHORT)}", False,
                          "has 16 bytes; expected 3136"),
    "preferred_over_max": (f"max_batch_size: 8 {IO} dynamic_batching {{ preferred_batch_size: [4, 16] }}", False,
                           "preferred_batch_size [16]"),
    "kind_gpu": (f"max_batch_size: 8 {IO} instance_group {{ kind: KIND_GPU }}", False, "no CUDA GPU"),
}


@pytest.fixture(scope="module")
def rules_server(tmp_path_factory, resnet20_onnx, spawn_server):
    from resdeploy.device import cuda_device_count
    from resdeploy.pipeline.repository import make_model_repository

    repo = tmp_path_factory.mktemp("rules_repo")
    make_model_repository(resnet20_onnx, repo, "good", max_batch_size=8)
    for name, (text, _, _) in CONFIGS.items():
        if name == "kind_gpu" and cuda_device_count():
            continue  # loads on a machine with a GPU
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text + "\n")
        shutil.copyfile(resnet20_onnx, repo / name / "1" / "model.onnx")
    (repo / "warmup_file" / "warmup").mkdir()
    (repo / "warmup_file" / "warmup" / "x.bin").write_bytes(np.zeros((1, 28, 28), np.float32).tobytes())
    (repo / "warmup_short_file" / "warmup").mkdir()
    (repo / "warmup_short_file" / "warmup" / "short.bin").write_bytes(b"\0" * 16)
    start_server, stop_server = spawn_server
    sp = start_server(repo, tmp_path_factory.mktemp("rules_logs"), "--model-control-mode", "explicit",
                      "--load-model", "*", ready_path="/v2/models/good/ready")
    deadline = time.monotonic() + 120
    while "model version(s) loaded" not in sp.log() and time.monotonic() < deadline:  # every model loaded or failed
        time.sleep(0.1)
    yield sp
    assert stop_server(sp) == 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_triton_refuses_are_refused(rules_server, name):
    text, loads, says = CONFIGS[name]
    status, raw = rules_server.get(f"/v2/models/{name}/ready")
    if name == "kind_gpu" and status == 400 and "unknown model" in json.loads(raw)["error"]:
        pytest.skip("this machine has a GPU: KIND_GPU loads")
    assert (status == 200) == loads, raw
    if not loads:
        assert status == 400 and says in json.loads(raw)["error"], raw


def test_config_is_completed_like_triton(rules_server):
    cfg = json.loads(rules_server.get("/v2/models/minimal/config")[1])
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg["runtime"] == "libtriton_onnxruntime.so" and cfg["default_model_filename"] == "model.onnx"
    assert cfg["version_policy"] == {"latest": {"num_versions": 1}}
    assert cfg["optimization"]["input_pinned_memory"] == {"enable": True} and cfg["optimization"]["priority"] == "PRIORITY_DEFAULT"
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8]
    [group] = cfg["instance_group"]
    assert (group["name"], group["count"]) == ("minimal", 2)  # Triton's default group: the model's name, 2 on the CPU
    assert group["kind"] in ("KIND_CPU", "KIND_GPU")


def test_raw_binary_request(rules_server, mnist_images, runner_reference):
    x = np.ascontiguousarray(mnist_images[:1])
    status, body = http("POST", f"http://{rules_server.url}/v2/models/good/infer", x.tobytes(),
                        {"Inference-Header-Content-Length": "0"})
    assert status == 200
    n = body.index(b"}]}") + 3
    header = json.loads(body[:n])
    assert header["outputs"][0]["shape"] == [1, 10] and header["outputs"][0]["parameters"]["binary_data_size"] == 40
    np.testing.assert_allclose(np.frombuffer(body[n:], np.float32).reshape(1, 10),
                               runner_reference.infer({"input": x})["logits"], rtol=1e-5, atol=1e-5)
    status, body = http("POST", f"http://{rules_server.url}/v2/models/good/infer", x.tobytes()[:100],
                        {"Inference-Header-Content-Length": "0"})
    assert status == 400 and "has 100 bytes; expected 3136" in json.loads(body)["error"]


def _post(sp, path, body=b""):
    status, raw = http("POST", f"http://{sp.url}{path}", body)
    return status, json.loads(raw) if raw else None


def test_explicit_model_control(rules_server, mnist_images):
    sp = rules_server
    infer = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                    "data": mnist_images[0].ravel().tolist()}]}).encode()
    assert _post(sp, "/v2/models/good/infer", infer)[0] == 200
    assert _post(sp, "/v2/repository/models/good/unload")[0] == 200
    status, resp = _post(sp, "/v2/models/good/infer", infer)
    assert status == 404 and "unloaded" in resp["error"]
    index = {(r["name"], r.get("version")): r for r in _post(sp, "/v2/repository/index", b"{}")[1]}
    assert index[("good", "1")]["state"] == "UNAVAILABLE" and index[("good", "1")]["reason"] == "unloaded"
    assert sp.get("/v2/models/good/ready")[0] == 400 and sp.get("/v2/models/good/stats")[0] == 400
    assert _post(sp, "/v2/repository/models/good/load", b"{}")[0] == 200
    assert _post(sp, "/v2/models/good/infer", infer)[0] == 200
    assert _post(sp, "/v2/repository/models/nope/unload")[0] == 200  # as on Triton
    status, resp = _post(sp, "/v2/repository/models/nope/load")
    assert status == 400 and "no model folder" in resp["error"]
    status, resp = _post(sp, "/v2/repository/models/..%2Fgood/load")
    assert status in (400, 404)
    status, resp = _post(sp, "/v2/repository/models/good/load", b'{"parameters": {"file:1/model.onnx": "AAAA"}}')
    assert status == 400 and "from the repository" in resp["error"]
    status, resp = _post(sp, "/v2/repository/models/good/load", b'{"parameters": {"config": "{\\"max_batch_size\\": \\"x\\"}"}}')
    assert status == 400 and "ModelConfig JSON" in resp["error"]
    # a reload that fails leaves the served versions serving
    bad = json.dumps({"parameters": {"config": json.dumps({"max_batch_size": 8, "input": [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]})}}).encode()
    status, resp = _post(sp, "/v2/repository/models/good/load", bad)
    assert status == 400 and "stay" in resp["error"]
    assert _post(sp, "/v2/models/good/infer", infer)[0] == 200
    # a config parameter replaces config.pbtxt
    cfg = json.dumps({"parameters": {"config": json.dumps({"max_batch_size": 4})}}).encode()
    assert _post(sp, "/v2/repository/models/good/load", cfg)[0] == 200
    assert json.loads(sp.get("/v2/models/good/config")[1])["max_batch_size"] == 4
    assert _post(sp, "/v2/repository/models/good/load", b"{bad")[0] == 400


def test_model_control_flags():
    from resdeploy.errors import InputError
    from resdeploy.pipeline.cli import build_parser
    from resdeploy.serve.server import ServerConfig

    assert ServerConfig().grpc_port == 8001 and ServerConfig().model_control_mode == "none"
    with pytest.raises(InputError, match="--model-control-mode explicit"):
        ServerConfig(load_models=("m",))
    with pytest.raises(InputError, match="unknown"):
        ServerConfig(model_control_mode="poll")
    from resdeploy.serve.config import from_arguments

    args = build_parser().parse_args(["serve", "R", "--no-grpc", "--model-control-mode", "explicit", "--load-model", "a",
                                      "--load-model", "b"])
    config = from_arguments(args)
    assert config.grpc_port is None and config.load_models == ("a", "b") and config.model_control_mode == "explicit"
    default = from_arguments(build_parser().parse_args(["serve", "R"]))
    assert default == ServerConfig()  # the flags' defaults are the config's own
