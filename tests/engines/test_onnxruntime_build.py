"""ONNX Runtime build: artifacts, the optimised graph, and the fusion report of every residual Add."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from resdeploy.atomic import sha256_file
from resdeploy.errors import InputError
from resdeploy.export.calibration import CalibrationSet
from resdeploy.engines.onnxruntime_build import (
    BUILD_JSON, MODEL_NAME, OPTIMIZED_NAME, REPORT_JSON, REPORT_TXT, build_onnxruntime, fusion_report,
)
from resdeploy.artifact import load_onnx, save_onnx
from resdeploy.export.precision import quantize_int8, residual_adds
from resdeploy.export.shortcut_rewrite import rewrite_option_a


def _sum_input(node: onnx.NodeProto) -> str:
    """The 4th input of ORT's contrib convs (NCHWc Conv "Sum", FusedConv "Z"): a residual Add inside the conv."""
    if node.op_type in ("Conv", "FusedConv", "NhwcFusedConv") and node.domain.startswith("com.microsoft"):
        return node.input[3] if len(node.input) > 3 else ""
    return ""


def _adds(path) -> list:
    """The residual Adds the pipeline hands the build: the short-path check's finder (export stage)."""
    return residual_adds(load_onnx(path))


def _assert_consistent(report, optimized: onnx.ModelProto) -> None:
    """Every Add classified from what the optimised graph really holds."""
    by_name = {n.name: n for n in optimized.graph.node}
    for a in report.adds:
        assert a.form != "unknown", report
        node = by_name[a.into]
        if a.form == "conv_sum":
            assert "Conv" in node.op_type and _sum_input(node), (a, node)
        elif a.form == "standalone":
            assert node.op_type == "Add", (a, node)
        elif a.form == "qlinear_add":
            assert node.op_type == "QLinearAdd", (a, node)
    convs_with_sum = [n for n in optimized.graph.node if _sum_input(n)]
    assert len(convs_with_sum) == sum(a.form == "conv_sum" for a in report.adds)


@pytest.fixture(scope="module")
def r20_build(r20_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("ortbuild")
    return build_onnxruntime(r20_onnx, out, adds=_adds(r20_onnx), threads=1), out


def test_build_writes_checked_artifacts(r20_build, r20_onnx):
    report, out = r20_build
    for name in (MODEL_NAME, OPTIMIZED_NAME, REPORT_JSON, REPORT_TXT, BUILD_JSON):
        assert (out / name).is_file(), name
    build = json.loads((out / BUILD_JSON).read_text())
    assert build["model_sha256"] == sha256_file(r20_onnx) == sha256_file(out / MODEL_NAME)
    assert build["optimized_sha256"] == sha256_file(out / OPTIMIZED_NAME)
    assert build["precision"] == "fp32" and build["providers"][0] == "CPUExecutionProvider"
    assert build["options"]["optimization"] == "all"
    # At ORT_ENABLE_ALL on x86 the NCHWc layout nodes make the saved graph machine-specific: recorded.
    assert build["optimized_portable"] is False and "this CPU type" in build["optimized_note"]
    assert report.rel_diff <= 1e-3
    saved = json.loads((out / REPORT_JSON).read_text())
    assert saved["summary"]["residual_adds"] == len(report.fusion.adds)
    assert str(report.fusion) + "\n" == (out / REPORT_TXT).read_text()


def test_fusion_report_resnet20_fp32(r20_build, trained_resnet20):
    report, out = r20_build
    fusion = report.fusion
    blocks = trained_resnet20[0].residual_blocks()
    assert len(fusion.adds) == len(blocks)
    assert [a.kind for a in fusion.adds] == [b.kind for b in blocks]
    _assert_consistent(fusion, onnx.load(str(out / OPTIMIZED_NAME)))
    # Measured behaviour of ORT's NCHWc transformer: identity Adds before the first option-A shortcut fuse with
    # their Relu; the option-A Adds (Slice+Pad operand) stay standalone.
    first_a = next(i for i, a in enumerate(fusion.adds) if a.kind == "option_a")
    assert first_a > 0 and all(a.form == "conv_sum" and a.activation == "Relu" for a in fusion.adds[:first_a])
    assert all(a.form == "standalone" for a in fusion.adds if a.kind == "option_a")


def test_option_a_rewrite_is_exact_and_lets_every_add_fuse(r20_onnx, trained_resnet20, r20_images, tmp_path):
    from resdeploy.export import check_skip_adds

    model, rep = rewrite_option_a(load_onnx(r20_onnx))
    n_option_a = sum(b.kind == "option_a" for b in trained_resnet20[0].residual_blocks())
    assert len(rep.rewritten) == n_option_a and rep.max_abs_diff == 0.0, rep
    assert not any(n.op_type in ("Pad", "Slice") for n in model.graph.node)
    skip = check_skip_adds(model, trained_resnet20[0], r20_images[:2])
    assert skip and [a.kind for a in skip.adds].count("option_a") == n_option_a, skip
    src = tmp_path / "rw.onnx"
    save_onnx(model, src)
    report = build_onnxruntime(src, tmp_path / "build", adds=_adds(src), threads=1)
    assert report.fusion.fused == len(report.fusion.adds) == len(trained_resnet20[0].residual_blocks()), report.fusion
    _assert_consistent(report.fusion, onnx.load(str(tmp_path / "build" / OPTIMIZED_NAME)))


def test_fusion_report_int8_u8s8_uses_qlinear_add(r20_onnx, trained_resnet20, mnist, tmp_path):
    from resdeploy.models import normalize

    spec = trained_resnet20[0].input_spec
    cal = CalibrationSet(normalize(mnist.val.images[:64], spec.mean, spec.std), "mnist", "val", mnist.fingerprint)
    q = tmp_path / "u8.onnx"
    quantize_int8(r20_onnx, q, cal, flavour="u8s8")
    report = build_onnxruntime(q, tmp_path / "b", adds=_adds(q), threads=1)
    assert report.precision == "int8" and report.int8_flavour == "u8s8"
    assert report.fusion.by_form() == {"qlinear_add": len(trained_resnet20[0].residual_blocks())}, report.fusion
    _assert_consistent(report.fusion, onnx.load(str(tmp_path / "b" / OPTIMIZED_NAME)))


def test_an_add_that_cannot_be_attributed_is_unknown(r20_build, r20_onnx):
    report, out = r20_build
    source = load_onnx(r20_onnx)
    optimized = onnx.load(str(out / OPTIMIZED_NAME))
    fused = next(a for a in report.fusion.adds if a.form == "conv_sum")
    for n in optimized.graph.node:
        if n.name == fused.into:
            n.name = "renamed_by_someone"
    again = fusion_report(source, optimized, residual_adds(source))
    row = next(a for a in again.adds if a.node == fused.node)
    assert row.form == "unknown" and not row.fused
    assert any("matched no residual Add" in n for n in again.notes)


def test_build_refuses_bad_options(r20_onnx, tmp_path):
    with pytest.raises(InputError, match="optimization"):
        build_onnxruntime(r20_onnx, tmp_path, adds=_adds(r20_onnx), optimization="max")
    with pytest.raises(InputError, match="does not exist"):
        build_onnxruntime(tmp_path / "missing.onnx", tmp_path, adds=[])
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="session")
def resnet50_onnx(tmp_path_factory):
    """resnet50 with seeded random weights, exported once (TorchScript exporter: BN folded, fast), batch 1."""
    import torch

    from resdeploy.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    path = tmp_path_factory.mktemp("r50") / "resnet50.onnx"
    x = torch.randn(1, *model.input_spec.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter: fast, folds BN in eval mode
        torch.onnx.export(model, x, str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path, model


def test_fusion_report_resnet50_fuses_every_residual_add(resnet50_onnx, tmp_path):
    path, model = resnet50_onnx
    sample = {"input": np.random.default_rng(0).standard_normal((1, *model.input_spec.shape)).astype(np.float32)}
    report = build_onnxruntime(path, tmp_path, adds=_adds(path), threads=2, sample=sample)
    fusion = report.fusion
    assert len(fusion.adds) == len(model.residual_blocks())
    assert fusion.fused == len(fusion.adds) and fusion.by_form() == {"conv_sum": len(fusion.adds)}, fusion
    assert all(a.activation == "Relu" for a in fusion.adds)
    _assert_consistent(fusion, onnx.load(str(tmp_path / OPTIMIZED_NAME)))
    assert {a.kind for a in fusion.adds} == {b.kind for b in model.residual_blocks()}  # identity + projection
