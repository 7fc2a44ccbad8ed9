"""``--workers N``: N server processes on the same HTTP and gRPC ports, under one supervisor.

Each worker is a whole server (its own core, models, batchers and event loop), so Python's per-request work runs
on N cores instead of one; the kernel spreads connections across them (SO_REUSEPORT). The supervisor only
starts them, forwards SIGTERM/SIGINT to every one, and exits with the worst of their codes as soon as the last
one has exited; if a worker dies the others are stopped (exit 1), so a process manager restarts the whole
server. The connection cap is split across the workers (the total stays ``max_connections``); statistics and
metrics are per worker (each connection sees its worker's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from resdeploy.errors import InputError
from resdeploy.serve.config import ServerConfig

log = logging.getLogger("resdeploy.serve")

WORKER_ENV = "RESDEPLOY_SERVE_WORKER"  # the worker's repository and config, as JSON
INDEX_ENV = "RESDEPLOY_WORKER_INDEX"
POLL_S = 0.02  # how often the supervisor looks at its workers: its exit follows the last worker's by about this


def port_for(host: str, port: int, what: str) -> int:
    """``port`` checked free on ``host`` (0: a free one picked), bound without SO_REUSEPORT so a port in use by any
    other process is refused here, before the workers share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            flag = "--port" if what == "HTTP" else "--grpc-port"
            raise InputError(f"cannot listen for {what} on {host}:{port}: {exc}; pick a free port with {flag}") from None
        return s.getsockname()[1]


def supervise(repo: Path, config: ServerConfig, command: list[str]) -> int:
    """Run ``config.workers`` copies of ``command`` (a worker's entry, reading :func:`worker_spec`) until they
    exit; returns 0 when every worker exited 0, else 1."""
    n = config.workers
    http_port = port_for(config.host, config.port, "HTTP")
    grpc_port = port_for(config.host, config.grpc_port, "gRPC") if config.grpc_port is not None else None
    wcfg = dataclasses.replace(config, port=http_port, grpc_port=grpc_port, reuse_port=True, workers=n,
                               max_connections=max(1, math.ceil(config.max_connections / n)))
    spec = json.dumps({"repo": str(repo), "config": dataclasses.asdict(wcfg)})
    procs = [subprocess.Popen(command, env={**os.environ, WORKER_ENV: spec, INDEX_ENV: str(i)}) for i in range(n)]
    log.info("serving with %d worker processes on http %s:%d%s (SO_REUSEPORT); pids %s", n, config.host, http_port,
             f", grpc {grpc_port}" if grpc_port is not None else "", ", ".join(str(p.pid) for p in procs))
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(POLL_S)
            died = [p for p in procs if p.returncode is not None and p.returncode != 0]
            if died and not stopping:
                log.error("worker pid %d exited with %s; stopping the other workers", died[0].pid, died[0].returncode)
                forward(signal.SIGTERM, None)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    log.info("all %d workers exited (codes %s)", n, codes)
    return 0 if all(c == 0 for c in codes) else 1


def worker_spec() -> tuple[str, ServerConfig, str]:
    """In a worker: (repository, config, worker index) as the supervisor passed them."""
    spec = json.loads(os.environ.pop(WORKER_ENV))
    index = os.environ.pop(INDEX_ENV, "?")
    cfg = spec["config"]
    cfg["load_models"] = tuple(cfg["load_models"])
    return spec["repo"], ServerConfig(**cfg), index


__all__ = ["port_for", "supervise", "worker_spec"]
