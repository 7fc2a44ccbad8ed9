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


# -- scale-out options: version policy, warmup, instances, TensorRT --------------------------------------------
def _props_onnx(path, props):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def test_version_policy_warmup_and_queue_policy(tmp_path):
    src = tiny_onnx(tmp_path / "m.onnx")
    rc = main(["repo", str(src), "--out", str(tmp_path / "repo"), "--name", "m", "--version", "3", "--max-batch-size", "8",
               "--version-policy", "specific:1,3", "--warmup", "random", "--queue-timeout-us", "5000", "--max-queue-size", "4"])
    assert rc == 0
    cfg = read_config(tmp_path / "repo" / "m" / "config.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [1, 3]
    assert [(w.name, w.batch_size) for w in cfg.model_warmup] == [("random_batch1", 1), ("random_batch8", 8)]
    sample = cfg.model_warmup[1].inputs["input"]
    assert list(sample.dims) == [3] and sample.random_data and sample.data_type == cfg.input[0].data_type
    q = cfg.dynamic_batching.default_queue_policy
    assert q.default_timeout_microseconds == 5000 and q.max_queue_size == 4 and q.timeout_action == 0  # REJECT
    r = make_model_repository(src, tmp_path / "r2", "m", version_policy="all", warmup="none")
    cfg = read_config(r.config_path)
    assert cfg.version_policy.HasField("all") and not len(cfg.model_warmup) and cfg.max_batch_size == 32
    assert read_config(make_model_repository(src, tmp_path / "r3", "m").config_path).version_policy.latest.num_versions == 1
    for bad, msg in (("latest:0", "not understood"), ("newest", "not understood"), ("specific:a", "non-numeric"),
                     ("specific:1,2", "does not serve version 3")):
        with pytest.raises(InputError, match=msg):
            make_model_repository(src, tmp_path / "r4", "m", version=3, version_policy=bad)


def test_no_batching_warmup_uses_one_for_the_batch_axis(tmp_path):
    src = tiny_onnx(tmp_path / "m.onnx")
    cfg = read_config(make_model_repository(src, tmp_path / "repo", "m", max_batch_size=0).config_path)
    assert list(cfg.input[0].dims) == [-1, 3]
    assert [(w.batch_size, list(w.inputs["input"].dims)) for w in cfg.model_warmup] == [(1, [1, 3])]


def test_instances_gpus_and_the_tensorrt_accelerator(tmp_path):
    src = _props_onnx(tmp_path / "fp16.onnx", {"precision": "fp16"})
    cfg = read_config(make_model_repository(src, tmp_path / "a", "m", instances=2, kind="KIND_GPU", gpus=(0, 1)).config_path)
    g = cfg.instance_group[0]
    assert g.count == 2 and list(g.gpus) == [0, 1] and g.kind == 1  # KIND_GPU
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"] and acc[0].parameters["precision_mode"] == "FP16"
    assert int(acc[0].parameters["max_workspace_size_bytes"]) == 1 << 30
    cfg = read_config(make_model_repository(src, tmp_path / "b", "m", kind="KIND_CPU").config_path)
    assert not cfg.HasField("optimization")  # auto: only for GPU instances
    cfg = read_config(make_model_repository(src, tmp_path / "c", "m", kind="KIND_GPU", trt_accelerator=False).config_path)
    assert not cfg.HasField("optimization")
    with pytest.raises(InputError, match="pass --kind KIND_GPU"):
        make_model_repository(src, tmp_path / "d", "m", gpus=(0,))
    u8 = _props_onnx(tmp_path / "u8.onnx", {"precision": "int8", "int8_flavour": "u8s8"})
    r = make_model_repository(u8, tmp_path / "e", "m", kind="KIND_GPU")
    assert not read_config(r.config_path).HasField("optimization") and "u8s8" in str(r)
    with pytest.raises(InputError, match="backend tensorrt"):
        make_model_repository(u8, tmp_path / "f", "m", trt_accelerator=True)


def _fake_plan(path, onnx_path, cc="8.0", max_batch=16, body=b"not a real engine"):
    """A plan file and its sidecar as `resdeploy build --backend tensorrt` writes them (no GPU needed)."""
    import hashlib

    from resdeploy.atomic import sha256_file
    from resdeploy.device import Sidecar, sidecar_path

    path.write_bytes(body + cc.encode())
    side = Sidecar(plan_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), tensorrt_version="10.13.3.9",
                   gpu_name=f"GPU sm{cc}", compute_capability=cc, precision="fp16",
                   profile={"input": {"min": [1, 3], "opt": [8, 3], "max": [max_batch, 3]}},
                   onnx_sha256=sha256_file(onnx_path), build_seconds=1.0)
    sidecar_path(path).write_text(json.dumps(side.to_json()))
    return path


def test_tensorrt_plans_per_compute_capability(tmp_path):
    from resdeploy.device import sidecar_path, verify_plan

    src = tiny_onnx(tmp_path / "m.onnx")
    p80 = _fake_plan(tmp_path / "a80.plan", src, "8.0", max_batch=16)
    p89 = _fake_plan(tmp_path / "a89.plan", src, "8.9", max_batch=8)
    rc = main(["repo", str(src), "--out", str(tmp_path / "repo"), "--name", "trt", "--plan", str(p80), "--plan", str(p89)])
    assert rc == 0
    cfg = read_config(tmp_path / "repo" / "trt" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.backend == "tensorrt"
    assert cfg.max_batch_size == 8  # the smallest profile maximum: every plan must accept it
    assert dict(cfg.cc_model_filenames) == {"8.0": "model_sm80.plan", "8.9": "model_sm89.plan"}
    assert cfg.default_model_filename == "model_sm80.plan"
    vdir = tmp_path / "repo" / "trt" / "1"
    for name, src_plan in (("model_sm80.plan", p80), ("model_sm89.plan", p89)):
        assert (vdir / name).read_bytes() == src_plan.read_bytes()
        assert verify_plan(vdir / name).compute_capability == src_plan.name[1] + "." + src_plan.name[2]  # sidecar matches
        assert sidecar_path(vdir / name).is_file()
    assert not (vdir / "model.onnx").exists()
    entry = scan_repository(tmp_path / "repo")[0]
    assert entry.error is None and entry.artifact == vdir / "model_sm80.plan"  # resdeploy serve finds it


def test_single_plan_and_refusals(tmp_path):
    src = tiny_onnx(tmp_path / "m.onnx")
    plan = _fake_plan(tmp_path / "p.plan", src)
    r = make_model_repository(src, tmp_path / "repo", "trt", plans=[plan])
    cfg = read_config(r.config_path)
    assert r.model_path.name == "model.plan" and dict(cfg.cc_model_filenames) == {"8.0": "model.plan"}
    assert cfg.max_batch_size == 16 and [list(i.dims) for i in cfg.input] == [[3]]
    assert not cfg.HasField("optimization")
    with pytest.raises(InputError, match="exceeds the TensorRT profile's maximum batch 16"):
        make_model_repository(src, tmp_path / "r1", "trt", plans=[plan], max_batch_size=32)
    with pytest.raises(InputError, match="both for compute capability 8.0"):
        make_model_repository(src, tmp_path / "r2", "trt", plans=[plan, _fake_plan(tmp_path / "q.plan", src, body=b"x")])
    other = tiny_onnx(tmp_path / "other.onnx", labels=("x", "y", "z"))
    with pytest.raises(InputError, match="built from another ONNX"):
        make_model_repository(other, tmp_path / "r3", "trt", plans=[plan])
    (tmp_path / "p.plan").write_bytes(b"tampered")
    with pytest.raises(InputError, match="does not match its sidecar"):
        make_model_repository(src, tmp_path / "r4", "trt", plans=[plan])
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"engine")
    with pytest.raises(InputError, match="has no sidecar"):
        make_model_repository(src, tmp_path / "r5", "trt", plans=[bare])
    with pytest.raises(InputError, match="ONNX models"):
        make_model_repository(src, tmp_path / "r6", "trt", plans=[_fake_plan(tmp_path / "z.plan", src)], trt_accelerator=True)
