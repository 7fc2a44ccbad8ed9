"""`resdeploy serve --workers N`: N processes on the same HTTP and gRPC ports (SO_REUSEPORT), each a whole server.

tritonclient (HTTP and gRPC, unchanged) gets the runner's answers from whichever worker the kernel picks, SIGTERM
drains every worker and exits 0, and the configurations the workers cannot serve consistently are refused.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.serve.conftest import ROOT

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


def test_two_workers_answer_on_one_port_and_drain(model_repo, tmp_path, spawn_server, runner_reference):
    start, stop = spawn_server
    sp = start(model_repo, tmp_path, "--workers", "2", "--no-strict-readiness")
    try:
        deadline = time.monotonic() + 60  # start() returns once one worker serves; the kernel spreads only over both
        while sp.log().count("model version(s) loaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = sp.log()
        pids = re.search(r"serving with 2 worker processes .* pids (\d+), (\d+)", log)
        assert pids, log
        x = np.random.default_rng(1).standard_normal((1, 1, 28, 28)).astype(np.float32)
        want = runner_reference.infer({"input": x})["logits"]
        # Fresh connections each time: the kernel spreads them over both workers.
        for _ in range(8):
            c = httpclient.InferenceServerClient(sp.url)
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            np.testing.assert_allclose(c.infer("resnet20", [inp]).as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
            c.close()
            g = grpcclient.InferenceServerClient(sp.grpc_url)
            gin = grpcclient.InferInput("input", list(x.shape), "FP32")
            gin.set_data_from_numpy(x)
            np.testing.assert_allclose(g.infer("resnet20", [gin]).as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
            g.close()
        # Every worker loaded its own models and runs on its share of the cores, with its share of the connection cap.
        assert sp.log().count("model version(s) loaded") == 2
        assert sp.log().count(" 512 connections") == 2
    finally:
        rc = stop(sp)
    assert rc == 0, sp.log()
    assert "all 2 workers exited (codes [0, 0])" in sp.log()


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resdeploy", "serve", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_workers_refuse_explicit_model_control(model_repo):
    r = _serve(str(model_repo), "--workers", "2", "--model-control-mode", "explicit", "--port", "0", "--grpc-port", "0")
    assert r.returncode != 0
    assert "--workers > 1 needs --model-control-mode none" in r.stdout + r.stderr


def test_workers_refuse_a_port_in_use(model_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve(str(model_repo), "--workers", "2", "--port", str(port), "--grpc-port", "0")
    assert r.returncode != 0
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in r.stdout + r.stderr


def test_workers_auto_is_one_per_usable_core_and_one_under_explicit_model_control(monkeypatch):
    import os

    from resdeploy.errors import InputError
    from resdeploy.serve.server import parse_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # e.g. taskset -c 0,2,5
    assert parse_workers("auto") == 3
    assert parse_workers("AUTO", "none") == 3
    assert parse_workers("auto", "explicit") == 1  # load/unload would reach one worker only
    assert parse_workers("4") == 4 and parse_workers(1) == 1
    with pytest.raises(InputError, match=r"--workers is 'many'; give a number of processes or 'auto'"):
        parse_workers("many")


def test_workers_refuse_a_word_that_is_not_a_count(model_repo):
    r = _serve(str(model_repo), "--workers", "lots", "--port", "0", "--grpc-port", "0")
    assert r.returncode != 0
    assert "--workers is 'lots'; give a number of processes or 'auto'" in r.stdout + r.stderr
