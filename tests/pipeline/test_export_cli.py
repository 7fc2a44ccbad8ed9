"""`resdeploy export`: the trained checkpoint end to end, metadata, exit codes."""

from __future__ import annotations

import json

import onnx
import pytest

from resdeploy import __version__
from resdeploy.atomic import sha256_file
from resdeploy.pipeline.cli import main


@pytest.fixture(scope="module")
def exported(trained_resnet20_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "resnet20.onnx"
    rc = main(["export", str(trained_resnet20_dir), "--out", str(out), "--images", "8"])
    return rc, out


def test_export_writes_checked_model_with_metadata(exported, trained_resnet20_dir, trained_resnet20):
    rc, out = exported
    assert rc == 0 and out.is_file()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["architecture"] == "resnet20"
    assert json.loads(meta["input_spec"]) == trained_resnet20[0].input_spec.to_dict()
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)]
    assert meta["checkpoint_sha256"] == sha256_file(trained_resnet20_dir / "model.safetensors")
    assert meta["resdeploy_version"] == __version__ and meta["exporter"] == "dynamo"


def test_export_json(trained_resnet20_dir, tmp_path, capsys):
    rc = main(["export", str(trained_resnet20_dir), "--out", str(tmp_path / "m.onnx"), "--images", "4", "--json",
               "--exporter", "torchscript"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["exporter"] == "torchscript" and data["opset"] == 18
    assert data["parity"]["top1_agreement"] == 1.0 and data["parity"]["images"] == 4
    assert data["check"]["passed"] and data["check"]["residual_adds"] == 9


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bare = tmp_path / "w.pt"
    import torch

    torch.save({"w": torch.zeros(1)}, bare)
    assert main(["export", str(bare), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--arch" in capsys.readouterr().err


def test_failed_check_exits_1(trained_resnet20_dir, tmp_path, capsys):
    rc = main(["export", str(trained_resnet20_dir), "--out", str(tmp_path / "m.onnx"), "--atol", "0", "--images", "2"])
    assert rc == 1 and "parity" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
