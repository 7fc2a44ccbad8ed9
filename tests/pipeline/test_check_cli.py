"""`resdeploy check`: report table / JSON, defects exit 1 naming the block, unreadable input exits 2."""

from __future__ import annotations

import json

import onnx
import pytest

from resdeploy.pipeline.cli import main


@pytest.fixture(scope="module")
def exported(trained_resnet20_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "resnet20.onnx"
    assert main(["export", str(trained_resnet20_dir), "--out", str(out), "--images", "4", "--no-check"]) == 0
    return out


def test_check_with_reference_passes(exported, trained_resnet20_dir, capsys):
    assert main(["check", str(exported), "--reference", str(trained_resnet20_dir)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "layer3.2" in out and "option_a" in out


def test_check_json(exported, trained_resnet20_dir, capsys):
    assert main(["check", str(exported), "--reference", str(trained_resnet20_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["numeric"] and [r["block"] for r in data["rows"]][3] == "layer2.0"
    assert data["residual_adds"] == 9 and data["short_paths"] == 9
    assert data["kinds"] == {"add": 9, "scaled_add": 0, "concat": 0, "gated_add": 0, "mean_join": 0}


def test_check_without_reference_prints_topology(exported, capsys):
    assert main(["check", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "no reference" in out and out.count("identity") == 7


def test_defect_exits_1_naming_the_block(exported, trained_resnet20_dir, tmp_path, capsys):
    m = onnx.load(str(exported))
    inits = {t.name for t in m.graph.initializer}
    adds = [n for n in m.graph.node if n.op_type == "Add" and not set(n.input) & inits]
    adds[4].op_type = "Sub"  # layer2.1
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    assert main(["check", str(bad), "--reference", str(trained_resnet20_dir), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert not data["passed"] and data["defects"][0]["block"] == "layer2.1" and "Sub" in data["defects"][0]["message"]


def test_unreadable_input_exits_2(tmp_path, trained_resnet20_dir, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    assert main(["check", str(junk)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "none.onnx")]) == 2
