"""Zoo tier: a real torchvision network through ``resdeploy run``, as a user brings it.

* ``run --model torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}'``: trained here for one short epoch
  on scikit-learn's digits at 3x32x32, then every stage to a served-ready model repository and a report;
* ``run --onnx``: the same trained network exported in this test with torch.onnx (dynamo, a batch-2 example and a
  dynamic batch Dim), the way a user exports elsewhere, then every stage with that graph as the reference.

Runs in the zoo venv (``.venv-zoo``: torch 2.14.1 + torchvision 0.29.1): ``.venv-zoo/bin/python -m pytest -m zoo
tests/zoo``. The gates are relaxed (one epoch on 8x8 digits upscaled makes a weak model): this checks the mechanics
on a network nobody here wrote, not its accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torchvision = pytest.importorskip("torchvision")
import torch  # noqa: E402 - after the skip: the main venv has no torchvision

from resdeploy.artifact import open_artifact  # noqa: E402
from resdeploy.pipeline.cli import main  # noqa: E402

pytestmark = pytest.mark.zoo

FACTORY = "torchvision.models:resnet18"
FAST = ["--no-bench", "--data", "digits"] + [x for kv in (
    'engines.choose="off"', 'engines.backends=["onnxruntime"]', "engines.threads=2", "parity.limit=128",
    "variants.calibration_images=64", "variants.max_int8_drop=100.0", "parity.int8_max_drop=100.0",
    "parity.fp16_min_agreement=0.9", "variants.min_fp16_agreement=0.9", "variants.int8_search=false",
    "train.batch_size=32", "train.lr=0.05", "export.parity_images=8") for x in ("--set", kv)]


def _ready(out: Path, name: str) -> dict:
    """The run passed and left a served-ready repository and a report; returns run.json."""
    summary = json.loads((out / "run.json").read_text())
    assert summary["passed"], summary["failed_gate"]
    repo = out / "model_repository" / name
    assert (repo / "config.pbtxt").is_file() and (repo / "1" / "model.onnx").is_file(), sorted(out.rglob("*"))
    assert (repo / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert {s["name"]: s["status"] for s in summary["stages"]}["repository"] == "ran"
    return summary


@pytest.fixture(scope="module")
def trained_resnet18(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "resnet18"
    code = main(["run", "--model", FACTORY, "--model-kwargs", '{"num_classes": 10}', "--input-shape", "3,32,32",
                 "--epochs", "1", "--out", str(out), *FAST])
    return code, out


def test_run_model_torchvision_resnet18_to_a_served_repository(trained_resnet18):
    code, out = trained_resnet18
    assert code == 0
    summary = _ready(out, "resnet18")
    card = summary["model"]
    assert card["factory"] == FACTORY and card["factory_kwargs"] == {"num_classes": 10} and card["source"] == "factory"
    assert summary["skipadd"]["fp32"]["residual_adds"] == 8 and summary["skipadd"]["int8"]["passed"]  # 8 BasicBlocks
    meta = open_artifact(out / "model_repository" / "resnet18" / "1" / "model.onnx").metadata
    assert meta.factory == FACTORY and meta.checkpoint_sha256 == card["weights_sha256"]
    assert meta.input_spec.shape == (3, 32, 32)


def test_run_onnx_exported_elsewhere_to_a_served_repository(trained_resnet18, tmp_path, capsys):
    from safetensors.torch import load_file

    _, out = trained_resnet18
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict(load_file(out / "checkpoint" / "model.safetensors"))
    onnx_path = tmp_path / "exported" / "resnet18_digits.onnx"
    onnx_path.parent.mkdir()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(onnx_path), dynamo=True, input_names=["image"],
                      output_names=["logits"], dynamic_shapes=({0: batch},))
    spec = json.loads((out / "checkpoint" / "model.json").read_text())["input_spec"]
    run = tmp_path / "onnx-run"
    capsys.readouterr()
    code = main(["run", "--onnx", str(onnx_path), "--mean", ",".join(map(str, spec["mean"])),
                 "--std", ",".join(map(str, spec["std"])), "--out", str(run), *FAST])
    assert code == 0, capsys.readouterr()
    summary = _ready(run, "resnet18_digits")
    assert summary["parity"]["reference"].startswith("ONNX Runtime FP32 on the given graph resnet18_digits.onnx")
    assert summary["model"]["source"] == "onnx" and summary["skipadd"]["fp32"]["residual_adds"] == 8
    meta = open_artifact(run / "model_repository" / "resnet18_digits" / "1" / "model.onnx").metadata
    assert meta.imported_sha256 == summary["model"]["onnx_sha256"] and meta.precision == "int8"
