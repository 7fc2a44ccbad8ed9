"""``resdeploy run``: config errors, the pipeline end to end on a tiny model (to a served repository), the cache.

The end-to-end tests train resnet20 for one short epoch on scikit-learn's 8x8 digits (seconds on 2 cores), so its
accuracy is low and its INT8 gates are relaxed in ``TINY``: these tests check the pipeline's mechanics (artifacts,
cache, report, serving), not the model. Gates at their defaults are exercised on the committed trained checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from resdeploy.atomic import sha256_file
from resdeploy.errors import InputError
from resdeploy.pipeline.cli import main
from resdeploy.pipeline.config import RunConfig, load_config
from resdeploy.pipeline.run import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch=resnet20", "model.name=tiny", "train.data=digits", "train.epochs=1", "variants.max_int8_drop=100.0",
        "parity.int8_max_drop=100.0", "parity.fp16_min_agreement=0.9", "variants.min_fp16_agreement=0.9",
        "variants.calibration_images=64", "bench.batches=[1]", "bench.max_seconds=10.0", "engines.threads=1"]


# -- config ----------------------------------------------------------------------------------------------------
def test_no_config_is_every_default():
    cfg = load_config(None)
    assert cfg == RunConfig() and cfg.variants.precisions == ["fp16", "int8"] and cfg.repository.precision == "int8"


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('out = "x"\n[train]\nepochs = 3\ndata = "digits"\n[bench]\nbatches = [1, 4]\n')
    cfg = load_config(p, ["train.epochs=5", "model.arch=resnet32", "variants.precisions=['int8']"])
    assert (cfg.out, cfg.train.epochs, cfg.train.data, cfg.bench.batches) == ("x", 5, "digits", [1, 4])
    assert cfg.model.arch == "resnet32" and cfg.variants.precisions == ["int8"]


@pytest.mark.parametrize("text, fragment", [
    ("[trian]\nepochs = 1\n", "unknown section or key 'trian'; valid: out, \\[model\\]"),
    ("[train]\nepoch = 1\n", "unknown key train.epoch; valid keys in \\[train\\]: data, epochs"),
    ("[train]\nepochs = \"ten\"\n", "train.epochs = 'ten'; expected an integer"),
    ("[bench]\nbatches = [1, \"8\"]\n", "expected a list of int"),
    ("train = 3\n", "'train' must be a \\[train\\] section"),
    ("[train\n", "not valid TOML"),
    ("[variants]\nprecisions = [\"bf16\"]\n", "variants.precisions: \\['bf16'\\] unknown"),
    ("[repository]\nprecision = \"int8\"\n[variants]\nprecisions = [\"fp16\"]\n", "repository.precision = 'int8' is not made"),
    ("[engines]\nbackends = [\"tpu\"]\n", "engines.backends: \\['tpu'\\] unknown"),
])
def test_config_errors_name_the_key(tmp_path, text, fragment):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(InputError, match=fragment):
        load_config(p)


def test_cli_config_errors_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--set", "noequals"]) == 2
    assert "write section.key=value" in capsys.readouterr().err


# -- end to end --------------------------------------------------------------------------------------------
def _serve(repo: Path, log: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "resdeploy", "serve", str(repo), "--port", str(port), "--no-grpc", "--threads", "1"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server not ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    lines: list[str] = []
    result = run_pipeline(load_config(None, [*TINY, f"out={json.dumps(str(out))}"]), say=lines.append)
    return out, result, lines


def test_tiny_run_goes_from_training_to_a_served_repository(tiny_run, tmp_path):
    import tritonclient.http as http

    out, result, lines = tiny_run
    assert result, result
    names = [s.name for s in result.stages]
    assert names == ["train", "export", "variant-fp16", "variant-int8", "variant-int8-s8s8", "engine-onnxruntime-fp32",
                     "engine-onnxruntime-fp16", "engine-onnxruntime-int8", "parity", "polygraphy", "engine-choice",
                     "bench", "repository"], names
    assert all(s.status == "ran" for s in result.stages), result
    assert len(lines) >= len(names) and all("s  " in ln for ln in lines if ln.startswith("["))  # one line per stage
    for f in ("run.json", "report.md", "report.html", "parity.json", "bench/bench.json", "checkpoint/model.safetensors",
              "onnx/fp32.onnx", "onnx/int8.onnx", "engines/onnxruntime-int8/fusion_report.json",
              "model_repository/tiny/config.pbtxt", "model_repository/tiny/1/model.onnx", "stages/parity.json",
              "engines/engine-choice.json", "polygraphy/inputs.json", "polygraphy/reference.json",
              "polygraphy/probe-int8-s8s8.onnx", "polygraphy/reference-probe.json", "polygraphy/data_loader.py",
              "polygraphy/commands.txt", "polygraphy/README.md"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "run.json").read_text())
    assert summary["passed"] and summary["model"]["architecture"] == "resnet20"
    assert set(summary["skipadd"]) == {"fp32", "fp16", "int8", "int8-s8s8"} and summary["skipadd"]["int8"]["passed"]
    assert {a["path"] for a in summary["artifacts"]} >= {"onnx/int8.onnx", "model_repository/tiny/1/model.onnx"}

    proc, port = _serve(out / "model_repository", tmp_path / "serve.log")
    try:
        from resdeploy.engines import open_runner

        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        inp = http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer("tiny", [inp]).as_numpy("logits")
        chosen = json.loads((out / "engines" / "engine-choice.json").read_text())["backend"]  # what the repo serves
        assert 'key: "resdeploy_backend"' in (out / "model_repository" / "tiny" / "config.pbtxt").read_text()
        with open_runner(out / "onnx" / "int8.onnx", backend=chosen, threads=1) as r:
            want = r.infer({"input": x})["logits"]
        assert got.shape == (2, 10) and np.allclose(got, want, atol=1e-4)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_run_writes_a_polygraphy_kit_its_report_shows(tiny_run):
    """The kit names every variant the run made (the s8s8 file TensorRT takes included) and the report prints each
    command; the kit's own checks against real Polygraphy are in tests/export/test_polygraphy.py."""
    out, _, _ = tiny_run
    kit = json.loads((out / "run.json").read_text())["polygraphy"]
    assert set(kit["probes"]) == {"fp32", "fp16", "int8", "int8-s8s8"}
    assert all(kit["probes"][v] == kit["probes"]["fp32"] for v in ("fp16", "int8-s8s8")), kit["probes"]
    commands = (out / "polygraphy" / "commands.txt").read_text()
    lines = [c["line"] for c in kit["commands"]]
    assert lines and all(line in commands for line in lines)
    assert any("probe-int8-s8s8.onnx --trt" in line for line in lines), lines
    report = (out / "report.md").read_text()
    assert "Check it with Polygraphy" in report and "reference-probe.json" in report


def test_parity_judged_exactly_the_files_the_repository_serves(tiny_run):
    out, _, _ = tiny_run
    parity = json.loads((out / "parity.json").read_text())
    rows = {(v["backend"], v["precision"]): v for v in parity["variants"]}
    served = sha256_file(out / "model_repository" / "tiny" / "1" / "model.onnx")
    assert rows[("onnxruntime", "int8")]["sha256"] == served == sha256_file(out / "onnx" / "int8.onnx")
    assert rows[("onnxruntime", "fp32")]["sha256"] == sha256_file(out / "onnx" / "fp32.onnx")


def test_second_run_redoes_nothing_then_one_option_reruns_only_what_depends_on_it(tiny_run):
    out, first, _ = tiny_run
    cfg = load_config(None, [*TINY, f"out={json.dumps(str(out))}"])
    lines: list[str] = []
    again = run_pipeline(cfg, say=lines.append)
    assert again and [s.status for s in again.stages] == ["cached"] * len(first.stages), again
    assert "nothing changed: nothing redone" in again.verdict()
    assert sha256_file(out / "onnx" / "int8.onnx") == first.stage("variant-int8").outputs["onnx/int8.onnx"]

    changed = run_pipeline(load_config(None, [*TINY, f"out={json.dumps(str(out))}", "variants.calibration_images=32"]),
                           say=lines.append)
    status = {s.name: s.status for s in changed.stages}
    assert {k for k, v in status.items() if v == "ran"} == {"variant-int8", "variant-int8-s8s8",
                                                           "engine-onnxruntime-int8", "parity", "polygraphy",
                                                           "engine-choice", "bench", "repository"}, status
    assert status["train"] == status["export"] == status["variant-fp16"] == "cached"


def test_a_tampered_or_half_written_artifact_is_never_trusted(tiny_run):
    out, _, _ = tiny_run
    fp16 = out / "onnx" / "fp16.onnx"
    fp16.write_bytes(fp16.read_bytes()[:-10])  # an interrupted copy, a disk error, a hand edit
    (out / "stages" / "engine-onnxruntime-fp32.json").unlink()  # a stage killed before its record was written
    result = run_pipeline(load_config(None, [*TINY, f"out={json.dumps(str(out))}", "variants.calibration_images=32"]),
                          say=lambda _l: None)
    status = {s.name: s.status for s in result.stages}
    assert status["variant-fp16"] == "ran" and status["engine-onnxruntime-fp32"] == "ran", status
    assert status["export"] == "cached" and result, result


def test_failed_gate_stops_the_run_writes_the_report_and_exits_1(trained_resnet20_dir, tmp_path, capsys):
    out = tmp_path / "strict"
    code = main(["run", "--checkpoint", str(trained_resnet20_dir), "--out", str(out), "--no-bench",
                 "--set", "variants.precisions=['fp16']", "--set", "repository.precision='fp16'",
                 "--set", "parity.limit=100", "--set", "parity.fp32_max_abs=1e-12"])  # no FP32 engine is that exact
    captured = capsys.readouterr()
    assert code == 1 and "parity gate: FAILED: onnxruntime fp32: max_abs_error" in captured.err, captured
    summary = json.loads((out / "run.json").read_text())
    assert not summary["passed"] and "max_abs_error" in summary["failed_gate"]
    assert (out / "report.html").is_file() and not (out / "model_repository").exists()
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert stages["train"] == "skipped" and stages["parity"] == "ran" and stages["repository"] == "skipped"
