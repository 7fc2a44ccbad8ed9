"""The same configs refused by real Triton and by `resdeploy serve`, and what both answer about a model that failed.

One repository holds a config per case; Triton runs with ``--exit-on-error=false`` so a refused model stays
unavailable while the others serve, as on `resdeploy serve`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from benchmarks import triton_harness as th

IO = ('input { name: "input" data_type: TYPE_FP32 dims: [1, 28, 28] } '
      'output { name: "logits" data_type: TYPE_FP32 dims: [10] }')
WARMUP_BAD = ('model_warmup { name: "w" batch_size: 1 inputs { key: "input" value { data_type: TYPE_FP32 '
              'dims: [1, 28, 27] zero_data: true } } }')

WARMUP_UNKNOWN_INPUT = ('model_warmup { name: "w" batch_size: 1 inputs { key: "image" value { data_type: TYPE_FP32 '
                        'dims: [1, 28, 28] zero_data: true } } }')
WARMUP_OVER_MAX = ('model_warmup { name: "w" batch_size: 9 inputs { key: "input" value { data_type: TYPE_FP32 '
                   'dims: [1, 28, 28] random_data: true } } }')
WARMUP_GOOD = ('model_warmup { name: "w" batch_size: 4 count: 2 inputs { key: "input" value { data_type: TYPE_FP32 '
               'dims: [1, 28, 28] random_data: true } } }')

# name -> (config.pbtxt text, how the version folder is made, loads?, known difference or None: none are left)
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
    "kind_gpu": (f"max_batch_size: 8 {IO} instance_group {{ kind: KIND_GPU count: 1 }}", "onnx", False, None),
    "preferred_over_max": (f"max_batch_size: 8 {IO} dynamic_batching {{ preferred_batch_size: [16] }}", "onnx", False, None),
    "invalid_warmup": (f"max_batch_size: 8 {IO} {WARMUP_BAD}", "onnx", False, None),
    "warmup_unknown_input": (f"max_batch_size: 8 {IO} {WARMUP_UNKNOWN_INPUT}", "onnx", False, None),
    "warmup_good": (f"max_batch_size: 8 {IO} {WARMUP_GOOD}", "onnx", True, None),
    "named_groups": (f"max_batch_size: 8 {IO} instance_group [{{ kind: KIND_CPU }}, {{ name: \"g\" count: 2 kind: KIND_AUTO }}] "
                     "version_policy { all {} } dynamic_batching { preferred_batch_size: [2, 4] }", "onnx", True, None),
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
    assert reason is None, f"{name}: a known difference must be fixed or listed in docs/serving.md with its reason"
    return pytest.param(name, loads, id=name)


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


@pytest.mark.parametrize(("method", "path", "body"), [
    pytest.param("GET", "/v2/models/{m}", None, id="metadata"),
    pytest.param("GET", "/v2/models/{m}/config", None, id="config"),
    pytest.param("POST", "/v2/models/{m}/infer", b'{"inputs": []}', id="infer"),
    pytest.param("GET", "/v2/models/{m}/stats", None, id="stats"),
    pytest.param("GET", "/v2/models/{m}/ready", None, id="ready"),
    pytest.param("GET", "/v2/models/{m}/versions/1/ready", None, id="version-ready"),
    pytest.param("GET", "/v2/models/{m}/versions/1/stats", None, id="version-stats"),
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
    """What the comparisons above hold resdeploy to: Triton treats a failed model as unknown (404), 400 for the rest."""
    assert refused_pair.triton.request(method, path.format(m=model), body)[0] == status


def test_server_not_ready_status(refused_pair):
    (ts, _, _), (rs, _, _) = refused_pair.both("GET", "/v2/health/ready")
    assert rs == ts  # Triton: 400 (strict readiness and a model failed)


def test_server_not_ready_on_triton(refused_pair):
    assert refused_pair.triton.request("GET", "/v2/health/ready")[0] == 400
    assert refused_pair.triton.request("GET", "/v2/health/live")[0] == 200


@pytest.mark.parametrize("key", ["version_policy", "optimization", "default_model_filename", "instance_group"])
def test_config_defaults_triton_fills(refused_pair, key):
    (ts, tb, _), (rs, rb, _) = refused_pair.both("GET", "/v2/models/minimal/config")
    assert ts == rs == 200
    t, r = json.loads(tb), json.loads(rb)
    assert t.get(key) == r.get(key), f"triton {t.get(key)} / resdeploy {r.get(key)}"


def test_config_default_preferred_batch_size(refused_pair):
    (_, tb, _), (_, rb, _) = refused_pair.both("GET", "/v2/models/queue_and_instances/config")
    t, r = json.loads(tb), json.loads(rb)
    assert t["dynamic_batching"]["preferred_batch_size"] == r["dynamic_batching"]["preferred_batch_size"]


# The one field of Triton's auto-complete that differs by construction: Triton names the library that runs the
# model, and here that is the harness's Python stand-in ("model.py"); resdeploy reports what real Triton's
# onnxruntime backend would ("libtriton_onnxruntime.so").
STAND_IN_FIELDS = ("runtime",)


@pytest.mark.parametrize("model", [n for n, case in CASES.items() if case[2]])
def test_whole_config_is_tritons(refused_pair, model):
    """Every field of the auto-completed config reads the same from both servers (hand-written configs)."""
    (ts, tb, _), (rs, rb, _) = refused_pair.both("GET", f"/v2/models/{model}/config")
    assert ts == rs == 200
    t, r = json.loads(tb), json.loads(rb)
    assert t.pop("runtime") == "model.py" and r.pop("runtime") == "libtriton_onnxruntime.so"
    assert t == r


@pytest.mark.parametrize("model", ["warmup_unknown_input", "invalid_warmup"])
def test_refused_warmup_is_reported(refused_pair, model):
    (ts, _, _), (rs, rb, _) = refused_pair.both("GET", f"/v2/models/{model}/versions/1/ready")
    assert ts == rs == 400 and "model_warmup" in json.loads(rb)["error"], rb


# Triton 2.51 can die (SIGSEGV) while it fails a warmup sample whose batch_size exceeds max_batch_size, instead of
# marking that one model unavailable. Reproduced here on that model alone: 1 of 10 starts on an idle 2-core machine,
# 7 of 10 with the cores busy, with random or zero data and with 1 or 2 instances; in CI it took the shared refused
# repository down with it (81 errors). So the case runs on a Triton of its own, started until it survives a load.
def test_warmup_batch_over_max_never_served(tmp_path, triton_install, resnet20_onnx, start_resdeploy_alone):
    repo = tmp_path / "repo"
    (repo / "warmup_batch_over_max" / "1").mkdir(parents=True)
    (repo / "warmup_batch_over_max" / "config.pbtxt").write_text(f"max_batch_size: 8 {IO} {WARMUP_OVER_MAX}\n")
    shutil.copyfile(resnet20_onnx, repo / "warmup_batch_over_max" / "1" / "model.onnx")
    ready = "/v2/models/warmup_batch_over_max/versions/1/ready"

    resdeploy = start_resdeploy_alone(repo)
    rs, rb, _ = resdeploy.request("GET", ready)
    assert rs == 400 and "model_warmup" in json.loads(rb)["error"] and "max_batch_size" in json.loads(rb)["error"], rb

    crashes: list[str] = []
    for _ in range(6):
        try:
            triton = th.start_triton(repo, install=triton_install, log_dir=tmp_path, exit_on_error=False)
        except th.TritonCrashed as exc:
            assert exc.returncode < 0, exc  # refusing a model never ends Triton with --exit-on-error=false
            crashes.append(f"killed by signal {-exc.returncode}")
            continue
        try:
            ts = triton.request("GET", ready)[0]
        finally:
            triton.stop()
        assert ts == rs == 400, f"triton says {ts}, resdeploy {rs}"
        break
    else:
        ts = None
    left = th._with_arg(str(repo / "warmup_batch_over_max" / "1"))  # a crashed server's stubs are ended too
    assert not left, f"python-backend stubs left running: {left}"
    if crashes:  # said in the test report: what was and was not compared
        warnings.warn(f"tritonserver 2.51 died loading warmup_batch_over_max on {len(crashes)} of "
                      f"{len(crashes) + (ts is not None)} starts ({crashes[0]}); "
                      + ("compared on the start it survived" if ts is not None
                         else "it never served the model; resdeploy's refusal was checked alone"), stacklevel=2)


def _grpc_infer(model):
    import numpy as np
    import tritonclient.grpc as grpcclient

    def call(c):
        inp = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        return c.infer(model, [inp])
    return call


def test_grpc_failed_model(refused_pair):
    for call, code in ((lambda c: c.is_model_ready("broken_onnx"), "OK"), (lambda c: c.is_server_ready(), "OK"),
                       (lambda c: c.get_model_metadata("broken_onnx"), "NOT_FOUND"),
                       (lambda c: c.get_model_config("broken_onnx"), "NOT_FOUND"),
                       (lambda c: c.get_inference_statistics("broken_onnx"), "INVALID_ARGUMENT"),
                       (_grpc_infer("broken_onnx"), "NOT_FOUND")):
        (ts, tv), (rs, rv) = refused_pair.grpc_both(call)
        assert ts == rs == code, (ts, tv, rs, rv)
        if code == "OK":
            assert tv is False and rv is False
