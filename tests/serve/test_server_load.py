"""Load on a real server subprocess: dynamic batching under 16 clients, a 20 s soak, and SIGTERM under load.

Throughput numbers depend on the machine (2 shared cores in CI), so the assertions are ratio-free facts; the
measured figures are printed (run with -s) and the batched/unbatched ratio is reported, not gated, except by
the `latency`-marked test for quiet machines.
"""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest

from resdeploy.serve.loadgen import LoadConfig, run_load


def batch_sizes(server, model: str) -> dict[int, int]:
    status, raw = server.get(f"/v2/models/{model}/stats")
    assert status == 200
    return {b["batch_size"]: b["compute_infer"]["count"] for b in json.loads(raw)["model_stats"][0]["batch_stats"]}


def compare_batching(server, x: np.ndarray, rounds: int, seconds: float) -> tuple[float, float]:
    """Interleaved runs (unbatched, batched, unbatched, ...) with identical load; returns mean req/s of each."""
    tput = {"resnet20_nobatch": [], "resnet20": []}
    for _ in range(rounds):
        for model in tput:
            r = run_load(LoadConfig(f"http://{server.url}", model, concurrency=16, duration_s=seconds, warmup_requests=1), {"input": x})
            assert r.errors == 0, r.error_examples
            tput[model].append(r.throughput_rps)
            print(f"{model:>17}: {r}")
    return float(np.mean(tput["resnet20_nobatch"])), float(np.mean(tput["resnet20"]))


def test_dynamic_batching_merges_concurrent_requests(server, mnist_images):
    before = batch_sizes(server, "resnet20")
    unbatched, batched = compare_batching(server, mnist_images[:1], rounds=2, seconds=2.0)
    after = batch_sizes(server, "resnet20")
    new = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
    print(f"batched/unbatched throughput at 16 clients: {batched:.0f} / {unbatched:.0f} req/s = {batched / unbatched:.2f}x; "
          f"executed batch sizes: {dict(sorted(new.items()))}")
    assert max(new) > 1, f"16 concurrent clients never produced a batch > 1: {new}"
    assert set(batch_sizes(server, "resnet20_nobatch")) == {1}  # batching off: every execution is one request
    # Sanity, not the 2x target (that is for a GPU; on a CPU per-sample cost barely falls with batch size):
    # batching must not collapse throughput, e.g. by making requests wait for max_queue_delay.
    assert batched > 0.5 * unbatched


@pytest.mark.latency
def test_batched_throughput_beats_unbatched(server, mnist_images):
    unbatched, batched = compare_batching(server, mnist_images[:1], rounds=3, seconds=3.0)
    assert batched > unbatched, f"batched {batched:.0f} req/s <= unbatched {unbatched:.0f} req/s"


def test_twenty_second_load_has_no_errors(server, mnist_images):
    r = run_load(LoadConfig(f"http://{server.url}", "resnet20", concurrency=16, duration_s=20.0), {"input": mnist_images[:1]})
    print(f"20 s load, 16 clients: {r}")
    assert r.errors == 0, r.error_examples
    assert r.ok > 100 and np.isfinite(r.p99_ms) and r.p99_ms >= r.p50_ms
    assert server.get("/v2/health/ready")[0] == 200


def test_sigterm_under_load_loses_no_accepted_request(model_repo, tmp_path, mnist_images, spawn_server):
    start_server, stop_server = spawn_server
    sp = start_server(model_repo, tmp_path, "--no-strict-readiness", "--shutdown-timeout", "20")
    try:
        import threading

        result = {}
        cfg = LoadConfig(f"http://{sp.url}", "resnet20", concurrency=16, duration_s=15.0, request_timeout_s=20.0,
                         stop_client_on_unavailable=True)
        t = threading.Thread(target=lambda: result.update(r=run_load(cfg, {"input": mnist_images[:1]})))
        t.start()
        time.sleep(2.0)
        sp.proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        rc = sp.proc.wait(30)
        t.join(30)
        assert not t.is_alive()
    finally:
        stop_server(sp)
    r = result["r"]
    log = sp.log()
    print(f"under SIGTERM: {r}; exit {rc} after {time.monotonic() - t_sig:.2f} s")
    assert rc == 0, log
    m = re.search(r"shutdown: (\d+) request\(s\) in progress at the signal; (\d+) answered during the drain .*; "
                  r"(\d+) abandoned", log)
    assert m, log
    assert int(m.group(2)) >= int(m.group(1)) and m.group(3) == "0"
    # Every request the server accepted was answered 200; the rest were refused explicitly (503, or the port closed).
    # A reset after the request was sent, a timeout or a 5xx other than 503 would be a lost request.
    allowed = {"200", "503", "ClientConnectorError"}
    assert set(dict(r.statuses)) <= allowed, (r.statuses, r.error_examples)
    assert r.ok > 0
