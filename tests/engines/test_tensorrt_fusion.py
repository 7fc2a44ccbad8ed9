"""The TensorRT fusion report on NVIDIA's own engine-inspector dumps of a ResNet-18 (tests/data/tensorrt-engine-layers).

Expectations are derived from the raw JSON (layer counts, kernels, names), not copied from the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from resdeploy.errors import InputError
from resdeploy.engines.tensorrt_fusion import (constituent_names, fusion_report, is_add_name, is_conv_name, load_layer_info, normalize_dtype,
                                         parse_layer_info)

DUMPS = Path(__file__).resolve().parent.parent / "data" / "tensorrt-engine-layers"
VARIANTS = ["fp32", "fp16", "qat", "qat-residual", "qat-residual-qgap"]
RESNET18_RESIDUAL_ADDS = 8  # 4 stages x 2 BasicBlocks


def _raw(variant: str) -> dict:
    return json.loads((DUMPS / f"resnet18-a100-{variant}.graph.json").read_text())


def _report(variant: str):
    path = DUMPS / f"resnet18-a100-{variant}.graph.json"
    return fusion_report(load_layer_info(path), source=str(path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_shipped_dump_parses(variant):
    raw = _raw(variant)
    layers = load_layer_info(DUMPS / f"resnet18-a100-{variant}.graph.json")
    assert len(layers.layers) == len(raw["Layers"])
    assert layers.io_tensors == tuple(raw["Bindings"])
    assert layers.schema == "bindings" and layers.detailed
    report = _report(variant)
    assert len(report.adds) == RESNET18_RESIDUAL_ADDS
    assert sum(report.dtype_counts.values()) == report.layer_count == len(raw["Layers"])
    reformats = sum(l["Name"].startswith("Reformatting CopyNode") or l.get("Origin") == "REFORMAT" for l in raw["Layers"])
    assert report.reformat_count == reformats
    for a in report.adds:
        assert a.add in a.layer.split(" + ")
        assert a.tactic and a.dtype in ("FP32", "FP16", "INT8")


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_fp32_fp16_all_adds_fused_into_the_right_conv(variant):
    report = _report(variant)
    assert report.all_fused and report.fused_count == RESNET18_RESIDUAL_ADDS and not report.warnings
    kernels = {l["Name"]: tuple(l.get("Kernel", ())) for l in _raw(variant)["Layers"]}
    for a in report.adds:
        assert a.layer_type == "CaskConvolution"
        # ResNet-18's projection shortcut is the 1x1 conv; the branch ends in a 3x3 conv.
        assert a.conv_role == ("projection" if kernels[a.layer] == (1, 1) else "branch"), a
    assert sum(a.conv_role == "projection" for a in report.adds) == 3  # layer2.0, layer3.0, layer4.0
    assert {a.dtype for a in report.adds} == {variant.upper()}


def test_int8_dumps_show_what_nvidia_built():
    """QAT without quantized residuals fuses the downsample blocks' Add into the projection conv (FP16 out,
    INT8 conv input); with quantized residuals every Add goes into the branch conv2 (INT8 out except the last)."""
    qat = _report("qat")
    assert qat.all_fused
    for a in qat.adds:
        assert a.conv_role == ("projection" if "downsample" in a.layer else "branch")
        assert a.dtype == "FP16" and a.input_dtypes[0] == "INT8"
    for variant in ("qat-residual", "qat-residual-qgap"):
        r = _report(variant)
        assert r.all_fused
        assert all(a.conv_role == "branch" and ".conv2.weight" in a.layer for a in r.adds)
        assert sum(a.dtype == "INT8" for a in r.adds) >= RESNET18_RESIDUAL_ADDS - 1
        assert "INT8" in r.dtype_counts


def _to_trt11(raw: dict) -> dict:
    """TensorRT 11 schema: I/O Tensors objects, Format and DataType split; exporter names /mN/Op (newer exporters)."""
    text = re.sub(r"\b(Conv|Add|Relu|MaxPool|GlobalAveragePool|Gemm)_(\d+)\b", r"/m\2/\1", json.dumps(raw))
    doc = json.loads(text)

    def split(t):
        fd = t.pop("Format/Datatype")
        dtype = normalize_dtype(fd)
        t["Format"] = re.sub(r"\s+", " ", fd.replace(dtype, "").replace("FP32", "")).strip()
        t["DataType"] = {"FP32": "Float", "FP16": "Half"}.get(dtype, dtype)

    for layer in doc["Layers"]:
        for t in layer["Inputs"] + layer["Outputs"]:
            split(t)
    doc["I/O Tensors"] = [{"Name": n, "IOMode": "INPUT" if i == 0 else "OUTPUT"} for i, n in enumerate(doc.pop("Bindings"))]
    return doc


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_tensorrt11_schema_with_path_names(variant):
    original = _report(variant)
    doc = _to_trt11(_raw(variant))
    assert "Bindings" not in doc and "Format/Datatype" not in json.dumps(doc)
    layers = parse_layer_info(json.dumps(doc), source="trt11")
    assert layers.schema == "io-tensors" and len(layers.layers) == original.layer_count
    report = fusion_report(layers)
    assert [a.add for a in report.adds] == [re.sub(r"Add_(\d+)", r"/m\1/Add", a.add) for a in original.adds]
    assert [a.conv_role for a in report.adds] == [a.conv_role for a in original.adds]
    assert [a.dtype for a in report.adds] == [a.dtype for a in original.adds]
    assert report.dtype_counts == original.dtype_counts


def test_layer_names_only_and_trtexec_list_forms():
    names = [l["Name"] for l in _raw("fp32")["Layers"]]
    r = fusion_report(parse_layer_info({"Layers": names, "Bindings": ["input.1", "191"]}))
    assert r.schema == "names-only" and not r.detailed
    assert r.fused_count == RESNET18_RESIDUAL_ADDS and any("DETAILED" in n for n in r.notes)
    # trtexec's list form with a leading count record
    listed = [{"count": 1}] + _raw("fp16")["Layers"]
    r2 = fusion_report(parse_layer_info(listed))
    assert r2.schema == "list" and r2.fused_count == RESNET18_RESIDUAL_ADDS


def test_only_profile_zero_layers_are_read():
    raw = _raw("fp32")
    extra = json.loads(json.dumps(raw["Layers"]))
    for layer in extra:
        layer["Name"] += " [profile 1]"
    doc = {"Layers": raw["Layers"] + extra, "Bindings": raw["Bindings"] + [b + " [profile 1]" for b in raw["Bindings"]]}
    assert len(parse_layer_info(doc).layers) == len(raw["Layers"])
    assert len(parse_layer_info(doc, profile=1).layers) == len(raw["Layers"])
    assert len(fusion_report(parse_layer_info(doc)).adds) == RESNET18_RESIDUAL_ADDS


def _layer(name, ltype, ins, outs, dtype="FP16", **kw):
    fmt = f"Row major linear {dtype}"
    return {"Name": name, "LayerType": ltype, "Inputs": [{"Name": i, "Dimensions": [1, 8, 4, 4], "Format/Datatype": fmt} for i in ins],
            "Outputs": [{"Name": o, "Dimensions": [1, 8, 4, 4], "Format/Datatype": fmt} for o in outs], **kw}


def test_standalone_and_myelin_adds_are_warned():
    doc = {"Layers": [
        _layer("Conv_1", "CaskConvolution", ["x"], ["a"], ParameterType="Convolution", Kernel=[3, 3]),
        _layer("PWN(Add_2, Relu_3)", "PointWiseV2", ["a", "x"], ["b"]),
        _layer("{ForeignNode[Conv_4...Relu_9]}", "Myelin", ["b"], ["y"]),
    ], "Bindings": ["x", "y"]}
    layers = parse_layer_info(doc)
    r = fusion_report(layers)
    assert [(a.add, a.status) for a in r.adds] == [("Add_2", "standalone")]
    assert "standalone" in r.warnings[0] and not r.all_fused
    assert any("Myelin" in n for n in r.notes)
    # With the model's adds: one inside the Myelin region is not visible by name.
    r2 = fusion_report(layers, [{"node": "Add_2", "kind": "identity"}, {"node": "Add_7", "kind": "identity"}])
    assert [a.status for a in r2.adds] == ["standalone", "not-found"]
    assert "ForeignNode" in r2.adds[1].warning
    text = str(r2)
    assert "warning: Add_2" in text and "warning: Add_7" in text


def test_name_helpers():
    assert constituent_names("PWN(PWN(Add_6), Relu_7)") == ["Add_6", "Relu_7"]
    assert constituent_names("fc.weight + Gemm_257 + (Unnamed Layer* 306) [Shuffle]")[-1] == "(Unnamed Layer* 306) [Shuffle]"
    assert constituent_names("{ForeignNode[/layer1/Conv.../layer4/Add]}") == ["/layer1/Conv", "/layer4/Add"]
    assert [n for n in ("Add_6", "/layer1/layer1.0/Add", "/layer1/layer1.0/Add_1", "node_add_3", "add")
            if is_add_name(n)] == ["Add_6", "/layer1/layer1.0/Add", "/layer1/layer1.0/Add_1", "node_add_3", "add"]
    assert not any(is_add_name(n) for n in ("AddConst", "(Unnamed Layer* 307) [ElementWise]", "Relu_7", "onnx::Add_210x"))
    assert all(is_conv_name(n) for n in ("Conv_5", "/layer1/layer1.0/conv1/Conv", "node_conv2d_1", "Gemm_48"))
    assert not any(is_conv_name(n) for n in ("Relu_7", "node_add_20", "/layer1/Add"))
    assert normalize_dtype("Thirty-two wide channel vectorized row major Int8 format") == "INT8"
    assert normalize_dtype("Half") == "FP16" and normalize_dtype(None) == ""


@pytest.mark.parametrize("doc, fragment", [
    ("not json", "not JSON"), ({"Bindings": []}, "no \"Layers\""), ({"Layers": []}, "no layers"), (42, "JSON int"),
])
def test_bad_input_is_refused(doc, fragment):
    with pytest.raises(InputError, match=re.escape(fragment)):
        parse_layer_info(doc if isinstance(doc, str) else json.loads(json.dumps(doc)))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_layer_info(tmp_path / "nope.json")


def projection_block_onnx():
    """ONNX of ResNet-18's layer2.0 with the legacy exporter's node names (as in the shipped dumps)."""
    rng = np.random.default_rng(0)
    w = lambda n, s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["input.40", "w13"], ["t13"], name="Conv_13", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["t13"], ["onnx::Conv_143"], name="Relu_14"),
             helper.make_node("Conv", ["onnx::Conv_143", "w15"], ["onnx::Add_210"], name="Conv_15", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["input.40", "w16"], ["t16"], name="Conv_16", strides=[2, 2]),
             helper.make_node("Add", ["onnx::Add_210", "t16"], ["t17"], name="Add_17"),
             helper.make_node("Relu", ["t17"], ["input.60"], name="Relu_18")]
    graph = helper.make_graph(nodes, "layer2_0", [helper.make_tensor_value_info("input.40", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("input.60", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [w("w13", (8, 4, 3, 3)), w("w15", (8, 8, 3, 3)), w("w16", (8, 4, 1, 1))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_mapping_with_stand_in_adds():
    """A stand-in for the skip-add check's records: the conv role comes from the ONNX operands."""
    model = projection_block_onnx()
    adds = [{"node": "Add_17", "branch_input": "onnx::Add_210", "shortcut_input": "t16", "kind": "projection", "block": "layer2.0"}]
    r = fusion_report(load_layer_info(DUMPS / "resnet18-a100-fp16.graph.json"), adds, model)
    (a,) = r.adds
    assert (a.layer, a.status, a.conv, a.conv_role, a.kind, a.block) == (
        "Conv_16 + Add_17 + Relu_18", "fused", "Conv_16", "projection", "projection", "layer2.0")
    assert r.mapped_from_onnx


def test_onnx_mapping_with_the_skip_add_check():
    skipadd = pytest.importorskip("resdeploy.export.skipadd")
    model = projection_block_onnx()
    adds = skipadd.find_residual_adds(model)
    assert [a.node for a in adds] == ["Add_17"]
    r = fusion_report(load_layer_info(DUMPS / "resnet18-a100-fp32.graph.json"), adds, model)
    assert [(a.add, a.status, a.conv, a.conv_role) for a in r.adds] == [("Add_17", "fused", "Conv_16", "projection")]
