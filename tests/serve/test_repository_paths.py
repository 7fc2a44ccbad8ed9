"""Hostile repositories: every path config.pbtxt or the layout names stays inside its model folder, symlinks
leaving it are refused unless --follow-symlinks (and logged when followed), ONNX external data is checked by the
server itself, and one bad model (non-UTF-8, invalid, unreadable) is only that model's problem."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import onnx
import pytest

from resdeploy.errors import InputError
from resdeploy.serve.repository import ModelEntry, check_artifact, read_config, read_labels, scan_repository

OUT = 'output [{ name: "logits" data_type: TYPE_FP32 dims: [10] label_filename: "%s" }]'


def make_model(repo: Path, name: str, config: str, versions=(1,), fname="model.onnx", data: bytes = b"x") -> Path:
    d = repo / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(config)
    for v in versions:
        (d / str(v)).mkdir()
        (d / str(v) / fname).write_bytes(data)
    return d


@pytest.fixture()
def secret(tmp_path) -> Path:
    s = tmp_path / "outside" / "secret.txt"
    s.parent.mkdir()
    s.write_text("root:hash\nAPI_KEY=123\n")
    return s


def errors(repo: Path, **kw) -> dict[str, str | None]:
    return {e.name: e.error for e in scan_repository(repo, **kw)}


LABEL_ESCAPES = [("parent", "../../outside/secret.txt", "without '..'"), ("absolute", "{secret}", "without '..' or an absolute"),
                 ("dot", ".", "must be a file name")]


@pytest.mark.parametrize("what,label,match", LABEL_ESCAPES, ids=[x[0] for x in LABEL_ESCAPES])
def test_label_filename_outside_the_model_folder_is_refused(tmp_path, secret, what, label, match):
    repo = tmp_path / "repo"
    make_model(repo, "good", "")
    make_model(repo, "evil", OUT % label.format(secret=secret))
    errs = errors(repo)
    assert errs["good"] is None
    assert "label_filename" in errs["evil"] and match in errs["evil"] and "evil" in errs["evil"]
    # read_labels refuses on its own too (it is what reads the file, whoever calls it)
    entry = ModelEntry("evil", "1", repo / "evil", None, read_config(repo / "evil" / "config.pbtxt"))
    with pytest.raises(InputError, match="label_filename"):
        read_labels(entry)


def test_symlinked_label_leaving_the_folder_needs_follow_symlinks(tmp_path, secret, caplog):
    repo = tmp_path / "repo"
    d = make_model(repo, "m", OUT % "labels.txt")
    (d / "labels.txt").symlink_to(secret)
    err = errors(repo)["m"]
    assert "resolves to" in err and "outside" in err and "--follow-symlinks" in err
    entry = ModelEntry("m", "1", d, None, read_config(d / "config.pbtxt"))
    with pytest.raises(InputError, match="outside"):
        read_labels(entry)
    with caplog.at_level(logging.WARNING, logger="resdeploy.serve"):
        entry = scan_repository(repo, follow_symlinks=True)[0]
        assert entry.error is None
        assert read_labels(entry) == {"logits": ["root:hash", "API_KEY=123"]}
    assert "following it because of --follow-symlinks" in caplog.text


def test_symlink_inside_the_model_folder_is_fine(tmp_path):
    repo = tmp_path / "repo"
    d = make_model(repo, "m", OUT % "labels.txt")
    (d / "real.txt").write_text("a\nb\n")
    (d / "labels.txt").symlink_to(d / "real.txt")
    entry = scan_repository(repo)[0]
    assert entry.error is None and read_labels(entry) == {"logits": ["a", "b"]}


def test_model_file_names_and_version_folders_stay_inside(tmp_path, secret):
    repo = tmp_path / "repo"
    make_model(repo, "dmf", 'default_model_filename: "../../outside/secret.txt"')
    make_model(repo, "cc", 'cc_model_filenames { key: "8.6" value: "../../../outside/x.plan" }')
    d = make_model(repo, "cclink", 'cc_model_filenames { key: "8.6" value: "sm86.plan" }')
    (d / "1" / "sm86.plan").symlink_to(secret)
    d = make_model(repo, "vlink", "", versions=())
    (d / "1").symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "model.onnx").write_bytes(b"x")
    d = make_model(repo, "filelink", "", versions=(1,))
    (d / "1" / "model.onnx").unlink()
    (d / "1" / "model.onnx").symlink_to(secret.parent / "model.onnx")
    (repo / "dirlink").symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "config.pbtxt").write_text("")
    make_model(repo, "good", "")
    errs = errors(repo)
    assert errs["good"] is None
    assert "default_model_filename" in errs["dmf"] and "without '..'" in errs["dmf"]
    assert "cc_model_filenames['8.6']" in errs["cc"]
    assert "cc_model_filenames['8.6']" in errs["cclink"] and "outside" in errs["cclink"]
    assert "version folder" in errs["vlink"] and "outside" in errs["vlink"]
    assert "model file" in errs["filelink"] and "outside" in errs["filelink"]
    assert "model folder" in errs["dirlink"] and "outside" in errs["dirlink"]
    followed = errors(repo, follow_symlinks=True)
    assert followed["vlink"] is None and followed["filelink"] is None
    assert "no numeric version folder" in followed["dirlink"]  # followed: it got as far as its (empty) contents
    assert followed["dmf"] is not None  # '..' in a name is never allowed, symlinks or not


def test_one_bad_model_does_not_stop_the_scan(tmp_path):
    repo = tmp_path / "repo"
    make_model(repo, "good", "")
    (make_model(repo, "latin1", "") / "config.pbtxt").write_bytes(b'name: "caf\xe9"\n')
    make_model(repo, "invalid", "max_batch_size: -x")
    make_model(repo, "deep", "parameters { key: \"a\" value { string_value: \"b\" } }" + " ensemble_scheduling {" * 200)
    d = make_model(repo, "fifo", "")
    (d / "config.pbtxt").unlink()
    os.mkfifo(d / "config.pbtxt")  # reading it would block the loader forever
    d = make_model(repo, "huge", "")
    with open(d / "config.pbtxt", "wb") as f:
        f.truncate(5 << 20)
    make_model(repo, "superscript", "", versions=())
    (repo / "superscript" / "²").mkdir()  # '²'.isdigit() is True but int('²') raises
    d = make_model(repo, "unreadable_label", OUT % "labels.txt")
    (d / "labels.txt").write_bytes(b"\xff\xfe\x00bad")
    errs = errors(repo)
    assert errs["good"] is None
    assert "not UTF-8" in errs["latin1"] and "latin1/config.pbtxt" in errs["latin1"]
    assert "ModelConfig text format" in errs["invalid"]
    assert "deep/config.pbtxt" in errs["deep"]
    assert "not a regular file" in errs["fifo"]
    assert "the limit is" in errs["huge"]
    assert "no numeric version folder" in errs["superscript"]
    entry = ModelEntry("unreadable_label", "1", d, None, read_config(d / "config.pbtxt"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_labels(entry)


def _with_external_data(path: Path, location: str, offset: int = 0, length: int = 40) -> None:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [10], [0.0] * 10)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


EXTERNAL = [("parent", "../../outside/secret.txt", 0, 10, "outside the model's folder"),
            ("absolute", "{secret}", 0, 10, "outside the model's folder"),
            ("symlink", "w.bin", 0, 10, "symlink"),
            ("past the end", "data.bin", 0, 4096, "truncated or tampered"),
            ("negative offset", "data.bin", -8, 8, "truncated or tampered")]


@pytest.mark.parametrize("what,loc,offset,length,match", EXTERNAL, ids=[x[0] for x in EXTERNAL])
def test_server_checks_onnx_external_data_itself(tmp_path, secret, what, loc, offset, length, match):
    repo = tmp_path / "repo"
    d = make_model(repo, "m", "max_batch_size: 4", fname="unused")
    (d / "1" / "w.bin").symlink_to(secret)
    (d / "1" / "data.bin").write_bytes(b"\0" * 40)
    _with_external_data(d / "1" / "model.onnx", loc.format(secret=secret), offset, length)
    entry = scan_repository(repo)[0]
    assert entry.error is None  # the scan is cheap; the graph is read just before the runtime opens it
    with pytest.raises(InputError, match=match):
        check_artifact(entry)


def test_external_data_inside_the_folder_passes(tmp_path):
    repo = tmp_path / "repo"
    d = make_model(repo, "m", "", fname="unused")
    (d / "1" / "data.bin").write_bytes(b"\0" * 40)
    _with_external_data(d / "1" / "model.onnx", "data.bin")
    check_artifact(scan_repository(repo)[0])


def test_server_serves_the_good_models_and_reports_each_bad_one(tmp_path, resnet20_onnx, spawn_server, secret,
                                                                   mnist_images):
    """One repository, one good model and one bad model per class: the server starts, serves the good one, and
    every bad one is not ready with its reason in the log, its ready answer and its metadata answer."""
    from resdeploy.pipeline.repository import make_model_repository
    from resdeploy.serve.loadgen import encode_request

    start_server, stop_server = spawn_server
    repo = tmp_path / "repo"
    make_model_repository(resnet20_onnx, repo, "good", max_batch_size=8)
    bad = {}
    for name in ("latin1", "labels_escape", "labels_link", "ext_escape"):
        shutil.copytree(repo / "good", repo / name)
        cfg = (repo / name / "config.pbtxt").read_text().replace('name: "good"', f'name: "{name}"')
        (repo / name / "config.pbtxt").write_text(cfg)
    (repo / "latin1" / "config.pbtxt").write_bytes(b'name: "latin1" # caf\xe9\n')
    bad["latin1"] = "not UTF-8"
    (repo / "labels_escape" / "config.pbtxt").write_text(
        'name: "labels_escape"\nmax_batch_size: 8\n' + OUT % "../../outside/secret.txt")
    bad["labels_escape"] = "without '..'"
    (repo / "labels_link" / "labels.txt").unlink(missing_ok=True)
    (repo / "labels_link" / "labels.txt").symlink_to(secret)
    (repo / "labels_link" / "config.pbtxt").write_text('name: "labels_link"\nmax_batch_size: 8\n' + OUT % "labels.txt")
    bad["labels_link"] = "outside"
    _with_external_data(repo / "ext_escape" / "1" / "model.onnx", "../../../outside/secret.txt")
    bad["ext_escape"] = "outside the model's folder"
    sp = start_server(repo, tmp_path, "--no-strict-readiness")
    try:
        body, headers = encode_request({"input": mnist_images[:1]})
        assert http("POST", f"http://{sp.url}/v2/models/good/infer", body, headers)[0] == 200
        log = sp.log()
        for name, reason in bad.items():
            status, raw = sp.get(f"/v2/models/{name}/ready")
            assert status == 400 and reason in json.loads(raw)["error"], (name, raw)
            status, raw = sp.get(f"/v2/models/{name}")  # unknown to clients, as on Triton, but with the reason
            assert status == 404 and reason in json.loads(raw)["error"], (name, raw)
            assert f"model '{name}'" in log and reason in log
        assert "API_KEY" not in log  # the secret's contents never reach the log or a client
        assert "repository symlinks kept inside model folders" in log
        assert sp.get("/v2/health/live")[0] == 200
    finally:
        assert stop_server(sp) == 0


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
