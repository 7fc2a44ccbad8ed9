"""`resdeploy repo`: a Triton layout from an ONNX model, readable by the real ModelConfig schema and by the server."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from resdeploy.errors import InputError
from resdeploy.pipeline.cli import main
from resdeploy.pipeline.repository import make_model_repository
from resdeploy.serve.repository import read_config, read_labels, scan_repository


def tiny_onnx(path, batch_dim="batch", labels=("a", "b", "c")):
    """Identity-ish graph input [batch, 3] -> output [batch, 3], with the exporter's `labels` metadata_prop."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if labels:
        helper.set_model_props(model, {"labels": json.dumps(list(labels))})
    onnx.save(model, str(path))
    return path


def test_repo_command_writes_a_triton_layout(tmp_path, capsys):
    src = tiny_onnx(tmp_path / "m.onnx")
    rc = main(["repo", str(src), "--out", str(tmp_path / "repo"), "--name", "tiny", "--max-batch-size", "16",
               "--preferred", "4", "8", "--max-queue-delay-us", "200", "--max-queue-size", "32", "--instances", "2"])
    assert rc == 0 and "3 labels in labels.txt" in capsys.readouterr().out
    model_dir = tmp_path / "repo" / "tiny"
    assert (model_dir / "1" / "model.onnx").read_bytes() == src.read_bytes()
    cfg = read_config(model_dir / "config.pbtxt")  # the real Triton schema parses it
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [3])]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [("logits", [3], "labels.txt")]
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8] and db.max_queue_delay_microseconds == 200
    assert db.default_queue_policy.max_queue_size == 32 and cfg.instance_group[0].count == 2
    entry = scan_repository(tmp_path / "repo")[0]
    assert entry.error is None and read_labels(entry) == {"logits": ["a", "b", "c"]}


def test_no_batching_and_existing_version(tmp_path):
    src = tiny_onnx(tmp_path / "m.onnx", batch_dim=1, labels=())
    r = make_model_repository(src, tmp_path / "repo", "fixed", max_batch_size=0)
    cfg = read_config(r.config_path)
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3] and not cfg.HasField("dynamic_batching")
    assert r.labels == 0 and not (r.model_dir / "labels.txt").exists()
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        make_model_repository(src, tmp_path / "repo", "fixed", max_batch_size=0)
    make_model_repository(src, tmp_path / "repo", "fixed", max_batch_size=0, overwrite=True)


def test_bad_inputs_are_input_errors(tmp_path):
    fixed = tiny_onnx(tmp_path / "fixed.onnx", batch_dim=1)
    with pytest.raises(InputError, match="without a dynamic batch axis"):
        make_model_repository(fixed, tmp_path / "repo", "m", max_batch_size=8)
    with pytest.raises(InputError, match="does not exist"):
        make_model_repository(tmp_path / "none.onnx", tmp_path / "repo")
    src = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"preferred batch sizes \[64\] are outside 1..8"):
        make_model_repository(src, tmp_path / "repo", "m", max_batch_size=8, preferred_batch_sizes=(64,))
    assert main(["repo", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "r")]) == 2
