"""A bounded load generator for the v2 infer endpoint: N concurrent clients for T seconds, on one event loop.

    result = run_load(LoadConfig("http://127.0.0.1:8000", "resnet20", concurrency=16, duration_s=10), {"input": x})
    print(result)   # requests, errors, p50/p90/p99 ms, throughput

Every client sends the same pre-encoded request (binary tensors by default, as tritonclient does) over its
own keep-alive connection, so the client's own cost stays small next to the server's. The run is bounded by
time *and* by a request count. Latencies are measured per request from send to full response.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdeploy.errors import InputError
from resdeploy.serve.protocol import triton_dtype


@dataclass(frozen=True)
class LoadConfig:
    url: str  # server base URL, e.g. http://127.0.0.1:8000 (loopback only in tests)
    model: str  # model name in the URL
    concurrency: int = 16  # clients, each with one request in flight
    duration_s: float = 10.0  # stop sending after this long
    max_requests: int = 1_000_000  # and after this many requests in total, whichever comes first
    request_timeout_s: float = 30.0  # a request taking longer counts as an error
    binary: bool = True  # binary tensor extension (tritonclient's default) or JSON
    stop_client_on_unavailable: bool = False  # True (shutdown tests): a client stops at its first 503 / refused connection
    warmup_requests: int = 0  # per client, not measured


@dataclass(frozen=True)
class LoadResult:
    """Outcome of a run. Latencies in ms; ``errors`` counts every non-200 and every failed connection."""

    requests: int
    ok: int
    errors: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_rps: float
    statuses: tuple[tuple[str, int], ...] = ()  # ("200", n), ("503", n), ("ServerDisconnectedError", n) ...
    error_examples: tuple[str, ...] = ()
    latencies_ms: tuple[float, ...] = field(default=(), repr=False)

    def count(self, status: str) -> int:
        return dict(self.statuses).get(status, 0)

    def __str__(self) -> str:
        st = ", ".join(f"{k}: {v}" for k, v in self.statuses)
        return (f"{self.requests} requests in {self.duration_s:.1f} s ({self.throughput_rps:.0f} req/s), {self.errors} errors; "
                f"latency p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, mean {self.mean_ms:.2f} ms"
                f" [{st}]")

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors, "duration_s": round(self.duration_s, 3),
                "p50_ms": round(self.p50_ms, 3), "p90_ms": round(self.p90_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "mean_ms": round(self.mean_ms, 3), "throughput_rps": round(self.throughput_rps, 1),
                "statuses": dict(self.statuses), "error_examples": list(self.error_examples)}


def encode_request(inputs: dict[str, np.ndarray], binary: bool = True, outputs: list[str] | None = None,
                   request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request body and its headers, as tritonclient would send it."""
    req: dict[str, Any] = {"inputs": []}
    if request_id is not None:
        req["id"] = request_id
    blobs = []
    for name, x in inputs.items():
        t: dict[str, Any] = {"name": name, "datatype": triton_dtype(x.dtype), "shape": list(x.shape)}
        if binary:
            raw = np.ascontiguousarray(x).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = x.ravel().tolist()
        req["inputs"].append(t)
    if outputs is not None:
        req["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    else:
        req["parameters"] = {"binary_data_output": binary}
    header = json.dumps(req).encode("utf-8")
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"}


async def _run(config: LoadConfig, body: bytes, headers: dict[str, str]) -> LoadResult:
    import aiohttp

    url = f"{config.url.rstrip('/')}/v2/models/{config.model}/infer"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    examples: list[str] = []
    sent = 0
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    start = time.perf_counter()
    deadline = start + config.duration_s

    async def one(session: aiohttp.ClientSession) -> tuple[str, float, str]:
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
                status = str(resp.status)
                detail = "" if resp.status == 200 else data[:300].decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            status, detail = type(exc).__name__, str(exc)[:300]
        return status, (time.perf_counter() - t0) * 1e3, detail

    async def client() -> None:
        nonlocal sent
        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for _ in range(config.warmup_requests):
                await one(session)
            while time.perf_counter() < deadline and sent < config.max_requests:
                sent += 1
                status, ms, detail = await one(session)
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies.append(ms)
                elif len(examples) < 5:
                    examples.append(f"{status}: {detail}")
                if config.stop_client_on_unavailable and status != "200":
                    return

    await asyncio.gather(*(client() for _ in range(config.concurrency)))
    elapsed = time.perf_counter() - start
    ok = statuses.get("200", 0)
    total = sum(statuses.values())
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return LoadResult(requests=total, ok=ok, errors=total - ok, duration_s=elapsed,
                      p50_ms=float(np.percentile(lat, 50)), p90_ms=float(np.percentile(lat, 90)),
                      p99_ms=float(np.percentile(lat, 99)), mean_ms=float(lat.mean()),
                      throughput_rps=ok / elapsed if elapsed > 0 else 0.0,
                      statuses=tuple(sorted(statuses.items())), error_examples=tuple(examples),
                      latencies_ms=tuple(latencies))


def run_load(config: LoadConfig, inputs: dict[str, np.ndarray]) -> LoadResult:
    """Run the load to completion (blocking) and return the result."""
    if config.concurrency < 1 or config.duration_s <= 0 or config.max_requests < 1:
        raise InputError(f"LoadConfig needs concurrency >= 1, duration_s > 0 and max_requests >= 1; got {config}")
    body, headers = encode_request(inputs, binary=config.binary)
    return asyncio.run(_run(config, body, headers))


__all__ = ["LoadConfig", "LoadResult", "encode_request", "run_load"]
