"""The skip-add check on the trained resnet20: topology found, defects built by graph surgery each caught at
the right block, and no false alarms on graphs rewritten correctly (ORT optimizer, Q/DQ quantizer,
option A as a 0/1 conv)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from resdeploy.export import check_skip_adds, find_residual_adds, trace_residual_adds

BLOCKS = ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer3.0", "layer3.1", "layer3.2"]


@pytest.fixture(scope="module")
def r20(r20_onnx):
    return onnx.load(str(r20_onnx))


def _check(proto, trained_resnet20, r20_images, n=2):
    return check_skip_adds(proto, trained_resnet20[0], r20_images[:n])


def test_finds_the_declared_topology(r20, trained_resnet20):
    adds = find_residual_adds(r20)
    declared = trained_resnet20[0].residual_blocks()
    assert [a.kind for a in adds] == [b.kind for b in declared]
    assert [a.shape for a in adds] == [(16, 28, 28)] * 3 + [(32, 14, 14)] * 3 + [(64, 7, 7)] * 3
    assert all(a.well_formed for a in adds), [a.problems for a in adds]
    # Each block forks from the previous block's output (after its ReLU); the first from the stem.
    assert adds[0].fork_after == "input" and adds[0].convs_before_fork == 1
    assert [a.fork_after for a in adds[1:]] == [a.node for a in adds[:-1]]
    assert all(a.shortcut_input == a.fork for a in adds if a.kind == "identity")
    assert adds[3].shortcut_input != adds[3].fork and adds[3].shortcut_convs == 0


def test_torch_side_matches_declaration(trained_resnet20, r20_images):
    import torch

    model = trained_resnet20[0]
    traced = trace_residual_adds(model, torch.from_numpy(r20_images[:1]))
    assert [(t.block, t.kind) for t in traced] == [(b.path, b.kind) for b in model.residual_blocks()]
    assert [t.branch_convs for t in traced] == [2] * 9


def test_passes_with_reference_and_numbers(r20_onnx, trained_resnet20, r20_images):
    report = check_skip_adds(r20_onnx, trained_resnet20[0], r20_images[:2])
    assert report, str(report)
    assert [r.block for r in report.rows] == BLOCKS
    assert all(r.status == "ok" and r.rel_err is not None and r.rel_err < 1e-4 for r in report.rows), str(report)
    assert report.first_divergent is None
    data = json.loads(report.to_json())
    assert data["passed"] and data["residual_adds"] == 9 and len(data["rows"]) == 9
    text = str(report)
    assert "layer2.0" in text and "option_a" in text and "PASSED" in text


def test_no_reference_validates_only(r20):
    report = check_skip_adds(r20)
    assert report and not report.reference and len(report.rows) == 9


def _first(report):
    assert not report, str(report)
    return report.defects[0]


@pytest.mark.parametrize("k", [1, 6])
def test_removed_skip_names_its_block(r20, surgery, trained_resnet20, r20_images, k):
    report = _check(surgery.remove_skip(r20, k), trained_resnet20, r20_images)
    d = _first(report)
    assert d.block == BLOCKS[k] and "no residual Add" in d.message
    assert report.first_divergent == BLOCKS[k + 1]  # the next block is the first with an Add to compare


def test_skip_from_previous_block_input(r20, surgery, trained_resnet20, r20_images):
    broken = surgery.set_shortcut(r20, 2, surgery.fork(r20, 1))
    d = _first(_check(broken, trained_resnet20, r20_images))
    assert d.block == "layer1.2" and d.node == surgery.adds(broken)[2].name
    assert "expected" in d.message
    # Without a reference the Add is ill-formed on its own: its branch runs through block 1.1's Add.
    alone = check_skip_adds(broken)
    assert not alone and any("other residual merge" in d.message for d in alone.defects), str(alone)


def test_skip_from_inside_the_branch(r20, surgery, trained_resnet20, r20_images):
    add = surgery.adds(r20)[4]
    branch, _ = surgery.branch_and_shortcut(r20, add)
    inside = surgery.producer(r20, branch).input[0]  # relu(conv1(x)) of layer2.1
    report = _check(surgery.set_shortcut(r20, 4, inside), trained_resnet20, r20_images)
    assert _first(report).block == "layer2.1"
    assert any("skip taken from" in d.message and d.block == "layer2.1" for d in report.defects), str(report)


@pytest.mark.parametrize("op", ["Mul", "Sub"])
def test_add_turned_into_other_op(r20, surgery, trained_resnet20, r20_images, op):
    d = _first(_check(surgery.change_op(r20, 5, op), trained_resnet20, r20_images))
    assert d.block == "layer2.2" and op in d.message


def test_extra_add(r20, surgery, trained_resnet20, r20_images):
    report = _check(surgery.extra_add(r20, 7), trained_resnet20, r20_images)
    d = _first(report)
    assert d.block == "layer3.1" and d.node == "extra_add" and "extra" in d.message


def test_skip_bypassing_two_blocks(r20, surgery, trained_resnet20, r20_images):
    broken = surgery.bypass_two(r20, 2)
    report = _check(broken, trained_resnet20, r20_images)
    blocks = {d.block for d in report.defects}
    assert not report and {"layer1.1", "layer1.2"} <= blocks, str(report)
    assert report.defects[0].block == "layer1.1"


def _ort_optimize(src, dst, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3  # ENABLE_ALL warns that NCHWc graphs are machine specific
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


@pytest.mark.parametrize("level,fused_op", [("ORT_ENABLE_EXTENDED", "FusedConv"), ("ORT_ENABLE_ALL", "Conv")])
def test_no_false_alarm_after_ort_optimizer(r20, r20_onnx, trained_resnet20, r20_images, tmp_path, surgery,
                                            level, fused_op):
    opt = _ort_optimize(r20_onnx, tmp_path / "opt.onnx", level)
    # The optimizer really rewrote it (ENABLE_ALL even folds Adds into NCHWc convs as their "Sum" input).
    assert any(n.op_type == fused_op and n.domain.startswith("com.microsoft") for n in opt.graph.node)
    report = _check(opt, trained_resnet20, r20_images)
    assert report, str(report)
    assert [r.block for r in report.rows] == BLOCKS
    # ...and still catches a removed skip after the rewrite.
    onnx.save(surgery.remove_skip(r20, 1), str(tmp_path / "broken.onnx"))
    broken = _check(_ort_optimize(tmp_path / "broken.onnx", tmp_path / "broken_opt.onnx", level), trained_resnet20,
                    r20_images)
    assert not broken and broken.defects[0].block == "layer1.1", str(broken)


@pytest.mark.parametrize("fmt,per_channel,symmetric_activations",
                         [("QDQ", True, True), ("QDQ", False, False), ("QOperator", True, False)])
def test_no_false_alarm_after_quantization(r20, r20_onnx, trained_resnet20, r20_images, mnist, tmp_path, surgery,
                                           fmt, per_channel, symmetric_activations):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from resdeploy.models import normalize

    spec = trained_resnet20[0].input_spec
    calib = normalize(mnist.val.images[:16], spec.mean, spec.std)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 4]} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.it, None)

    def quantize(src, out):
        quantize_static(str(src), str(out), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                        activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": symmetric_activations})

    out = tmp_path / "q.onnx"
    quantize(r20_onnx, out)
    q = onnx.load(str(out))
    if fmt == "QDQ":
        assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 9
    else:
        assert sum(n.op_type == "QLinearAdd" for n in q.graph.node) == 9
    report = check_skip_adds(out, trained_resnet20[0], r20_images[:2])
    assert report and report.quantized, str(report)
    assert [r.block for r in report.rows] == BLOCKS
    assert all(r.cosine is not None and r.cosine > 0.95 for r in report.rows), str(report)
    if fmt == "QDQ" and per_channel:
        # A defect stays visible through quantization: layer2.1's skip removed before quantizing.
        onnx.save(surgery.remove_skip(r20, 4), str(tmp_path / "broken.onnx"))
        quantize(tmp_path / "broken.onnx", tmp_path / "broken_q.onnx")
        broken = check_skip_adds(tmp_path / "broken_q.onnx", trained_resnet20[0], r20_images[:2])
        assert not broken and broken.defects[0].block == "layer2.1", str(broken)


def test_option_a_as_selection_conv(r20, surgery, trained_resnet20, r20_images):
    rewritten = surgery.option_a_as_conv(r20)
    assert not any(n.op_type == "Pad" for n in rewritten.graph.node)
    adds = find_residual_adds(rewritten)
    assert [a.kind for a in adds] == [b.kind for b in trained_resnet20[0].residual_blocks()]
    report = _check(rewritten, trained_resnet20, r20_images)
    assert report, str(report)


def test_float16_graph_judged_at_float16_tolerance(r20_onnx, r20, surgery, trained_resnet20, r20_images, tmp_path):
    """A float16 graph's adds drift past 1e-3 of their magnitude in deep trained nets (float16 rounds at 5e-4 per
    op): a branch conv's weights off by 0.4 %, as such drift makes them, still passes, while a removed skip fails."""
    from onnx import numpy_helper

    from resdeploy.export.precision import fp16_variant
    from resdeploy.export.numeric import FLOAT_RTOL, LOW_PRECISION_RTOL

    fp16 = tmp_path / "fp16.onnx"
    fp16_variant(r20_onnx, fp16)
    m = onnx.load(str(fp16))
    producers = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.op_type == "Add" and all(i in producers for i in n.input))
    conv = next(producers[i] for i in add.input if producers[i].op_type == "Conv")  # layer1.0's branch conv
    w = next(t for t in m.graph.initializer if t.name == conv.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float16(1.004), w.name))
    report = check_skip_adds(m, trained_resnet20[0], r20_images[:2])
    worst = max(r.rel_err for r in report.rows if r.rel_err is not None)
    assert FLOAT_RTOL < worst < LOW_PRECISION_RTOL and report, str(report)
    onnx.save(surgery.remove_skip(onnx.load(str(fp16)), 4), str(tmp_path / "broken.onnx"))
    broken = check_skip_adds(tmp_path / "broken.onnx", trained_resnet20[0], r20_images[:2])
    assert not broken and broken.defects[0].block == "layer2.1", str(broken)
