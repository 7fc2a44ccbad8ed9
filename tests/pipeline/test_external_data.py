"""A model over the protobuf limit keeps its weights in ``<name>.data``; that path goes through every stage.

Two gigabytes of weights cannot be made in CI, so the export's threshold is lowered to 1 KiB: the trained resnet20
is then written exactly as a > 2 GB model is (weights in ``fp32.onnx.data`` beside the graph), and quantize, build
and repo must carry the data file along, read it only through the artifact contract, and keep the numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from resdeploy.artifact import open_artifact
from resdeploy.export import ExportConfig
from resdeploy.pipeline.building import BuildConfig, build
from resdeploy.pipeline.exporting import export_checkpoint
from resdeploy.pipeline.quantizing import QuantizeConfig, quantize_model
from resdeploy.pipeline.repository import make_model_repository
from resdeploy.engines import open_runner


@pytest.fixture(scope="module")
def external_fp32(trained_resnet20_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ext") / "fp32.onnx"
    res = export_checkpoint(trained_resnet20_dir, out, config=dataclasses.replace(ExportConfig(), external_data_threshold=1024))
    assert res and res.export.external_data
    return out


def _logits(path, x):
    with open_runner(path, backend="onnxruntime", threads=1) as r:
        return r.infer({r.inputs[0].name: x})[r.outputs[0].name]


def test_export_writes_the_weights_beside_the_graph(external_fp32):
    art = open_artifact(external_fp32)
    assert [f.name for f in art.data_files] == ["fp32.onnx.data"]
    assert external_fp32.stat().st_size < 100_000 < art.size_bytes()  # the graph is small, the weights are outside


def test_quantize_build_and_repo_carry_the_external_data(external_fp32, mnist, trained_resnet20, trained_resnet20_dir,
                                                        tmp_path):
    from resdeploy.models import normalize

    spec = trained_resnet20[1].input_spec
    x = normalize(mnist.test.images[:8], spec.mean, spec.std)
    want = _logits(external_fp32, x)

    int8 = tmp_path / "variants" / "int8.onnx"
    res = quantize_model(external_fp32, int8, config=QuantizeConfig(precision="int8", calibration_images=64, eval_images=200),
                         reference=trained_resnet20_dir)
    assert res and res.accuracy.drop_points <= 1.0, res
    art = open_artifact(int8)
    assert art.external_data and [f.name for f in art.data_files] == ["int8.onnx.data"] and art.precision == "int8"
    assert (np.asarray(_logits(int8, x)).argmax(1) == want.argmax(1)).mean() >= 0.85

    fp16 = tmp_path / "variants" / "fp16.onnx"
    assert quantize_model(external_fp32, fp16, config=QuantizeConfig(precision="fp16", eval_images=200),
                          reference=trained_resnet20_dir)
    assert open_artifact(fp16).external_data

    report = build(external_fp32, tmp_path / "engine", config=BuildConfig(threads=1))
    assert (tmp_path / "engine" / "fp32.onnx.data").is_file()  # model.onnx names its data file, which came along
    assert len(report.fusion.adds) == 9, report.fusion  # every residual Add of resnet20 found in the engine's graph
    assert np.allclose(_logits(tmp_path / "engine" / "model.onnx", x), want, atol=1e-4)
    assert np.allclose(_logits(tmp_path / "engine" / "model.optimized.onnx", x), want, atol=1e-4)

    repo = make_model_repository(int8, tmp_path / "repo", model_name="r20")
    assert (repo.model_path.parent / "int8.onnx.data").is_file()
    assert np.array_equal(_logits(repo.model_path, x), _logits(int8, x))


def test_a_model_whose_data_file_went_missing_is_refused_everywhere(external_fp32, tmp_path):
    import shutil

    from resdeploy.errors import InputError

    lonely = tmp_path / "fp32.onnx"
    shutil.copyfile(external_fp32, lonely)  # the graph without its .data file
    for stage in (lambda: quantize_model(lonely, tmp_path / "q.onnx", config=QuantizeConfig(precision="fp16")),
                  lambda: build(lonely, tmp_path / "b"),
                  lambda: make_model_repository(lonely, tmp_path / "repo")):
        with pytest.raises(InputError, match="needs external data file .*fp32.onnx.data, which does not exist"):
            stage()
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.onnx"))
