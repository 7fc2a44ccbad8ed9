"""FP16 and INT8 (Q/DQ, both flavours) variants of the trained resnet20: graph checks, metadata, skip adds, accuracy."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest

from resdeploy.errors import CheckFailed, InputError
from resdeploy.export import check_skip_adds
from resdeploy.export.calibration import CalibrationSet
from resdeploy.artifact import load_onnx, read_metadata
from resdeploy.export.precision import (
    Int8Config, check_int8_graph, convert_fp16, flavour_for_backend, fp16_variant, quantize_int8, residual_adds,
)

CAL_IMAGES = 300  # val images: enough for MinMax on MNIST, keeps the test quick


def _norm(model, images):
    from resdeploy.models import normalize

    return normalize(images, model.input_spec.mean, model.input_spec.std)


def _top1(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0].argmax(1)


@pytest.fixture(scope="module")
def test_split(trained_resnet20, mnist):
    return _norm(trained_resnet20[0], mnist.test.images), mnist.test.labels


@pytest.fixture(scope="module")
def calibration(trained_resnet20, mnist):
    return CalibrationSet(_norm(trained_resnet20[0], mnist.val.images[:CAL_IMAGES]), "mnist", "val", mnist.fingerprint)


@pytest.fixture(scope="module")
def int8_models(r20_onnx, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    reports = {}
    for flavour in ("u8s8", "s8s8"):
        reports[flavour] = (quantize_int8(r20_onnx, out / f"{flavour}.onnx", calibration, flavour=flavour), out / f"{flavour}.onnx")
    return reports


def test_flavour_per_engine():
    assert flavour_for_backend("onnxruntime") == "u8s8"
    assert flavour_for_backend("openvino") == "u8s8"
    assert flavour_for_backend("tensorrt") == "s8s8"
    with pytest.raises(InputError, match="no INT8 flavour known"):
        flavour_for_backend("coreml")


@pytest.mark.parametrize("flavour", ["u8s8", "s8s8"])
def test_int8_variant_is_quantized_checked_and_accurate(flavour, int8_models, r20_onnx, trained_resnet20, test_split, mnist):
    report, path = int8_models[flavour]
    model = trained_resnet20[0]
    g = report.graph
    assert report, report
    n_blocks = len(model.residual_blocks())
    assert g.convs > 0 and g.convs_quantized == g.convs_per_channel == g.convs, g
    assert g.residual_adds == g.residual_adds_quantized == n_blocks, g
    assert g.activation_dtypes == (("uint8",) if flavour == "u8s8" else ("int8",)), g
    if flavour == "s8s8":
        assert g.nonzero_activation_zero_points == 0
    # Both inputs of every residual Add come through DequantizeLinear, seen in the file itself.
    m = load_onnx(path)
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    adds = residual_adds(m)
    assert len(adds) == n_blocks and all(producer[i] == "DequantizeLinear" for a in adds for i in a.inputs)
    meta = read_metadata(m)
    assert meta.precision == "int8" and meta.int8_flavour == flavour
    assert dict(meta.calibration) == {"data": "mnist", "split": "val", "count": CAL_IMAGES, "fingerprint": mnist.fingerprint}
    props = {p.key: p.value for p in m.metadata_props}  # the on-disk keys stay what older files and users read
    assert json.loads(props["calibration"])["count"] == CAL_IMAGES
    from resdeploy.atomic import sha256_file

    assert meta.source_sha256 == props["source_onnx_sha256"] == sha256_file(r20_onnx)
    assert meta.architecture == "resnet20"  # the source's metadata is carried over
    x, y = test_split
    skip = check_skip_adds(path, model, x[:2])
    assert skip, skip
    acc32 = float((_top1(r20_onnx, x) == y).mean())
    acc8 = float((_top1(path, x) == y).mean())
    assert 100 * (acc32 - acc8) <= 1.0, f"INT8 {flavour} accuracy {acc8:.2%} vs FP32 {acc32:.2%}"


def test_fp16_variant_keeps_io_float32_and_agrees(r20_onnx, trained_resnet20, test_split, tmp_path):
    out = tmp_path / "fp16.onnx"
    report = fp16_variant(r20_onnx, out)
    m = load_onnx(out)
    assert report.fp16.fp16_initializers > 0 and report.fp16.fp32_initializers == 0, report
    assert {i.type.tensor_type.elem_type for i in [*m.graph.input, *m.graph.output]} == {onnx.TensorProto.FLOAT}
    conv_w = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer if t.name in conv_w)
    assert read_metadata(m).precision == "fp16"
    x, _ = test_split
    assert check_skip_adds(out, trained_resnet20[0], x[:2])
    agreement = float((_top1(r20_onnx, x) == _top1(out, x)).mean())
    assert agreement >= 0.995, f"FP16 top-1 agreement with FP32 {agreement:.2%}"


def test_fp16_refuses_a_variant(int8_models):
    with pytest.raises(InputError, match="needs the FP32 model"):
        convert_fp16(load_onnx(int8_models["u8s8"][1]))


def test_check_finds_an_unquantized_residual_add(int8_models):
    m = copy.deepcopy(load_onnx(int8_models["u8s8"][1]))
    producer = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.name == residual_adds(m)[0].name)
    dq = producer[add.input[1]]
    q = producer[dq.input[0]]
    add.input[1] = q.input[0]  # the float tensor before its Q/DQ pair: the Add is no longer quantized on that side
    check = check_int8_graph(m, "u8s8")
    assert not check and check.residual_adds_quantized == check.residual_adds - 1
    assert add.name in str(check) and "1992" in str(check)


def test_check_finds_the_wrong_flavour(int8_models):
    check = check_int8_graph(load_onnx(int8_models["u8s8"][1]), "s8s8")
    assert not check and "needs int8 only" in str(check) and "non-zero zero point" in str(check)


def test_int8_refuses_mismatched_calibration_and_nothing_is_written(r20_onnx, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(InputError, match="calibration images have shape"):
        quantize_int8(r20_onnx, out, np.zeros((4, 3, 32, 32), np.float32), flavour="u8s8")
    with pytest.raises(InputError, match="float32"):
        quantize_int8(r20_onnx, out, np.zeros((4, 1, 28, 28), np.float64), flavour="u8s8")
    with pytest.raises(InputError, match="flavour"):
        quantize_int8(r20_onnx, out, np.zeros((4, 1, 28, 28), np.float32), flavour="u8u8")
    assert not out.exists()


def test_int8_fails_closed_when_the_graph_check_fails(r20_onnx, calibration, tmp_path):
    # ORT told to quantize Conv only leaves the residual Adds in float: the check must refuse the result.
    out = tmp_path / "bad.onnx"
    with pytest.raises(CheckFailed, match="residual Adds have an input that is not quantized"):
        _quantize_convs_only(r20_onnx, out, calibration)
    assert not out.exists()


def _quantize_convs_only(src, out, calibration):
    """quantize_int8 with ORT told to quantize Conv only (a misconfiguration the graph check must catch)."""
    import onnxruntime.quantization as q

    orig = q.quantize_static

    def convs_only(*a, **kw):
        kw["op_types_to_quantize"] = ["Conv"]
        return orig(*a, **kw)

    q.quantize_static = convs_only
    try:
        return quantize_int8(src, out, calibration.images[:32], flavour="s8s8")
    finally:
        q.quantize_static = orig


def test_fp16_variant_of_an_external_data_model_keeps_external_data(tmp_path):
    """A > 2 GB model (simulated: weights saved as external data) goes through the variant stage: its weights are
    read through the artifact contract's checked loader and the variant is written with its own .data file."""
    from onnx import helper, numpy_helper

    from resdeploy.artifact import open_artifact

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64) / 4096, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 64])], [w])
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "fp16.onnx"
    fp16_variant(path, out)
    art = open_artifact(out)
    assert art.external_data and [f.name for f in art.data_files] == ["fp16.onnx.data"] and art.precision == "fp16"
    w16 = next(t for t in load_onnx(out, weights=True).graph.initializer if t.name == "w")
    assert np.allclose(numpy_helper.to_array(w16).astype(np.float32), numpy_helper.to_array(w), atol=1e-3)


def test_shared_bias_through_identity_is_still_quantized(r20_onnx, calibration, tmp_path):
    # Exporters de-duplicate equal tensors and re-expose them through Identity; the conv bias must still be
    # quantized (else ORT leaves the conv out of QLinearConv), and the graph check says so when it is not.
    from onnx import helper

    m = load_onnx(r20_onnx)
    convs = [n for n in m.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    shared = convs[1].input[2]
    convs[2].input[2] = "shared_bias"
    m.graph.node.insert(0, helper.make_node("Identity", [shared], ["shared_bias"], name="dedup"))
    inits = {t.name: t for t in m.graph.initializer}
    assert inits[shared].dims == inits[convs[1].input[2]].dims
    src = tmp_path / "dedup.onnx"
    from resdeploy.artifact import save_onnx

    save_onnx(m, src)
    if tuple(inits[shared].dims) != tuple(inits[convs[2].input[1]].dims[:1]):
        pytest.skip("conv 1 and conv 2 differ in width in this export")
    report = quantize_int8(src, tmp_path / "q.onnx", calibration.images[:32], flavour="u8s8")
    assert report.graph.convs_float_bias == 0 and report, report
    q = load_onnx(tmp_path / "q.onnx")
    assert not any(n.op_type == "Identity" for n in q.graph.node)


def test_check_finds_a_float_bias(int8_models):
    from onnx import numpy_helper

    m = copy.deepcopy(load_onnx(int8_models["u8s8"][1]))
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and len(n.input) > 2)
    inits = {t.name for t in m.graph.initializer}
    w_dq = next(n for n in m.graph.node if n.output[0] == conv.input[1])
    cout = next(t for t in m.graph.initializer if t.name == w_dq.input[0]).dims[0]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(cout, np.float32), "float_bias"))
    conv.input[2] = "float_bias"
    check = check_int8_graph(m, "u8s8")
    assert "float_bias" not in inits and not check and check.convs_float_bias == 1 and "float bias" in str(check)


def test_calibration_batches_are_equal_so_histogram_calibrators_work():
    """ORT's percentile/entropy calibrators stack per-batch outputs: a ragged last batch made them fail."""
    import numpy as np

    from resdeploy.export.calibration import batches, even_batch_size

    assert even_batch_size(200, 32) == 25 and even_batch_size(128, 32) == 32 and even_batch_size(7, 32) == 7
    x = np.zeros((200, 1, 2, 2), np.float32)
    sizes = [len(b) for b in batches(x, 32)]
    assert set(sizes) == {25} and sum(sizes) == 200


def test_calibration_chunks_divide_the_batches_and_stay_within_the_budget():
    from resdeploy.export.calibration import chunk_batches

    # 500 images in batches of 25: 20 batches. 3x224x224 = 150,528 values per image, 3.76M per batch.
    assert chunk_batches(500, 32, 3 * 224 * 224) == 1
    assert chunk_batches(500, 32, 3 * 64 * 64) == 10  # 12,288 values: 341 images fit, 13 batches -> 10 divides 20
    assert chunk_batches(500, 32, 3 * 32 * 32) == 20  # everything in one chunk: ORT is fed as before
    assert chunk_batches(7, 32, 10**9) == 1


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_chunked_calibration_gives_the_ranges_of_one_pass(method, r20_onnx, calibration, tmp_path, monkeypatch):
    """A chunked pass (large models: memory bounded by one chunk) gives the scales of a single pass for MinMax,
    and a working variant for the histogram methods (their histograms are merged across chunks)."""
    from onnx import numpy_helper

    import resdeploy.export.calibration as calib

    cal = CalibrationSet(calibration.images[:64], "mnist", "val", calibration.fingerprint)
    cfg = Int8Config(method=method, batch_size=16)
    whole = quantize_int8(r20_onnx, tmp_path / "whole.onnx", cal, flavour="u8s8", config=cfg)
    monkeypatch.setattr(calib, "CHUNK_INPUT_VALUES", 16 * 28 * 28)  # one batch per chunk: 4 chunks
    ranges: list[tuple[int, int]] = []

    def spying_reader(*args, **kwargs):
        reader = calib.make_reader(*args, **kwargs)
        set_range = reader.set_range
        reader.set_range = lambda start_index, end_index: (ranges.append((start_index, end_index)), set_range(start_index, end_index))[1]
        return reader

    import resdeploy.export.precision as precision

    monkeypatch.setattr(precision, "make_reader", spying_reader)
    assert calib.chunk_batches(64, 16, int(np.prod(cal.images.shape[1:]))) == 1
    chunked = quantize_int8(r20_onnx, tmp_path / "chunked.onnx", cal, flavour="u8s8", config=cfg)
    assert ranges == [(0, 1), (1, 2), (2, 3), (3, 4)], ranges  # ORT fed the calibrator one chunk at a time
    assert whole and chunked, f"{whole}\n{chunked}"

    def scales(path):
        m = onnx.load(str(path))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_scale")}

    a, b = scales(tmp_path / "whole.onnx"), scales(tmp_path / "chunked.onnx")
    assert a.keys() == b.keys()
    if method == "minmax":
        assert all(np.array_equal(a[k], b[k]) for k in a)
