"""Serving fixtures: a Triton model repository, real server subprocesses, and the UINT8 resnet20.

The served resnet20 (``resnet20_onnx``, in tests/conftest.py) is what users serve: the output of `resdeploy
export` (dynamo, opset 18, labels in its metadata_props). The UINT8 variant wraps the same network in a
cast-and-normalise prologue.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def resnet20_uint8_onnx(tmp_path_factory, trained_resnet20) -> Path:
    """The same network taking raw UINT8 pixels (0..255): the graph casts and scales them itself."""
    import onnx
    import torch

    model, info = trained_resnet20

    class Uint8Input(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            mean = torch.tensor(info.input_spec.mean).view(1, -1, 1, 1)
            std = torch.tensor(info.input_spec.std).view(1, -1, 1, 1)
            return self.net((x.float() / 255.0 - mean) / std)

    path = tmp_path_factory.mktemp("onnx_u8") / "resnet20_uint8.onnx"
    x = torch.zeros(1, *info.input_spec.shape, dtype=torch.uint8)
    torch.onnx.export(Uint8Input().eval(), x, str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, {"labels": json.dumps(list(info.labels))})
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, resnet20_onnx, resnet20_uint8_onnx) -> Path:
    """resnet20 (dynamic batching to 32), resnet20_nobatch (same model, no dynamic batching), resnet20_uint8,
    tiny_queue (max_queue_size 1, to provoke 503) and broken (fails to load)."""
    from resdeploy.pipeline.repository import make_model_repository

    repo = tmp_path_factory.mktemp("repo")
    make_model_repository(resnet20_onnx, repo, "resnet20", max_batch_size=32, max_queue_size=64)
    make_model_repository(resnet20_onnx, repo, "resnet20_nobatch", max_batch_size=32, dynamic_batching=False)
    make_model_repository(resnet20_uint8_onnx, repo, "resnet20_uint8", max_batch_size=8)
    make_model_repository(resnet20_onnx, repo, "tiny_queue", max_batch_size=32, max_queue_size=1)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nmax_batch_size: 8\n')
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    return repo


@pytest.fixture(scope="session")
def runner_reference(resnet20_onnx):
    """The runner's own outputs, to compare the server's with."""
    from resdeploy.engines import open_runner

    r = open_runner(str(resnet20_onnx), backend="onnxruntime", provider="cpu", threads=1)
    r.activate()
    yield r
    r.deactivate()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        """The gRPC address (the server picks a free port with --grpc-port 0 and logs it)."""
        import re

        found = re.search(r"listening on grpc://[^ ]*:(\d+) ", self.log())
        assert found, f"no gRPC port in the log:\n{self.log()}"
        return f"127.0.0.1:{found.group(1)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        return http("GET", f"http://{self.url}{path}", timeout=timeout)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(repo: Path, log_dir: Path, *extra: str, ready_path: str = "/v2/health/ready", timeout: float = 90.0) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "resdeploy", "serve", str(repo), "--port", str(port), "--grpc-port", "0", "--threads", "1",
           *extra]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    sp = ServerProcess(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{sp.log()}")
        try:
            status, _ = sp.get(ready_path, timeout=2)
            if status == 200:
                return sp
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(sp)
    raise RuntimeError(f"server not ready after {timeout} s:\n{sp.log()}")


def stop_server(sp: ServerProcess, timeout: float = 30.0) -> int:
    if sp.proc.poll() is None:
        sp.proc.send_signal(signal.SIGTERM)
        try:
            sp.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            sp.proc.kill()
            sp.proc.wait(10)
    return sp.proc.returncode


@pytest.fixture(scope="session")
def spawn_server():
    """start_server / stop_server for tests that need a server of their own (SIGTERM, readiness)."""
    return start_server, stop_server


@pytest.fixture(scope="session")
def server(model_repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the protocol, error, batching and load tests (body limit 8 MiB so 413 is cheap to test)."""
    sp = start_server(model_repo, tmp_path_factory.mktemp("logs"), "--no-strict-readiness", "--max-body-mb", "8")
    yield sp
    stop_server(sp)


# Test digits spread over the split (it is ordered by class), so a batch holds several classes.
PICKS = np.arange(0, 1000, 61)[:16]


@pytest.fixture(scope="session")
def mnist_raw(mnist) -> tuple[np.ndarray, np.ndarray]:
    """16 real test digits as float32 N x 1 x 28 x 28 in [0, 1], and their labels."""
    return np.ascontiguousarray(mnist.test.images[PICKS], dtype=np.float32), np.asarray(mnist.test.labels[PICKS])


@pytest.fixture(scope="session")
def mnist_images(mnist_raw, trained_resnet20) -> np.ndarray:
    """The same digits normalised the way the model was trained (what its input expects)."""
    spec = trained_resnet20[1].input_spec
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((mnist_raw[0] - mean) / std, dtype=np.float32)
