"""`resdeploy quantize` and `resdeploy build` end to end on the trained resnet20 (in-process CLI)."""

from __future__ import annotations

import json

import pytest

from resdeploy.pipeline.cli import main


@pytest.fixture(scope="module")
def exported(trained_resnet20_dir, tmp_path_factory):
    """The trained resnet20 through `resdeploy export` (metadata with its input spec)."""
    out = tmp_path_factory.mktemp("cli") / "resnet20.onnx"
    assert main(["export", str(trained_resnet20_dir), "--out", str(out), "--no-check"]) == 0
    return out


@pytest.mark.parametrize("precision,extra", [("int8", []), ("int8", ["--backend", "tensorrt"]), ("fp16", [])])
def test_quantize_then_build(precision, extra, exported, trained_resnet20_dir, trained_resnet20, tmp_path, capsys):
    variant = tmp_path / f"{precision}.onnx"
    args = ["quantize", str(exported), "--precision", precision, "--reference", str(trained_resnet20_dir),
            "--out", str(variant), "--calibration-images", "200", "--eval-images", "500", "--threads", "1", "--json", *extra]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipadd"]["passed"] and result["skipadd"]["reference"]
    acc = result["accuracy"]
    if precision == "int8":
        want = "s8s8" if extra else "u8s8"
        assert result["flavour"] == want and ("TensorRT" in result["flavour_reason"]) == bool(extra)
        assert 100 * (acc["fp32"] - acc["variant"]) <= 1.0
        assert result["calibration"]["split"] == "val" and result["calibration"]["count"] == 200
    else:
        assert acc["agreement"] >= 0.995
    out = tmp_path / "build"
    assert main(["build", str(variant), "--backend", "onnxruntime", "--out", str(out), "--threads", "1", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["build"]["precision"] == precision
    assert built["build"]["int8_flavour"] == result["flavour"]
    fusion = built["fusion"]
    n_blocks = len(trained_resnet20[0].residual_blocks())
    assert fusion["summary"]["residual_adds"] == n_blocks == len(fusion["adds"]) and fusion["summary"]["unknown"] == 0
    assert (out / "fusion_report.txt").is_file() and (out / "model.optimized.onnx").is_file()


def test_build_with_option_a_rewrite_fuses_all_adds(exported, trained_resnet20, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["build", str(exported), "--out", str(out), "--rewrite-option-a", "--threads", "1", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    n_blocks = len(trained_resnet20[0].residual_blocks())
    assert built["fusion"]["summary"]["fused"] == built["fusion"]["summary"]["residual_adds"] == n_blocks
    assert built["build"]["shortcut_rewrite"]["max_abs_diff"] == 0.0
    assert built["build"]["source"] == str(exported)


def test_failed_gate_writes_nothing(exported, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code = main(["quantize", str(exported), "--precision", "int8", "--out", str(out), "--calibration-images", "32",
                 "--eval-images", "100", "--max-drop", "-100"])
    assert code == 1
    assert "accuracy gate" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".int8.onnx*"))


def test_quantize_refuses_a_variant_as_source(exported, tmp_path, capsys):
    fp16 = tmp_path / "fp16.onnx"
    assert main(["quantize", str(exported), "--precision", "fp16", "--out", str(fp16), "--eval-images", "50"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(fp16), "--precision", "int8", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "already a fp16 variant" in capsys.readouterr().err


def test_build_tensorrt_without_gpu_says_so(exported, tmp_path, capsys):
    from resdeploy.device import cuda_device_present

    if cuda_device_present():
        pytest.skip("a CUDA device is present: this test checks the refusal without one")
    code = main(["build", str(exported), "--backend", "tensorrt", "--out", str(tmp_path / "m.plan")])
    err = capsys.readouterr().err
    assert code == 2 and "tensorrt" in err.lower()
    assert not (tmp_path / "m.plan").exists()
