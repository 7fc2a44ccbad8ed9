"""Reading a Triton model repository: config.pbtxt via the real ModelConfig schema, versions, validation, labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resdeploy.errors import InputError
from resdeploy.serve.repository import (complete_config, config_to_json, instance_count, io_specs, read_config,
                                        read_labels, scan_repository)
from resdeploy.engines.base import TensorSpec

INPUTS = [TensorSpec("input", "float32", (None, 1, 28, 28))]
OUTPUTS = [TensorSpec("logits", "float32", (None, 10))]


def make_model(repo: Path, name: str, config: str, versions=(1,), fname="model.onnx") -> Path:
    d = repo / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(config)
    for v in versions:
        (d / str(v)).mkdir()
        (d / str(v) / fname).write_bytes(b"x")
    return d


def test_latest_version_by_default_and_version_policies(tmp_path):
    make_model(tmp_path, "a", 'max_batch_size: 8', versions=(1, 3, 10))
    make_model(tmp_path, "b", 'version_policy { all {} }', versions=(1, 2))
    make_model(tmp_path, "c", 'version_policy { specific { versions: [1] } }', versions=(1, 2))
    make_model(tmp_path, "d", 'version_policy { latest { num_versions: 2 } }', versions=(1, 2, 3), fname="model.plan")
    got = {(e.name, e.version): e for e in scan_repository(tmp_path)}
    assert sorted(got) == [("a", "10"), ("b", "1"), ("b", "2"), ("c", "1"), ("d", "2"), ("d", "3")]
    assert all(e.error is None for e in got.values())
    assert got[("d", "3")].artifact.name == "model.plan"
    assert got[("a", "10")].config.max_batch_size == 8  # parsed by the real ModelConfig schema


def test_unreadable_models_are_reported_not_fatal(tmp_path):
    make_model(tmp_path, "good", "max_batch_size: 4")
    make_model(tmp_path, "syntax", "max_batch_size: [oops")
    make_model(tmp_path, "named", 'name: "other"')
    make_model(tmp_path, "noversion", "", versions=())
    make_model(tmp_path, "nofile", "", fname="weights.bin")
    (tmp_path / "noconfig").mkdir()
    errs = {e.name: e.error for e in scan_repository(tmp_path)}
    assert errs["good"] is None
    assert "syntax/config.pbtxt" in errs["syntax"] and "ModelConfig text format" in errs["syntax"]
    assert "says name 'other' but the folder is 'named'" in errs["named"]
    assert "no numeric version folder" in errs["noversion"]
    assert "has no model.onnx or model.plan" in errs["nofile"]
    assert "config.pbtxt is missing" in errs["noconfig"]


def test_missing_repository_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        scan_repository(tmp_path / "nope")


def test_config_is_completed_from_the_model(tmp_path):
    cfg = read_config(make_model(tmp_path, "m", 'max_batch_size: 16\ninstance_group [{ count: 2 }]') / "config.pbtxt")
    cfg.name = "m"
    complete_config(cfg, INPUTS, OUTPUTS, None, Path("model.onnx"))
    assert (cfg.platform, cfg.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [1, 28, 28])]
    assert [str(s) for s in io_specs(cfg.output, 16)] == ["logits: FP32[?,10]"]
    assert instance_count(cfg) == 2


@pytest.mark.parametrize("text,match", [
    ('max_batch_size: 8\ninput [{ name: "image" data_type: TYPE_FP32 dims: [1, 28, 28] }]', "input 'image' is not in the model"),
    ('max_batch_size: 8\ninput [{ name: "input" data_type: TYPE_FP16 dims: [1, 28, 28] }]', "has data_type TYPE_FP16 but the model has TYPE_FP32"),
    ('max_batch_size: 8\ninput [{ name: "input" data_type: TYPE_FP32 dims: [-1, 1, 28, 28] }]', r"dims \[-1, 1, 28, 28\] but the model has \[1, 28, 28\] \(with max_batch_size > 0"),
    ('max_batch_size: 8\noutput [{ name: "logits" data_type: TYPE_FP32 dims: [11] }]', r"output 'logits' has dims \[11\]"),
    ('max_batch_size: 64', "exceeds the engine's maximum batch 32"),
])
def test_config_mismatches_say_what_to_fix(tmp_path, text, match):
    cfg = read_config(make_model(tmp_path, "m", text) / "config.pbtxt")
    cfg.name = "m"
    with pytest.raises(InputError, match=match):
        complete_config(cfg, INPUTS, OUTPUTS, 32, Path("model.plan"))


def test_batching_config_needs_a_dynamic_batch_axis(tmp_path):
    cfg = read_config(make_model(tmp_path, "m", "max_batch_size: 8") / "config.pbtxt")
    with pytest.raises(InputError, match="no dynamic batch axis; set max_batch_size: 0"):
        complete_config(cfg, [TensorSpec("input", "float32", (1, 1, 28, 28))], OUTPUTS, None, Path("model.onnx"))


def test_config_json_is_tritons_form(tmp_path):
    cfg = read_config(make_model(tmp_path, "m", """
max_batch_size: 8
input [{ name: "input" data_type: TYPE_FP32 dims: [1, 28, 28] }]
dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100
                   default_queue_policy { max_queue_size: 16 default_timeout_microseconds: 5000 } }
""") / "config.pbtxt")
    d = config_to_json(cfg)
    # proto field names, enums by name, and int64 fields as numbers (protobuf would print "100" and ["1","28","28"])
    assert d["input"][0]["dims"] == [1, 28, 28] and d["input"][0]["data_type"] == "TYPE_FP32"
    assert d["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert d["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] == 5000
    assert d["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert d["max_batch_size"] == 8 and "sequence_batching" not in d and d["output"] == []
    json.dumps(d)


def test_labels_from_label_file_then_onnx_metadata(tmp_path):
    d = make_model(tmp_path, "m", 'output [{ name: "logits" data_type: TYPE_FP32 dims: [3] label_filename: "labels.txt" }]')
    (d / "labels.txt").write_text("cat\ndog\neel\n")
    entry = scan_repository(tmp_path)[0]
    assert read_labels(entry, ("x", "y", "z")) == {"logits": ["cat", "dog", "eel"]}
    (d / "labels.txt").unlink()
    with pytest.raises(InputError, match="label_filename .*labels.txt cannot be read"):
        read_labels(entry)
    entry.config.output[0].label_filename = ""
    assert read_labels(entry, ("x", "y", "z")) == {"logits": ["x", "y", "z"]}
    assert read_labels(entry, ()) == {}
