"""The same configs refused by real Triton and by `resdeploy serve`, and what both answer about a model that failed.

One repository holds a config per case; Triton runs with ``--exit-on-error=false`` so a refused model stays
unavailable while the others serve, as on `resdeploy serve`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

IO = ('input { name: "input" data_type: TYPE_FP32 dims: [1, 28, 28] } '
      'output { name: "logits" data_type: TYPE_FP32 dims: [10] }')
WARMUP_BAD = ('model_warmup { name: "w" batch_size: 1 inputs { key: "input" value { data_type: TYPE_FP32 '
              'dims: [1, 28, 27] zero_data: true } } }')

KNOWN_GPU = "known difference (issue 11): KIND_GPU on a machine without a GPU loads on resdeploy; Triton refuses it"
KNOWN_PREFERRED = "known difference (issue 11): preferred_batch_size above max_batch_size loads on resdeploy; Triton refuses it"
KNOWN_WARMUP = ("known difference (issue 11): model_warmup is ignored by resdeploy; Triton runs it and refuses the model "
                "when a sample is invalid")

# name -> (config.pbtxt text, how the version folder is made, loads?, xfail reason or None)
CASES: dict[str, tuple[str, str, bool, str | None]] = {
    "minimal": (f"max_batch_size: 8 {IO}", "onnx", True, None),  # no platform/backend: Triton completes them
    "backend_only": (f'backend: "onnxruntime" max_batch_size: 8 {IO}', "onnx", True, None),
    "queue_and_instances": (f"max_batch_size: 8 {IO} instance_group {{ kind: KIND_CPU count: 2 }} "
                            "dynamic_batching { default_queue_policy { max_queue_size: 4 } }", "onnx", True, None),
    "name_mismatch": (f'name: "other" max_batch_size: 8 {IO}', "onnx", False, None),
    "no_version": (f"max_batch_size: 8 {IO}", "none", False, None),
    "syntax_error": (f"max_batch_size: 8 {IO} {{{{{{", "onnx", False, None),
    "negative_batch": (f"max_batch_size: -1 {IO}", "onnx", False, None),
    "dtype_mismatch": ('max_batch_size: 8 input { name: "input" data_type: TYPE_INT32 dims: [1, 28, 28] } '
                       'output { name: "logits" data_type: TYPE_FP32 dims: [10] }', "onnx", False, None),
    "dims_mismatch": ('max_batch_size: 8 input { name: "input" data_type: TYPE_FP32 dims: [1, 28, 27] } '
                      'output { name: "logits" data_type: TYPE_FP32 dims: [10] }', "onnx", False, None),
    "unknown_input": ('max_batch_size: 8 input { name: "image" data_type: TYPE_FP32 dims: [1, 28, 28] } '
                      'output { name: "logits" data_type: TYPE_FP32 dims: [10] }', "onnx", False, None),
    "no_model_file": (f"max_batch_size: 8 {IO}", "empty", False, None),
    "broken_onnx": (f"max_batch_size: 8 {IO}", "garbage", False, None),
    "policy_selects_nothing": (f"max_batch_size: 8 {IO} version_policy {{ specific {{ versions: [5] }} }}", "onnx", False, None),
    "kind_gpu": (f"max_batch_size: 8 {IO} instance_group {{ kind: KIND_GPU count: 1 }}", "onnx", False, KNOWN_GPU),
    "preferred_over_max": (f"max_batch_size: 8 {IO} dynamic_batching {{ preferred_batch_size: [16] }}", "onnx", False,
                           KNOWN_PREFERRED),
    "invalid_warmup": (f"max_batch_size: 8 {IO} {WARMUP_BAD}", "onnx", False, KNOWN_WARMUP),
}


@pytest.fixture(scope="session")
def refused_repo(tmp_path_factory, resnet20_onnx) -> Path:
    repo = tmp_path_factory.mktemp("refused_repo")
    for name, (text, files, _, _) in CASES.items():
        (repo / name).mkdir()
        (repo / name / "config.pbtxt").write_text(text + "\n")
        if files != "none":
            (repo / name / "1").mkdir()
        if files == "onnx":
            shutil.copyfile(resnet20_onnx, repo / name / "1" / "model.onnx")
        elif files == "garbage":
            (repo / name / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    return repo


@pytest.fixture(scope="session")
def refused_pair(start_pair, refused_repo):
    return start_pair(refused_repo, triton_kwargs={"exit_on_error": False})


def _case(name):
    text, files, loads, reason = CASES[name]
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, loads, id=name, marks=marks)


@pytest.mark.parametrize("model", list(CASES))
def test_triton_loads_or_refuses_as_expected(refused_pair, model):
    status, _ = refused_pair.triton.request("GET", f"/v2/models/{model}/versions/1/ready")
    assert (status == 200) == CASES[model][2], f"triton says {status} for {model}:\n{refused_pair.triton.log()[-3000:]}"


@pytest.mark.parametrize(("model", "loads"), [_case(n) for n in CASES])
def test_same_configs_refused(refused_pair, model, loads):
    (ts, _, _), (rs, rb, _) = refused_pair.both("GET", f"/v2/models/{model}/versions/1/ready")
    assert (rs == 200) == (ts == 200), f"triton says {ts}, resdeploy {rs} for {model}: {rb[:300]!r}"


def test_loaded_hand_written_configs_infer_on_both(refused_pair, digits, ort_reference):
    import numpy as np

    body = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                   "data": digits[:2].ravel().tolist()}]}).encode()
    for model in ("minimal", "backend_only", "queue_and_instances"):
        for status, out, _ in refused_pair.both("POST", f"/v2/models/{model}/infer", body):
            assert status == 200, out[:300]
            got = np.asarray(json.loads(out)["outputs"][0]["data"], np.float32).reshape(2, 10)
            np.testing.assert_allclose(got, ort_reference(digits[:2]), rtol=1e-5, atol=1e-5)


FAILED_MODEL = ("known difference (issue 11): a model that failed to load is unknown to Triton (404), while resdeploy "
                "answers 503 on metadata/infer and returns a partial config")
FAILED_STATS = ("known difference (issue 11): statistics of a model that is not available: Triton 400, resdeploy 200 "
                "(an empty record)")
READY_CODES = ("difference NOT in issue 11's list, found by this suite: Triton answers 400 for the readiness of a model "
               "(or server) that is not ready or unknown; resdeploy answers 503 (not ready) or 404 (unknown)")


def _failed(method, path, body, reason, id):
    return pytest.param(method, path, body, id=id, marks=[pytest.mark.xfail(strict=True, reason=reason)])


@pytest.mark.parametrize(("method", "path", "body"), [
    _failed("GET", "/v2/models/{m}", None, FAILED_MODEL, "metadata"),
    _failed("GET", "/v2/models/{m}/config", None, FAILED_MODEL, "config"),
    _failed("POST", "/v2/models/{m}/infer", b'{"inputs": []}', FAILED_MODEL, "infer"),
    _failed("GET", "/v2/models/{m}/stats", None, FAILED_STATS, "stats"),
    _failed("GET", "/v2/models/{m}/ready", None, READY_CODES, "ready"),
])
@pytest.mark.parametrize("model", ["broken_onnx", "syntax_error"])  # failed in the backend / in the config
def test_failed_model_answers(refused_pair, model, method, path, body):
    (ts, tb, _), (rs, rb, _) = refused_pair.both(method, path.format(m=model), body)
    assert rs == ts, f"triton {ts} {tb[:120]!r}, resdeploy {rs} {rb[:120]!r}"


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/v2/models/{m}", None, 404), ("GET", "/v2/models/{m}/config", None, 404),
    ("POST", "/v2/models/{m}/infer", b'{"inputs": []}', 404), ("GET", "/v2/models/{m}/stats", None, 400),
    ("GET", "/v2/models/{m}/ready", None, 400)], ids=["metadata", "config", "infer", "stats", "ready"])
@pytest.mark.parametrize("model", ["broken_onnx", "syntax_error"])
def test_failed_model_triton_answers(refused_pair, model, method, path, body, status):
    """What the strict xfails above compare against: Triton treats a failed model as unavailable."""
    assert refused_pair.triton.request(method, path.format(m=model), body)[0] == status


@pytest.mark.xfail(strict=True, reason=READY_CODES)
def test_server_not_ready_status(refused_pair):
    (ts, _, _), (rs, _, _) = refused_pair.both("GET", "/v2/health/ready")
    assert rs == ts  # Triton: 400 (strict readiness and a model failed)


def test_server_not_ready_on_triton(refused_pair):
    assert refused_pair.triton.request("GET", "/v2/health/ready")[0] == 400
    assert refused_pair.triton.request("GET", "/v2/health/live")[0] == 200


CONFIG_DEFAULTS = ("known difference (issue 11): /config lacks version_policy and optimization and does not fill "
                   "defaults the way Triton does (preferred_batch_size, default_model_filename, instance group names)")


@pytest.mark.xfail(strict=True, reason=CONFIG_DEFAULTS)
@pytest.mark.parametrize("key", ["version_policy", "optimization", "default_model_filename", "instance_group"])
def test_config_defaults_triton_fills(refused_pair, key):
    (ts, tb, _), (rs, rb, _) = refused_pair.both("GET", "/v2/models/minimal/config")
    assert ts == rs == 200
    t, r = json.loads(tb), json.loads(rb)
    assert t.get(key) == r.get(key), f"triton {t.get(key)} / resdeploy {r.get(key)}"


@pytest.mark.xfail(strict=True, reason=CONFIG_DEFAULTS)
def test_config_default_preferred_batch_size(refused_pair):
    (_, tb, _), (_, rb, _) = refused_pair.both("GET", "/v2/models/queue_and_instances/config")
    t, r = json.loads(tb), json.loads(rb)
    assert t["dynamic_batching"]["preferred_batch_size"] == r["dynamic_batching"]["preferred_batch_size"]
