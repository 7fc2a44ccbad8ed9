"""The artifact contract: one loader with one external-data policy, atomic saves, typed metadata.

Each refusal test builds a valid model with external data first (and checks it loads), then breaks one thing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from resdeploy.artifact import (
    ArtifactMetadata, InputSpec, copy_onnx, external_files, load_onnx, open_artifact, read_metadata, save_onnx,
    staged_onnx, write_metadata,
)
from resdeploy.errors import InputError


def _model(n: int = 32) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["image", "w"], ["scores"])], "g",
                          [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, n])],
                          [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [None, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def ext(tmp_path):
    """A model whose weights live in ``m.onnx.data`` beside it (what a > 2 GB export looks like)."""
    path = tmp_path / "m.onnx"
    save_onnx(_model(), path, external_data=True)
    return path


def _set_location(path, **fields):
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key in fields:
                e.value = str(fields[e.key])
    path.write_bytes(m.SerializeToString())


def test_external_data_inside_the_folder_loads(ext):
    art = open_artifact(ext)
    assert art.external_data and [f.name for f in art.data_files] == ["m.onnx.data"]
    assert (art.input_name, art.output_name) == ("image", "scores")  # names come from the graph
    w = numpy_helper.to_array(load_onnx(ext, weights=True).graph.initializer[0])
    assert w.shape == (32, 32) and w[1, 0] == 32.0
    assert external_files(load_onnx(ext)) == ["m.onnx.data"]


@pytest.mark.parametrize("location, fragment", [
    ("../outside.bin", "outside the model's folder"),
    ("/etc/passwd", "outside the model's folder"),
    ("", "outside the model's folder"),
    ("missing.bin", "does not exist"),
])
def test_external_locations_that_leave_the_folder_are_refused(ext, location, fragment):
    (ext.parent.parent / "outside.bin").write_bytes(b"\0" * 8192)
    _set_location(ext, location=location)
    with pytest.raises(InputError, match=fragment):
        load_onnx(ext)


def test_symlinked_data_file_is_refused(ext, tmp_path_factory):
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.bin"
    secret.write_bytes((ext.parent / "m.onnx.data").read_bytes())
    (ext.parent / "m.onnx.data").unlink()
    os.symlink(secret, ext.parent / "m.onnx.data")
    with pytest.raises(InputError, match="symlink"):
        load_onnx(ext)


def test_symlinked_subfolder_is_refused(ext, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "w.bin").write_bytes((ext.parent / "m.onnx.data").read_bytes())
    os.symlink(elsewhere, ext.parent / "sub")
    _set_location(ext, location="sub/w.bin")
    with pytest.raises(InputError, match="resolves outside"):
        load_onnx(ext)


def test_hard_linked_data_file_is_refused(ext, tmp_path_factory):
    os.link(ext.parent / "m.onnx.data", tmp_path_factory.mktemp("elsewhere") / "alias.bin")
    with pytest.raises(InputError, match="hard links"):
        load_onnx(ext)


@pytest.mark.parametrize("fields, fragment", [
    ({"length": 10**9}, "truncated or tampered"),
    ({"offset": 10**9}, "truncated or tampered"),
    ({"offset": -4}, "truncated or tampered"),
    ({"length": "lots"}, "non-integer"),
])
def test_offset_and_length_must_lie_inside_the_file(ext, fields, fragment):
    _set_location(ext, **fields)
    with pytest.raises(InputError, match=fragment):
        load_onnx(ext)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_artifact(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match="not a readable ONNX"):
        open_artifact(tmp_path / "bad.onnx")


def test_metadata_round_trip_and_on_disk_keys():
    meta = ArtifactMetadata(architecture="resnet20", arch_kwargs={"shortcut": "A"},
                            input_spec=InputSpec(1, 28, 28, (0.13,), (0.31,)), labels=("0", "1"), precision="int8",
                            int8_flavour="u8s8", calibration={"split": "val", "count": 500}, source_sha256="ab" * 32,
                            extra={"someone.else": "kept"})
    m = _model()
    write_metadata(m, meta)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["source_onnx_sha256"] == "ab" * 32 and json.loads(props["labels"]) == ["0", "1"]
    assert props["someone.else"] == "kept"
    back = read_metadata(m)
    assert back == meta and back.input_spec.shape == (1, 28, 28)
    v = back.variant("fp16", source_sha256="cd" * 32)
    assert (v.precision, v.int8_flavour, v.calibration, v.labels) == ("fp16", "", None, ("0", "1"))


def test_a_users_network_is_recorded_and_inherited_by_its_variants():
    meta = ArtifactMetadata(architecture="resnet18", factory="torchvision.models:resnet18",
                            factory_kwargs={"num_classes": 10}, checkpoint_sha256="ef" * 32, imported_sha256="",
                            input_spec=InputSpec(3, 32, 32, (0.5,), (0.25,)), precision="fp32")
    m = _model()
    write_metadata(m, meta)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["factory"] == "torchvision.models:resnet18" and json.loads(props["factory_kwargs"]) == {"num_classes": 10}
    v = read_metadata(m).variant("int8", flavour="u8s8", source_sha256="cd" * 32)
    assert (v.factory, dict(v.factory_kwargs), v.checkpoint_sha256) == (meta.factory, {"num_classes": 10}, "ef" * 32)
    write_metadata(m, ArtifactMetadata(architecture="net", imported_sha256="12" * 32))
    assert {p.key: p.value for p in m.metadata_props}["imported_onnx_sha256"] == "12" * 32


@pytest.mark.parametrize("key, value, fragment", [
    ("input_spec", "{not json", "not JSON"),
    ("input_spec", '{"channels": 1}', "incomplete or malformed"),
    ("labels", '"abc"', "not a list"),
    ("precision", "fp64", "expected one of fp32, fp16, int8"),
])
def test_malformed_metadata_names_the_key(key, value, fragment):
    m = _model()
    m.metadata_props.add(key=key, value=value)
    with pytest.raises(InputError, match=fragment):
        read_metadata(m, "m.onnx")


def test_staged_save_leaves_the_old_model_when_the_block_fails(tmp_path):
    path = tmp_path / "m.onnx"
    save_onnx(_model(), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with staged_onnx(path) as staged:
            save_onnx(_model(8), staged, external_data=True)
            raise RuntimeError("the check failed")
    assert path.read_bytes() == before and not (tmp_path / "m.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging folder left behind


def test_save_threshold_and_copy_with_external_data(tmp_path):
    small = save_onnx(_model(), tmp_path / "a" / "small.onnx", threshold=1 << 30)
    assert not open_artifact(small).external_data
    big = save_onnx(_model(), tmp_path / "a" / "big.onnx", threshold=1024)  # lowered: stands in for 2 GB
    assert open_artifact(big).external_data
    dst = copy_onnx(big, tmp_path / "repo" / "1" / "model.onnx")
    assert (dst.parent / "big.onnx.data").is_file()
    assert np.array_equal(numpy_helper.to_array(load_onnx(dst, weights=True).graph.initializer[0]),
                          numpy_helper.to_array(_model().graph.initializer[0]))
    # Another model whose data file has the same name but other bytes must not overwrite it.
    other = tmp_path / "b" / "big.onnx"
    save_onnx(_model(16), other, threshold=1024)
    with pytest.raises(InputError, match="already exists with other contents"):
        copy_onnx(other, tmp_path / "repo" / "1" / "model2.onnx")
