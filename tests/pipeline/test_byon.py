"""Bring your own network: ``--model`` (a factory, trained here or with ``--weights``) and ``--onnx`` through the
whole pipeline, the same flags on the other commands, the cache keys, and every bad input (exit 2, one line).

The network is ``tests/data/user_model.py:tiny_resnet``, written as a user writes one (no resdeploy imports). The runs
train it for one short epoch on scikit-learn's 8x8 digits, so the gates are relaxed (``FAST``): these tests check the
mechanics (artifacts, metadata, reference, cache, errors), not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from resdeploy.artifact import open_artifact
from resdeploy.atomic import sha256_file
from resdeploy.pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
USER = ROOT / "tests" / "data" / "user_model.py"
FACTORY = f"{USER}:tiny_resnet"
FAST = ["--no-bench", "--data", "digits"] + [x for kv in (
    'engines.choose="off"', 'engines.backends=["onnxruntime"]', "engines.threads=1", "parity.limit=64",
    "variants.calibration_images=32", "variants.max_int8_drop=100.0", "parity.int8_max_drop=100.0",
    "parity.fp16_min_agreement=0.9", "variants.min_fp16_agreement=0.9", "variants.int8_search=false",
    "repository.precision=\"int8\"") for x in ("--set", kv)]
MEAN, STD = "0.3057", "0.3763"  # what the trainer measured on the digits' train split (normalisation given back)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _served(out: Path, name: str) -> Path:
    repo = out / "model_repository" / name
    assert (repo / "config.pbtxt").is_file() and (repo / "1" / "model.onnx").is_file(), sorted(out.rglob("*"))
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    return repo


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``run --model FACTORY`` without weights: the factory trained on the digits, then every stage."""
    out = tmp_path_factory.mktemp("byon") / "trained"
    code = main(["run", "--model", FACTORY, "--model-kwargs", '{"width": 8}', "--epochs", "1", "--out", str(out), *FAST])
    return code, out


@pytest.fixture(scope="module")
def user_weights(trained, tmp_path_factory):
    """The trained weights as a user keeps them: a state_dict .pth (torch.save), read back with weights_only."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(load_file(trained[1] / "checkpoint" / "model.safetensors"), path)
    return path


@pytest.fixture(scope="module")
def user_onnx(user_weights, tmp_path_factory):
    """The same network exported elsewhere (plain torch.onnx, its own tensor names, no resdeploy metadata)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model_for_export", USER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.tiny_resnet(width=8).eval()
    net.load_state_dict(torch.load(user_weights, weights_only=True))
    path = tmp_path_factory.mktemp("elsewhere") / "digits_net.onnx"
    torch.onnx.export(net, (torch.zeros(2, 1, 8, 8),), str(path), input_names=["pixels"], output_names=["scores"],
                      dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}}, dynamo=False)
    return path


# -- the three ways in, end to end ---------------------------------------------------------------------------
def test_factory_trained_here_ends_in_a_served_repository_and_a_report(trained):
    code, out = trained
    assert code == 0, (out / "run.json").read_text() if (out / "run.json").exists() else "no run.json"
    _served(out, "tiny_resnet")
    summary = json.loads((out / "run.json").read_text())
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert stages["train"] == "ran" and stages["repository"] == "ran", stages
    card = summary["model"]
    assert card["source"] == "factory" and card["factory"] == FACTORY and card["factory_kwargs"] == {"width": 8}
    assert card["weights_sha256"] == sha256_file(out / "checkpoint" / "model.safetensors")
    assert card["reference"] == "PyTorch FP32 eager" and isinstance(card["accuracy"]["test"], float)
    assert summary["parity"]["gates"]["fp32_max_rel"] == 1e-5  # a user's logits have their own scale
    assert summary["skipadd"]["fp32"]["residual_adds"] == 2  # the two blocks nobody declared
    for variant in ("fp32", "int8"):
        meta = open_artifact(out / "onnx" / f"{variant}.onnx").metadata
        assert (meta.factory, dict(meta.factory_kwargs)) == (FACTORY, {"width": 8}), meta
        assert meta.checkpoint_sha256 == card["weights_sha256"]
    report = (out / "report.md").read_text()
    assert FACTORY in report and card["weights_sha256"] in report


def test_factory_with_weights_skips_training_and_records_the_weights_sha256(user_weights, tmp_path, capsys):
    out = tmp_path / "weights"
    code, stdout, err = _run(capsys, "--model", FACTORY, "--model-kwargs", '{"width": 8}', "--weights", str(user_weights),
                             "--input-shape", "1,8,8", "--mean", MEAN, "--std", STD, "--out", str(out), *FAST)
    assert code == 0, stdout + err
    assert "given weights" in stdout
    _served(out, "tiny_resnet")
    meta = open_artifact(out / "onnx" / "fp32.onnx").metadata
    assert meta.checkpoint_sha256 == sha256_file(user_weights) and meta.factory == FACTORY
    assert meta.input_spec.shape == (1, 8, 8) and meta.input_spec.mean == (0.3057,)
    card = json.loads((out / "run.json").read_text())["model"]
    assert card["weights_sha256"] == sha256_file(user_weights) and card["source"] == "factory"


def test_onnx_from_elsewhere_is_its_own_reference(user_onnx, tmp_path, capsys):
    out = tmp_path / "onnx"
    code, stdout, err = _run(capsys, "--onnx", str(user_onnx), "--out", str(out), *FAST)
    assert code == 0, stdout + err
    repo = _served(out, "digits_net")
    assert 'name: "pixels"' in (repo / "config.pbtxt").read_text()  # the graph's own tensor names, served as they are
    summary = json.loads((out / "run.json").read_text())
    assert summary["parity"]["reference"].startswith("ONNX Runtime FP32 on the given graph digits_net.onnx")
    assert summary["model"]["onnx_sha256"] and summary["model"]["source"] == "onnx"
    meta = open_artifact(out / "onnx" / "int8.onnx").metadata
    assert meta.imported_sha256 == summary["model"]["onnx_sha256"]
    assert meta.input_spec.mean == (0.0,) and meta.input_spec.std == (1.0,)  # pixels go in as the data gives them
    assert summary["skipadd"]["fp32"]["residual_adds"] == 2 and not summary["skipadd"]["fp32"]["reference"]
    assert "ONNX Runtime FP32 on the given graph" in (out / "report.md").read_text()


def test_cache_keys_name_the_factory_its_kwargs_and_the_weights(user_weights, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["--model", FACTORY, "--model-kwargs", '{"width": 8}', "--input-shape", "1,8,8", "--out", str(out), *FAST]
    weights = tmp_path / "w.pth"
    weights.write_bytes(user_weights.read_bytes())
    assert _run(capsys, *args, "--weights", str(weights))[0] == 0
    code, stdout, _ = _run(capsys, *args, "--weights", str(weights))
    assert code == 0 and "nothing changed: nothing redone" in stdout, stdout
    state = torch.load(weights, weights_only=True)
    state["head.bias"] = state["head.bias"] + 0.5  # other weights, same file name
    torch.save(state, weights)
    code, stdout, _ = _run(capsys, *args, "--weights", str(weights))
    lines = {ln.split()[2]: ln.split()[3] for ln in stdout.splitlines() if ln.startswith("[")}
    assert code == 0 and lines["export"] == "ran" and lines["parity"] == "ran", stdout


# -- the same flags on the other commands ----------------------------------------------------------------------
def test_export_check_and_parity_take_the_same_flags(user_weights, user_onnx, tmp_path, capsys):
    model = ["--model", FACTORY, "--model-kwargs", '{"width": 8}', "--weights", str(user_weights), "--input-shape", "1,8,8"]
    onnx = tmp_path / "mine.onnx"
    assert main(["export", *model, "--out", str(onnx), "--data", "digits"]) == 0, capsys.readouterr()
    assert open_artifact(onnx).metadata.checkpoint_sha256 == sha256_file(user_weights)
    capsys.readouterr()
    assert main(["check", str(onnx), *model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["residual_adds"] == 2 and report["reference"]
    assert main(["parity", "--onnx", str(user_onnx), "--data", "digits", "--backends", "onnxruntime",
                 "--precisions", "fp32,fp16", "--limit", "32"]) == 0
    assert "vs ONNX Runtime FP32 on the given graph digits_net.onnx" in capsys.readouterr().out


# -- bad input: exit 2, one line naming the thing and the fix, no traceback, nothing written ----------------------
def _broken_onnx(tmp_path: Path, kind: str) -> Path:
    import onnx
    from onnx import helper as h

    if kind == "two_inputs":
        ins = [h.make_tensor_value_info(n, 1, ["n", 1, 8, 8]) for n in ("a", "b")]
        graph = h.make_graph([h.make_node("Add", ["a", "b"], ["c"])], "g", ins, [h.make_tensor_value_info("c", 1, ["n", 1, 8, 8])])
    else:  # no batch axis: a (C, H, W) input
        graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [1, 8, 8])],
                             [h.make_tensor_value_info("y", 1, [1, 8, 8])])
    path = tmp_path / f"{kind}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
    return path


def _torchscript(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


BAD = {
    "unknown module": (lambda t: ["--model", "no_such_pkg.nets:resnet"], "no module named 'no_such_pkg'"),
    "unknown callable": (lambda t: ["--model", f"{USER}:resnet9000"], "has no 'resnet9000'; callables there:"),
    "missing file": (lambda t: ["--model", f"{t}/nowhere.py:net"], "does not exist"),
    "not a factory spec": (lambda t: ["--model", "tiny_resnet"], "is not a factory; write MODULE:CALLABLE"),
    "factory raises": (lambda t: ["--model", f"{USER}:raises"], "raised RuntimeError: the factory cannot build this;"),
    "wrong kwargs": (lambda t: ["--model", FACTORY, "--model-kwargs", '{"depth": 3}'], "unexpected keyword argument 'depth'"),
    "not a module": (lambda t: ["--model", f"{USER}:not_a_module"], "returned dict, not a torch.nn.Module"),
    "classes vs data": (lambda t: ["--model", FACTORY, "--model-kwargs", '{"num_classes": 3}'],
                        "returns 3 logits but digits has 10 classes"),
    "shape rejected": (lambda t: ["--model", FACTORY, "--input-shape", "3,8,8"], "rejects input shape 3,8,8"),
    "weights do not fit": (lambda t: ["--model", FACTORY, "--model-kwargs", '{"width": 4}', "--weights", "W",
                                      "--input-shape", "1,8,8"], "mis-shaped keys: stem.0.weight: file (8, 1, 3, 3) vs model (4, 1, 3, 3)"),
    "weights without shape": (lambda t: ["--model", FACTORY, "--weights", "W"], "--input-shape C,H,W"),
    "torchscript weights": (lambda t: ["--model", FACTORY, "--weights", str(_torchscript(t)), "--input-shape", "1,8,8"],
                            "is a TorchScript archive"),
    "onnx with two inputs": (lambda t: ["--onnx", str(_broken_onnx(t, "two_inputs"))], "has 2 inputs (a, b)"),
    "onnx without batch axis": (lambda t: ["--onnx", str(_broken_onnx(t, "no_batch"))], "has no batch axis"),
    "onnx shape rejected": (lambda t: ["--onnx", "ONNX", "--input-shape", "3,8,8"], "does not take --input-shape 3,8,8"),
    "two sources": (lambda t: ["--model", FACTORY, "--onnx", "ONNX"], "factory and onnx are both set"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, user_weights, user_onnx, tmp_path, capsys):
    make, fragment = BAD[case]
    args = [str(user_weights) if a == "W" else str(user_onnx) if a == "ONNX" else a for a in make(tmp_path)]
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, *args, "--out", str(out), *FAST)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_int8_without_data_is_refused_with_the_reason(user_weights, tmp_path, capsys):
    out = tmp_path / "nodata"
    code, _, err = _run(capsys, "--model", FACTORY, "--weights", str(user_weights), "--input-shape", "1,8,8",
                        "--model-kwargs", '{"width": 8}', "--out", str(out), "--no-bench")
    assert code == 2 and "INT8 needs your data: calibration images" in err and "--data" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_model_kwargs_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", FACTORY, "--model-kwargs", "[1, 2]"])
    assert exc.value.code == 2 and "is not a JSON object" in capsys.readouterr().err


def test_factory_stays_unimported_when_a_checkpoint_names_it(trained, capsys):
    """A checkpoint trained from a factory records its name; loading it asks for the factory again (never imports
    what a file names)."""
    _, out = trained
    assert main(["export", str(out / "checkpoint"), "--out", str(out / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"--model {FACTORY}" in err and "runs its code" in err


def test_onnx_reference_runs_the_given_graph_unoptimised(user_onnx):
    from resdeploy.pipeline.config import ModelSection
    from resdeploy.pipeline.sources import resolve_source

    src = resolve_source(ModelSection(onnx=str(user_onnx)), data="digits")
    ref = src.reference()
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    assert ref.model is None and ref.input_spec.shape == (1, 8, 8) and ref.labels == tuple("0123456789")
    assert ref.logits(x).shape == (3, 10) and "optimisations off" in ref.kind
