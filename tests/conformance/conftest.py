"""Real NVIDIA Triton next to `resdeploy serve` on the same repositories (marker ``triton``).

Triton comes from PyPI's nvidia-pytriton in a cached venv of its own (benchmarks/triton_harness.py, made by
``make triton-venv`` or on first use here). Without it these tests skip with the reason when run by hand,
and FAIL when the ``CI`` environment variable is set (CI sets CI=true): in CI real Triton is mandatory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python -m pytest` from the root puts it there already; plain `pytest` may not
    sys.path.insert(0, str(ROOT))

from benchmarks import triton_harness as th  # noqa: E402
from triton_cases import VARIANTS  # noqa: E402  (this folder is on sys.path: pytest's rootdir-less test folders)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.triton)


@pytest.fixture(scope="session")
def triton_install() -> th.TritonInstall:
    try:
        return th.ensure_install()
    except th.TritonUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"real Triton is mandatory in CI (CI={os.environ['CI']!r}) but unavailable: {exc}", pytrace=False)
        pytest.skip(f"real Triton unavailable (set up with `make triton-venv`): {exc}")


# -- resdeploy serve in a subprocess ------------------------------------------------------------------------
def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 30.0) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@dataclass
class Resdeploy:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        """The gRPC address: the server takes a free port (--grpc-port 0) and logs it."""
        import re

        found = re.search(r"listening on grpc://[^ ]*:(\d+) ", self.log())
        assert found, f"no gRPC port in the log:\n{self.log()}"
        return f"127.0.0.1:{found.group(1)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, dict]:
        return _http(method, f"http://{self.url}{path}", body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_resdeploy(repo: Path, log_dir: Path, *extra: str, timeout: float = 120.0) -> Resdeploy:
    """`python -m resdeploy serve REPO --port P`; returns once every model has loaded or failed."""
    port = th.free_port()
    log_path = log_dir / f"resdeploy-{port}.log"
    cmd = [sys.executable, "-m", "resdeploy", "serve", str(repo), "--port", str(port), "--grpc-port", "0", *extra]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    server = Resdeploy(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"resdeploy serve exited with {proc.returncode}:\n{server.log()}")
        if "model version(s) loaded" in server.log():
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"resdeploy serve did not finish loading within {timeout} s:\n{server.log()}")


def _grpc(url: str, call) -> tuple[str, object]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        return "OK", call(client)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), exc.message()
    finally:
        client.close()


@dataclass
class Pair:
    """The same repository on real Triton and on `resdeploy serve`."""

    triton: th.TritonServer
    resdeploy: Resdeploy

    def grpc_both(self, call):
        """(triton's, resdeploy's) answer to ``call(tritonclient.grpc client)``: ("OK", result) or (status code, message)."""
        return _grpc(self.triton.grpc_url, call), _grpc(self.resdeploy.grpc_url, call)

    def both(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """((triton status, body, headers), (resdeploy status, body, headers))."""
        return (_http(method, f"http://{self.triton.url}{path}", body, headers),
                _http(method, f"http://{self.resdeploy.url}{path}", body, headers))


@pytest.fixture(scope="session")
def start_pair(triton_install, tmp_path_factory):
    """start_pair(repo, triton_kwargs={}, resdeploy_args=()) -> Pair; stopped at the session's end."""
    started: list[Pair] = []

    def start(repo: Path, triton_kwargs: dict | None = None, resdeploy_args: tuple[str, ...] = ()) -> Pair:
        log_dir = tmp_path_factory.mktemp("logs")
        t = th.start_triton(repo, install=triton_install, log_dir=log_dir, **(triton_kwargs or {}))
        try:
            r = start_resdeploy(repo, log_dir, *resdeploy_args)
        except BaseException:
            t.stop()
            raise
        pair = Pair(t, r)
        started.append(pair)
        return pair

    yield start
    for p in started:
        p.triton.stop()
        p.resdeploy.stop()


@pytest.fixture(scope="session")
def start_resdeploy_alone(tmp_path_factory):
    """start_resdeploy_alone(repo) -> Resdeploy without a Triton beside it; stopped at the session's end."""
    started: list[Resdeploy] = []

    def start(repo: Path, *args: str) -> Resdeploy:
        server = start_resdeploy(repo, tmp_path_factory.mktemp("logs"), *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- the model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits(trained_resnet20) -> "Iterator":
    """8 real test digits, normalised as the model expects (N x 1 x 28 x 28 float32)."""
    import numpy as np

    from resdeploy.models.data import load_data

    spec = trained_resnet20[1].input_spec
    images = load_data("mnist").test.images[np.arange(0, 800, 100)].astype(np.float32)
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((images - mean) / std, dtype=np.float32)


@pytest.fixture(scope="session")
def ort_reference(resnet20_onnx):
    """ONNX Runtime on the CPU, directly: what both servers' outputs are compared with."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(resnet20_onnx), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


# -- the shared repository: one model per variant `resdeploy repo` writes ------------------------------------


@pytest.fixture(scope="session")
def conformance_repo(tmp_path_factory, resnet20_onnx) -> Path:
    import shutil

    from resdeploy.pipeline.repository import make_model_repository

    repo = tmp_path_factory.mktemp("conformance_repo")
    for name, kw in VARIANTS.items():
        kw = dict(kw)
        versions, extra = kw.pop("versions", (1,)), kw.pop("extra_versions", ())
        for v in versions:
            make_model_repository(resnet20_onnx, repo, name, version=v, **kw)
        for v in extra:  # present on disk but outside the policy: must not be served
            shutil.copytree(repo / name / str(versions[0]), repo / name / str(v))
    return repo


@pytest.fixture(scope="session")
def pair(start_pair, conformance_repo) -> Pair:
    """Real Triton and `resdeploy serve` on the conformance repository."""
    return start_pair(conformance_repo)
