"""`resdeploy fusion LAYERS.json [--onnx MODEL.onnx] [--json]` on the shipped TensorRT layer dumps."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resdeploy.pipeline.cli import main
from resdeploy import device as cuda_util

DUMPS = Path(__file__).resolve().parent.parent / "data" / "tensorrt-engine-layers"


def test_text_report(capsys):
    path = DUMPS / "resnet18-a100-fp16.graph.json"
    assert main(["fusion", str(path)]) == 0
    out = capsys.readouterr().out
    n_layers = len(json.loads(path.read_text())["Layers"])
    assert f"{n_layers} engine layers" in out and "8 residual Adds: 8 fused into a convolution" in out
    assert "Conv_16 + Add_17 + Relu_18" in out and "projection" in out and "warning" not in out


def test_json_report(capsys):
    assert main(["fusion", str(DUMPS / "resnet18-a100-qat.graph.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["residual_adds"] == 8 == data["fused"] and not data["mapped_from_onnx"]
    assert {a["dtype"] for a in data["adds"]} == {"FP16"} and "INT8" in data["dtype_counts"]


def test_require_fused_fails_on_a_standalone_add(tmp_path, capsys):
    doc = json.loads((DUMPS / "resnet18-a100-fp32.graph.json").read_text())
    # Unfuse the first residual Add: Conv_5 alone, then an ElementWise layer for Add_6 + Relu_7.
    i = next(k for k, l in enumerate(doc["Layers"]) if l["Name"] == "Conv_5 + Add_6 + Relu_7")
    fused = doc["Layers"][i]
    conv = {**fused, "Name": "Conv_5", "Inputs": fused["Inputs"][:1], "Outputs": [{**fused["Outputs"][0], "Name": "conv5_out"}]}
    add = {"Name": "PWN(Add_6, Relu_7)", "LayerType": "PointWiseV2", "Inputs": [conv["Outputs"][0], fused["Inputs"][1]],
           "Outputs": fused["Outputs"]}
    doc["Layers"][i:i + 1] = [conv, add]
    path = tmp_path / "unfused.json"
    path.write_text(json.dumps(doc))
    assert main(["fusion", str(path)]) == 0
    assert "warning: Add_6: runs as a standalone PointWiseV2 layer" in capsys.readouterr().out
    assert main(["fusion", str(path), "--require-fused"]) == 1
    captured = capsys.readouterr()
    assert "1 of 8 residual Adds are not fused" in captured.err


def test_onnx_mapping(tmp_path, capsys):
    """A Conv -> Relu -> Conv branch plus a 1x1 projection conv, with the dumps' legacy node names (layer2.0)."""
    pytest.importorskip("resdeploy.export.skipadd")
    w = lambda n, s: numpy_helper.from_array(np.ones(s, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w13"], ["t13"], name="Conv_13", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["t13"], ["t14"], name="Relu_14"),
             helper.make_node("Conv", ["t14", "w15"], ["t15"], name="Conv_15", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w16"], ["t16"], name="Conv_16", strides=[2, 2]),
             helper.make_node("Add", ["t15", "t16"], ["t17"], name="Add_17"),
             helper.make_node("Relu", ["t17"], ["y"], name="Relu_18")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [w("w13", (8, 4, 3, 3)), w("w15", (8, 8, 3, 3)), w("w16", (8, 4, 1, 1))])
    model_path = tmp_path / "block.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    assert main(["fusion", str(DUMPS / "resnet18-a100-fp32.graph.json"), "--onnx", str(model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mapped_from_onnx"] and [(a["add"], a["conv"], a["conv_role"]) for a in data["adds"]] == [
        ("Add_17", "Conv_16", "projection")]


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["fusion", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[1, 2")
    assert main(["fusion", str(tmp_path / "x.json")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_plan_argument_is_checked_and_needs_tensorrt(tmp_path, capsys):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    assert main(["fusion", str(plan)]) == 2
    assert "no sidecar" in capsys.readouterr().err
    if cuda_util._find_spec("tensorrt") and cuda_util.cuda_device_status()[0]:
        pytest.skip("TensorRT is present here")
    side = cuda_util.Sidecar(plan_sha256=hashlib.sha256(b"engine").hexdigest(), tensorrt_version="10.9.0", gpu_name="x",
                             compute_capability="9.0", precision="fp32", profile={}, onnx_sha256="0", build_seconds=1.0)
    cuda_util.sidecar_path(plan).write_text(json.dumps(side.to_json()))
    assert main(["fusion", str(plan)]) == 2
    assert "TensorRT backend is unavailable" in capsys.readouterr().err
