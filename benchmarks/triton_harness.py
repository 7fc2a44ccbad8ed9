"""Real NVIDIA Triton on this machine, for the conformance suite and the serving benchmark (test tooling, not resdeploy).

PyPI's ``nvidia-pytriton`` bundles a real ``tritonserver`` (2.51.0 in pytriton 0.7.0) with the python
backend but no onnxruntime backend. This module:

1. **prepares** a venv for it (:func:`ensure_install`), made from the system ``/usr/bin/python3``, because
   the python-backend stub links the system libpython (under another interpreter the stub fails) and
   pytriton forces numpy < 2. The venv is cached under ``.cache/`` (ignored by git), keyed by the
   requirements and the interpreter's version, built under a file lock and marked ready only when complete;
2. **lays out a backend directory of its own** (a fresh temp copy per server, never the venv's files):
   ``python/`` (libtriton_python.so, its utils and the stub for the system Python) and
   ``onnxruntime/model.py`` (``benchmarks/triton_ort_model.py``): Triton runs a Python-based backend named
   onnxruntime when ``libtriton_onnxruntime.so`` is absent, so a resdeploy repository loads unchanged;
3. **runs** ``tritonserver`` on free loopback ports in its own session (:func:`triton_server`, a context
   manager; :func:`start_triton`/:class:`TritonServer.stop`), waits until it serves, and stops it by PID:
   SIGTERM, then its stub child processes by PID, then the python backend's shared-memory regions (named
   with a per-server prefix). Its work folder (backends copy + ``tritonserver.log``) goes in ``log_dir`` when
   given (kept), else in the system temp folder (removed after a clean stop).

``RESDEPLOY_TRITON_CACHE`` moves the venv cache (default ``<repository root>/.cache``).

Why here: ``resdeploy/serve`` must not depend on test tooling, ``tests/`` is not an importable package,
and ``benchmarks/serve_bench.py`` runs as a script with the repository root on ``sys.path``. So both import
``benchmarks.triton_harness`` (pytest is started from the repository root, which ``python -m pytest``
puts on ``sys.path``). ``python benchmarks/triton_harness.py prepare`` makes the venv (``make triton-venv``);
``python benchmarks/triton_harness.py serve REPO`` runs Triton on a repository by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
PYTRITON_VERSION = "0.7.0"
# pytriton pins numpy < 2 itself; onnxruntime runs the stand-in backend (same version as resdeploy's tests use).
REQUIREMENTS = (f"nvidia-pytriton=={PYTRITON_VERSION}", "onnxruntime==1.32.0", "numpy<2")
CACHE_DIR = Path(os.environ.get("RESDEPLOY_TRITON_CACHE", ROOT / ".cache"))
MODEL_PY = Path(__file__).resolve().parent / "triton_ort_model.py"
READY_MARK = ".resdeploy-triton-ready"


class TritonUnavailable(RuntimeError):
    """pytriton's venv is missing or cannot be made, or tritonserver did not come up; the message says why."""


class TritonCrashed(TritonUnavailable):
    """tritonserver died before serving; ``returncode`` is its exit status (negative: the signal that ended it)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


# -- the venv -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """A prepared pytriton venv and the Triton files inside it."""

    venv: Path
    dist: Path  # site-packages/pytriton/tritonserver
    python_version: str  # "3.11" of the venv's (system) interpreter

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def tritonserver(self) -> Path:
        return self.dist / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.dist / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @property
    def libs(self) -> Path:  # the wheel's vendored shared libraries (the binary's rpath finds them too)
        return self.dist.parent.parent / "nvidia_pytriton.libs"


def _system_python_version(python: Path = SYSTEM_PYTHON) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def venv_dir(cache_dir: Path = CACHE_DIR, python: Path = SYSTEM_PYTHON) -> Path:
    """``.cache/pytriton-0.7.0-py3.11-<hash of the requirements>``."""
    pyver = _system_python_version(python) if python.exists() else "none"
    key = hashlib.sha256(json.dumps([REQUIREMENTS, pyver, MODEL_PY.name]).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"pytriton-{PYTRITON_VERSION}-py{pyver}-{key}"


def find_install(cache_dir: Path = CACHE_DIR, python: Path = SYSTEM_PYTHON) -> TritonInstall | None:
    """The prepared venv, or None when it has not been made (or was left half made)."""
    if not python.exists():
        return None
    venv = venv_dir(cache_dir, python)
    if not (venv / READY_MARK).is_file():
        return None
    pyver = _system_python_version(python)
    dist = venv / "lib" / f"python{pyver}" / "site-packages" / "pytriton" / "tritonserver"
    install = TritonInstall(venv, dist, pyver)
    if not install.tritonserver.is_file() or not install.stub.is_file():
        return None
    return install


def ensure_install(cache_dir: Path = CACHE_DIR, python: Path = SYSTEM_PYTHON, quiet: bool = True) -> TritonInstall:
    """The cached venv, made first when missing (about 30 s from the package index). Raises TritonUnavailable."""
    if not python.exists():
        raise TritonUnavailable(f"{python} is missing: pytriton's python-backend stub needs the system Python "
                                "(install python3 and python3-venv from the distribution)")
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / "pytriton.lock", "w")  # noqa: SIM115 - held for the whole build
    except OSError as exc:
        raise TritonUnavailable(f"cannot use the cache folder {cache_dir} ({exc}); set RESDEPLOY_TRITON_CACHE to a "
                                "writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it ready
        found = find_install(cache_dir, python)
        if found:
            return found
        venv = venv_dir(cache_dir, python)
        shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
        log = cache_dir / f"{venv.name}.install.log"
        steps = [[str(python), "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                  *(["--quiet"] if quiet else []), *REQUIREMENTS]]
        with open(log, "w") as logf:
            for cmd in steps:
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=900).returncode
                if rc != 0:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise TritonUnavailable(f"making the pytriton venv failed ({' '.join(cmd[:4])}... exited {rc}); "
                                            f"log {log}:\n{tail}")
        (venv / READY_MARK).write_text(json.dumps({"requirements": REQUIREMENTS, "python": str(python)}) + "\n")
        found = find_install(cache_dir, python)
        if found is None:
            raise TritonUnavailable(f"pytriton installed into {venv} but tritonserver or the python {_system_python_version(python)} "
                                    "stub is not in it; check the nvidia-pytriton wheel")
        return found


# -- the server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_backend_dir(install: TritonInstall, dest: Path) -> Path:
    """``dest/python`` (python backend + the stub for the system Python) and ``dest/onnxruntime/model.py``."""
    src = install.dist / "backends" / "python"
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / name, py / name)
    shutil.copy2(install.stub, py / "triton_python_backend_stub")
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(MODEL_PY, dest / "onnxruntime" / "model.py")
    return dest


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest last."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _with_arg(text: str) -> list[int]:
    """Live processes with ``text`` in their command line."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
    return [pid for pid in found if pid != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class TritonServer:
    """A running tritonserver: its ports, its log, and how to stop it."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    workdir: Path
    shm_prefix: str
    cmd: list[str] = field(default_factory=list)
    owns_workdir: bool = False  # made in the system temp folder: removed on a clean stop (else kept for its log)

    @property
    def url(self) -> str:  # tritonclient.http's form
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        return _http(method, f"http://{self.url}{path}", body, timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to tritonserver (by PID), then its stub processes (by PID), then their shared memory."""
        # A stub whose server crashed is reparented away and may ignore SIGTERM: find those by the shared-memory
        # prefix on their command line (unique to this server), not only among the live server's children.
        stubs = sorted({*(_children(self.proc.pid) if self.proc.poll() is None else []), *_with_arg(self.shm_prefix)} - {self.proc.pid})
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in stubs:  # normally gone with the server; end any left behind
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for pid in stubs:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for shm in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                shm.unlink()
        shutil.rmtree(self.workdir / "backends", ignore_errors=True)  # the copied backends; the log stays
        if self.owns_workdir and self.proc.returncode == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


def start_triton(repo: str | os.PathLike[str], *, install: TritonInstall | None = None, log_dir: Path | None = None,
                 model_control_mode: str = "none", load_models: Sequence[str] = (), exit_on_error: bool = True,
                 strict_readiness: bool = True, extra_args: Sequence[str] = (), timeout: float = 180.0,
                 verbose: int = 0) -> TritonServer:
    """Start tritonserver on ``repo`` and return once its HTTP endpoint answers (models loaded or failed).

    ``exit_on_error`` True (Triton's default) makes a model that fails to load stop the server: this raises
    TritonUnavailable with the log. With False, failed models stay unavailable and the server runs.
    """
    install = install or find_install()
    if install is None:
        raise TritonUnavailable("the pytriton venv is not prepared; run `make triton-venv` "
                                "(or `python3 benchmarks/triton_harness.py prepare`)")
    workdir = Path(tempfile.mkdtemp(prefix="triton-", dir=log_dir))
    backends = make_backend_dir(install, workdir / "backends")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    while len({http_port, grpc_port, metrics_port}) < 3:
        grpc_port, metrics_port = free_port(), free_port()
    shm_prefix = f"resdeploy_triton_{os.getpid()}_{http_port}_"
    cmd = [str(install.tritonserver), f"--model-repository={Path(repo).resolve()}", f"--backend-directory={backends}",
           "--http-address=127.0.0.1", f"--http-port={http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
           "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false",
           f"--model-control-mode={model_control_mode}", f"--exit-on-error={str(exit_on_error).lower()}",
           f"--strict-readiness={str(strict_readiness).lower()}", "--exit-timeout-secs=10", f"--log-verbose={verbose}",
           f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
           *[f"--load-model={m}" for m in load_models], *extra_args]
    env = {**os.environ, "PATH": f"{install.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "LD_LIBRARY_PATH": ":".join(filter(None, [str(install.libs), os.environ.get("LD_LIBRARY_PATH")]))}
    env.pop("PYTHONPATH", None)  # the stub must see the venv's packages, not the caller's
    env.pop("VIRTUAL_ENV", None)
    log_path = workdir / "tritonserver.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=workdir, start_new_session=True)
    server = TritonServer(proc, http_port, grpc_port, metrics_port, log_path, workdir, shm_prefix, cmd, log_dir is None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            rc = proc.returncode
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
            # The reason comes last as well: a CI log often shows only the tail.
            raise TritonCrashed(f"tritonserver died before serving ({how}) on {repo}:\n{server.log()[-6000:]}\n"
                                f"tritonserver died before serving ({how}); its log: {log_path}", rc)
        with contextlib.suppress(OSError):
            # Triton starts its HTTP service only after the initial model loads are done (ok or failed).
            status, _ = server.request("GET", "/v2/health/live", timeout=2)
            if status == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise TritonUnavailable(f"tritonserver did not serve within {timeout} s:\n{server.log()[-6000:]}\n"
                            f"tritonserver did not serve within {timeout} s; its log: {log_path}")


@contextlib.contextmanager
def triton_server(repo: str | os.PathLike[str], **kwargs) -> Iterator[TritonServer]:
    """``with triton_server(repo) as t: tritonclient.http.InferenceServerClient(t.url) ...``; stopped on exit."""
    server = start_triton(repo, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="make (or find) the cached pytriton venv and print its path")
    s = sub.add_parser("serve", help="run tritonserver on a repository until Ctrl-C")
    s.add_argument("repo")
    s.add_argument("--verbose", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        install = ensure_install()
    except TritonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "prepare":
        print(f"pytriton venv ready: {install.venv} (tritonserver {install.tritonserver})")
        return 0
    with triton_server(args.repo, install=install, verbose=args.verbose) as t:
        print(f"tritonserver pid {t.pid}: http {t.url}, grpc {t.grpc_url}, metrics 127.0.0.1:{t.metrics_port}; log {t.log_path}")
        with contextlib.suppress(KeyboardInterrupt):
            t.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
