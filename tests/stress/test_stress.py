"""Stress: overload, SIGTERM under load x10 (closed-loop clients, and clients that keep opening new connections),
1,000 idle connections, slow clients, RSS over 5 x 20 s windows
(and a leaking handler that trips that RSS check), a long fuzz. Marked `stress`: not in the default run.

    python -m pytest tests/stress -m stress -q        # prints one table at the end (about 4 minutes)
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from resdeploy.serve.loadgen import LoadConfig, encode_request, run_load
from tests.stress.table import record

pytestmark = pytest.mark.stress
ROOT = Path(__file__).resolve().parents[2]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def rss_growth_ok(samples: list[float]) -> tuple[bool, float]:
    """The RSS check: after the first window (warm-up: arenas, caches), RSS may grow at most
    max(32 MiB, 10% of the first window's). Returns (ok, growth MiB)."""
    growth = max(samples[1:]) - samples[0]
    return growth <= max(32.0, 0.10 * samples[0]), growth


@pytest.fixture(scope="module")
def good(mnist_images):
    return encode_request({"input": mnist_images[:1]})


def _server(model_repo, tmp_path, *extra):
    from tests.serve.conftest import start_server

    return start_server(model_repo, tmp_path, "--no-strict-readiness", *extra)


# -- overload ------------------------------------------------------------------------------------------------
async def _open_loop(url: str, body: bytes, headers: dict, rate: float, seconds: float) -> list[tuple[int | str, float]]:
    """Requests at a fixed rate whatever the server does (an open loop, unlike run_load's closed one)."""
    import aiohttp

    out: list[tuple[int | str, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as s:
        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with s.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    out.append((r.status, time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                out.append((type(exc).__name__, time.perf_counter() - t0))

        tasks, t_start, n = [], time.perf_counter(), int(rate * seconds)
        for i in range(n):
            delay = t_start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    return out


def test_overload_at_4x_the_sustainable_rate(model_repo, tmp_path, good, mnist_images):
    """tiny_queue (one instance, max_queue_size 1) sustains what two closed-loop clients of batch-32 requests get
    from it; at 4x that
    rate, open loop, every accepted request succeeds and the rest are turned away with 503 at once, faster than a
    served request takes. (At 4x the *batched* rate of 16 clients, 2 shared cores saturate in HTTP parsing
    before any queue fills: that measures the box, not the queue bound.)"""
    from tests.serve.conftest import stop_server

    sp = _server(model_repo, tmp_path)
    try:
        # Batch-32 requests: the model, not HTTP parsing on 2 shared cores, is what saturates at 4x.
        x = np.ascontiguousarray(np.repeat(mnist_images[:1], 32, axis=0))
        base = run_load(LoadConfig(f"http://{sp.url}", "tiny_queue", concurrency=2, duration_s=4.0, warmup_requests=2),
                        {"input": x})
        assert base.errors == 0, base.error_examples
        rate = base.throughput_rps * 4
        res = asyncio.run(_open_loop(f"http://{sp.url}/v2/models/tiny_queue/infer", *encode_request({"input": x}), rate, 6.0))
        assert sp.get("/v2/health/live")[0] == 200
    finally:
        rc = stop_server(sp)
    kinds = {k: sum(1 for s, _ in res if s == k) for k in {s for s, _ in res}}
    rej = [t * 1000 for s, t in res if s == 503]
    served = [t * 1000 for s, t in res if s == 200]
    p99_503 = float(np.percentile(rej, 99)) if rej else float("nan")
    p50_200 = float(np.percentile(served, 50)) if served else float("nan")
    ok = (set(kinds) <= {200, 503} and kinds.get(200, 0) > 0 and kinds.get(503, 0) > 0 and p99_503 < p50_200 and rc == 0)
    record("overload at 4x (queue bound 1)",
           f"sustains {base.throughput_rps:.0f} rps; sent {len(res)} at {rate:.0f} rps: {kinds.get(200, 0)} x 200 "
           f"(p50 {p50_200:.0f} ms), {kinds.get(503, 0)} x 503 (p99 {p99_503:.0f} ms), "
           f"other {len(res) - kinds.get(200, 0) - kinds.get(503, 0)}",
           "only 200/503; 503 p99 < 200 p50", ok)
    assert ok, kinds


# -- SIGTERM ---------------------------------------------------------------------------------------------------
def test_sigterm_under_load_ten_rounds(model_repo, tmp_path, mnist_images):
    from tests.serve.conftest import stop_server

    drain_timeout = 10.0
    rounds = []
    for i in range(10):
        sp = _server(model_repo, tmp_path, "--no-warmup", "--shutdown-timeout", str(drain_timeout))
        result = {}
        cfg = LoadConfig(f"http://{sp.url}", "resnet20", concurrency=16, duration_s=10.0, request_timeout_s=20.0,
                         stop_client_on_unavailable=True)
        t = threading.Thread(target=lambda result=result, cfg=cfg: result.update(r=run_load(cfg, {"input": mnist_images[:1]})))
        t.start()
        time.sleep(1.0 + 0.1 * i)  # a different moment of the load each round
        sp.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = sp.proc.wait(30)
        took = time.monotonic() - t0
        t.join(30)
        stop_server(sp)
        r = result["r"]
        lost = sum(n for k, n in r.statuses if k not in ("200", "503", "ClientConnectorError"))
        m = re.search(r"(\d+) abandoned", sp.log())
        rounds.append((lost, rc, took, r.ok, int(m.group(1)) if m else -1))
    ok = all(lost == 0 and rc == 0 and took < drain_timeout and ab == 0 for lost, rc, took, _, ab in rounds)
    record("SIGTERM under load x10", f"lost {[x[0] for x in rounds]}, exit {sorted({x[1] for x in rounds})}, "
           f"exit after max {max(x[2] for x in rounds):.2f} s, answered 200 {sum(x[3] for x in rounds)}",
           f"0 lost each round, exit 0 < {drain_timeout:g} s", ok)
    assert ok, rounds


def test_sigterm_under_sustained_new_connections_ten_rounds(model_repo, tmp_path):
    """A rolling update under load: 16 HTTP clients (and 4 gRPC ones) keep opening new connections through the
    signal and after it. Every round: exit 0 within 2 s of SIGTERM, and no request lost (each connection the
    server accepted got a whole answer: 200 or 503 / OK or UNAVAILABLE; the rest were refused). The rounds cover
    the fast path and aiohttp, native gRPC and grpc.aio, and --workers 2 (the supervisor forwards the signal)."""
    from tests.serve.conftest import start_server, stop_server
    from tests.stress.drain_clients import drain_round

    setups = [(), (), ("--no-http-fast-path",), ("--grpc-transport", "grpcio"), ("--workers", "2"), (),
              ("--no-http-fast-path", "--grpc-transport", "grpcio"), ("--workers", "2"), (), ()]
    rounds = []
    for i, extra in enumerate(setups):
        sp = start_server(model_repo, tmp_path, "--no-strict-readiness", "--no-warmup", *extra)
        grpc_port = int(sp.grpc_url.rsplit(":", 1)[1])
        try:
            r = asyncio.run(drain_round(sp.proc, sp.port, grpc_port, clients=16, grpc_clients=4,
                                        signal_after_s=1.0 + 0.1 * i))
        finally:
            stop_server(sp)
        rounds.append((extra, r))
        print(f"round {i} {' '.join(extra) or 'defaults'}: exit {r.exit_code} after {r.exit_s:.2f} s; HTTP "
              f"{dict(r.http.outcomes)}; gRPC {dict(r.grpc.outcomes)}; {r.http.examples + r.grpc.examples}")
    # grpc.aio (the escape hatch) drops a few calls at its own shutdown (C-core cancels those it has not handed to
    # the application, and closes connections it has not read): reported, not held against it. The native
    # transport and HTTP must lose none.
    def lost(extra, r):  # noqa: ANN001, ANN202
        return r.http.lost + (0 if "grpcio" in extra else r.grpc.lost + r.grpc.outcomes["cancelled"])

    ok = all(r.exit_code == 0 and r.exit_s < 2.0 and lost(extra, r) == 0 and r.http.outcomes["ok"] > 0
             for extra, r in rounds)
    aio = sum(r.grpc.lost + r.grpc.outcomes["cancelled"] for extra, r in rounds if "grpcio" in extra)
    answered = sum(r.http.outcomes["ok"] + r.http.outcomes["turned_away"] + r.grpc.outcomes["ok"]
                   + r.grpc.outcomes["turned_away"] for _, r in rounds)
    refused = sum(r.http.outcomes["refused"] + r.grpc.outcomes["refused"] for _, r in rounds)
    record("SIGTERM, 16+4 clients opening new connections x10",
           f"exit {sorted({r.exit_code for _, r in rounds})} after {min(r.exit_s for _, r in rounds):.2f}-"
           f"{max(r.exit_s for _, r in rounds):.2f} s; answered {answered}, refused {refused}, "
           f"lost {[lost(extra, r) for extra, r in rounds]} (grpc.aio rounds: {aio} dropped by grpc.aio)",
           "each round: exit 0 < 2 s, 0 lost", ok)
    assert ok, [(extra, r.exit_code, round(r.exit_s, 2), lost(extra, r), r.http.examples + r.grpc.examples)
                for extra, r in rounds]


# -- connections -------------------------------------------------------------------------------------------------
def test_a_thousand_idle_connections(model_repo, tmp_path, good):
    from tests.serve.conftest import http, stop_server

    sp = _server(model_repo, tmp_path, "--max-connections", "1100", "--header-timeout", "60")
    socks = []
    try:
        before = rss_mib(sp.proc.pid)
        for _ in range(1000):
            socks.append(socket.create_connection(("127.0.0.1", sp.port), timeout=10))
        time.sleep(1.0)
        lat = []
        for _ in range(50):
            t0 = time.perf_counter()
            assert http("POST", f"http://{sp.url}/v2/models/resnet20/infer", *good)[0] == 200
            lat.append((time.perf_counter() - t0) * 1000)
        grown = rss_mib(sp.proc.pid) - before
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
    finally:
        for s in socks:
            s.close()
        rc = stop_server(sp)
    ok = alive == 1000 and grown < 100 and rc == 0
    record("1,000 idle connections", f"{alive} held open, RSS +{grown:.1f} MiB, good requests p50 {np.median(lat):.1f} ms "
           f"p99 {np.percentile(lat, 99):.1f} ms", "all held, RSS < +100 MiB, requests served", ok)
    assert ok


def test_slow_clients_are_cut_off_and_do_not_stop_service(model_repo, tmp_path, mnist_images):
    from tests.serve.conftest import stop_server

    sp = _server(model_repo, tmp_path, "--header-timeout", "2", "--body-timeout", "2")
    outcomes: list[tuple[str, float]] = []

    def slow(kind: str) -> None:
        t0 = time.monotonic()
        s = socket.create_connection(("127.0.0.1", sp.port), timeout=15)
        try:
            if kind == "headers":
                for b in b"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa":
                    s.sendall(bytes([b]))
                    time.sleep(0.2)
            else:
                s.sendall(b"POST /v2/models/resnet20/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
            data = s.recv(200)
        except OSError:
            data = b""
        if not data:
            try:
                data = s.recv(200)
            except OSError:
                data = b""
        outcomes.append((kind if data.startswith(b"HTTP/1.1 408") else f"{kind}: no 408", time.monotonic() - t0))
        s.close()

    try:
        threads = [threading.Thread(target=slow, args=(k,)) for k in ["headers"] * 100 + ["body"] * 100]
        for t in threads:
            t.start()
        r = run_load(LoadConfig(f"http://{sp.url}", "resnet20", concurrency=8, duration_s=5.0), {"input": mnist_images[:1]})
        for t in threads:
            t.join(20)
    finally:
        rc = stop_server(sp)
    cut = sum(1 for k, _ in outcomes if k in ("headers", "body"))
    worst = max(t for _, t in outcomes)
    ok = cut == 200 and worst < 4.0 and r.errors == 0 and rc == 0
    record("slow clients (100 slow heads, 100 stalled bodies)", f"{cut}/200 got 408, slowest cut after {worst:.2f} s; "
           f"meanwhile {r.ok} good requests, {r.errors} errors, p99 {r.p99_ms:.1f} ms", "all 408 < timeout + 2 s, 0 errors", ok)
    assert ok, outcomes[:5]


# -- memory ------------------------------------------------------------------------------------------------------
def _rss_windows(sp, mnist_images, windows: int, seconds: float) -> list[float]:
    samples = []
    for _ in range(windows):
        r = run_load(LoadConfig(f"http://{sp.url}", "resnet20", concurrency=16, duration_s=seconds, binary=False),
                     {"input": mnist_images[:4]})
        assert r.ok > 0
        samples.append(rss_mib(sp.proc.pid))
    return samples


def test_rss_is_flat_over_five_20s_windows(model_repo, tmp_path, mnist_images):
    from tests.serve.conftest import stop_server

    sp = _server(model_repo, tmp_path)
    try:
        samples = _rss_windows(sp, mnist_images, 5, 20.0)
    finally:
        stop_server(sp)
    ok, growth = rss_growth_ok(samples)
    record("RSS over 5 x 20 s of load", f"RSS MiB {[round(x, 1) for x in samples]}, growth after window 1 {growth:+.1f} MiB",
           "growth <= max(32 MiB, 10%)", ok)
    assert ok, samples


def test_a_leaking_handler_trips_the_rss_check(model_repo, tmp_path, mnist_images):
    from tests.serve.conftest import ServerProcess, free_port, stop_server

    port = free_port()
    log = tmp_path / "leaky.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stress" / "leaky_server.py"), str(model_repo), str(port)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sp = ServerProcess(proc, port, log)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if sp.get("/v2/models/resnet20/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        samples = _rss_windows(sp, mnist_images, 5, 5.0)
    finally:
        stop_server(sp)
    ok, growth = rss_growth_ok(samples)
    record("leaking handler (control)", f"RSS MiB {[round(x, 1) for x in samples]}, growth {growth:+.1f} MiB",
           "the RSS check must FAIL", not ok)
    assert not ok, f"the RSS check did not notice a leak of ~8x every body: {samples}"


# -- fuzz ----------------------------------------------------------------------------------------------------------
def test_long_fuzz_over_http(server, mnist_images):
    from tests.serve.test_fuzz_requests import fuzz_server

    statuses = fuzz_server(server, mnist_images, 5000)
    ok = not any(s >= 500 for s in statuses)
    record("fuzz over HTTP (hypothesis)", f"{sum(statuses.values())} mutated requests: {dict(sorted(statuses.items()))}",
           "0 x 5xx, strict JSON replies", ok)
    assert ok
