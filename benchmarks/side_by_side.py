"""`resdeploy serve` next to the real Triton (benchmarks/triton_harness.py) on one repository, one server at a time.

The same light closed-loop client drives each server in turn, in interleaved rounds (A B, B A, A B, ...), so machine
noise hits both alike. Every answer is checked (HTTP 200 / gRPC OK, and the output's byte size); a run with one
wrong answer is an error, never a number. Per run it records p50/p99 latency, req/s, the **server's CPU per
request** (utime+stime from /proc of the server process and every descendant: for Triton that includes its
python-backend stub processes), how much of that is the main threads' (for resdeploy: the event loop, where
the Python per request runs; the rest is the instance threads running the model) and the client's own CPU (this
process, over the run's wall time).

Clients (deliberately lighter than the servers, so the client is not what is measured):

* HTTP: one blocking keep-alive socket per client, the request bytes (head + JSON header + binary tensor) built
  once, a ``selectors`` loop on one thread; the response head is parsed for the status, Content-Length and
  Inference-Header-Content-Length, and the binary output must be exactly ``out_bytes`` long.
* gRPC: one channel per client (own subchannel, so one HTTP/2 connection each, as tritonclient.grpc clients),
  a ``ModelInferRequest`` with ``raw_input_contents`` built once, ``future()`` + callbacks keeping one RPC in
  flight per client; ``raw_output_contents[0]`` must be ``out_bytes`` long.

Used by ``benchmarks/serve_bench.py --vs-triton`` (and ``--smoke``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc accounting -----------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    from benchmarks.triton_harness import _children

    return _children(pid)


def proc_cpu_s(pids: list[int]) -> float:
    """utime+stime (s) of ``pids`` (each process, all of its threads, dead threads included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def main_threads_cpu_s(pids: list[int]) -> float:
    """utime+stime (s) of the main thread of each of ``pids``: for resdeploy, the event loop (HTTP, gRPC, parsing,
    batching), apart from the instance threads that run the model. It tells Python's cost from the model's."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def tree(pid: int) -> list[int]:
    return [pid, *_descendants(pid)]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of the process tree on ``cpus`` (threads made later inherit it from their creator)."""
    for p in tree(pid):
        for t in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(t.name), cpus)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# -- servers ----------------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    pid: int
    http_port: int
    grpc_port: int
    stop: Any = field(repr=False)


def start_resdeploy(repo: Path, log_path: Path, extra: tuple[str, ...] = (), name: str = "resdeploy",
                    source: Path | None = None) -> Server:
    """``resdeploy serve`` from this tree, or from ``source`` (another checkout, e.g. main's worktree, for an A/B of
    two versions: its folder goes first on PYTHONPATH)."""
    from benchmarks.triton_harness import free_port
    from resdeploy.serve.server import parse_workers  # --workers N or auto: how many "loaded" lines to wait for

    port = free_port()
    cmd = [sys.executable, "-m", "resdeploy", "serve", str(repo), "--port", str(port), "--grpc-port", "0", *extra]
    logf = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=source if source is not None else ROOT, env=env, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        logf.close()

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop()
            raise SystemExit(f"resdeploy serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        text = log_path.read_text(errors="replace")
        workers = parse_workers(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        if text.count("model version(s) loaded") >= workers:
            grpc_port = int(re.search(r"listening on grpc://[^ ]*:(\d+) ", text).group(1))
            return Server(name, proc.pid, port, grpc_port, stop)
        time.sleep(0.2)
    stop()
    raise SystemExit("resdeploy serve did not load its models in 300 s")


def start_triton(repo: Path, log_dir: Path) -> Server:
    from benchmarks import triton_harness as th

    t = th.start_triton(repo, install=th.ensure_install(), log_dir=log_dir, timeout=300)
    return Server("triton", t.pid, t.http_port, t.grpc_port, t.stop)


# -- the light clients --------------------------------------------------------------------------------------------
def binary_request(model: str, x: np.ndarray) -> tuple[bytes, bytes]:
    """(JSON header, tensor bytes) of a batch binary-tensor request asking for binary outputs (tritonclient's form)."""
    raw = np.ascontiguousarray(x).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return header, raw


def http_load(port: int, model: str, x: np.ndarray, out_bytes: int, clients: int, seconds: float,
              max_requests: int = 2_000_000) -> dict:
    header, raw = binary_request(model, x)
    body = header + raw
    req = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
           f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    lat: list[float] = []
    errors: dict[str, int] = {}
    examples: list[str] = []
    state = {}
    sent = 0

    def fire(s: socket.socket) -> None:
        nonlocal sent
        sent += 1
        state[s] = [bytearray(), time.perf_counter(), -1, -1]  # buffer, t0, head end, content length
        s.sendall(req)

    def bad(kind: str, detail: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1
        if len(examples) < 5:
            examples.append(f"{kind}: {detail[:300]}")

    for s in socks:  # warm each connection once, unmeasured
        fire(s)
        resp = b""
        while b"\r\n\r\n" not in resp or len(resp) < resp.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"(?i)content-length: *(\d+)", resp).group(1)):
            resp += s.recv(65536)
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    t_start = time.perf_counter()
    c0 = time.process_time()
    deadline = t_start + seconds
    active = len(socks)
    for s in socks:
        fire(s)
    sent = len(socks)
    while active:
        events = sel.select(timeout=30)
        if not events:
            bad("timeout", "no response within 30 s")
            break
        for key, _ in events:
            s = key.fileobj
            st = state[s]
            chunk = s.recv(1 << 20)
            if not chunk:
                bad("closed", "server closed the connection")
                sel.unregister(s)
                active -= 1
                continue
            buf = st[0]
            buf += chunk
            if st[2] < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                st[2] = end + 4
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", bytes(buf[:end + 2]))
                st[3] = int(m.group(1)) if m else -2
                if st[3] == -2:
                    bad("no-content-length", bytes(buf[:end]).decode(errors="replace"))
                    sel.unregister(s)
                    active -= 1
                    continue
            if len(buf) < st[2] + st[3]:
                continue
            now = time.perf_counter()
            head = bytes(buf[:st[2]])
            status = head[9:12]
            hm = re.search(rb"(?i)\r\ninference-header-content-length: *(\d+)", head)
            if status != b"200":
                bad(status.decode(), bytes(buf[st[2]:]).decode(errors="replace"))
            elif not hm or st[3] - int(hm.group(1)) != out_bytes or len(buf) != st[2] + st[3]:
                bad("wrong-output-size", f"body {st[3]} bytes, json header {hm.group(1) if hm else None}, "
                                         f"expected {out_bytes} binary output bytes")
            else:
                lat.append(now - st[1])
            if now < deadline and sent < max_requests:
                fire(s)
            else:
                sel.unregister(s)
                active -= 1
    wall = time.perf_counter() - t_start
    client_cpu = time.process_time() - c0
    for s in socks:
        s.close()
    sel.close()
    return _result(lat, errors, examples, wall, client_cpu)


def grpc_load(port: int, model: str, x: np.ndarray, out_bytes: int, clients: int, seconds: float) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(clients)]
    stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    for stub in stubs:  # connect and warm, unmeasured
        stub.ModelInfer(req, timeout=60)
    lat: list[float] = []
    errors: dict[str, int] = {}
    examples: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    active = [clients]
    deadline = [0.0]

    def fire(stub: Any) -> None:
        t0 = time.perf_counter()
        fut = stub.ModelInfer.future(req, timeout=30)
        fut.add_done_callback(lambda f: finished(stub, f, t0))

    def finished(stub: Any, f: Any, t0: float) -> None:
        now = time.perf_counter()
        again = now < deadline[0]
        with lock:
            try:
                resp = f.result()
            except grpc.RpcError as exc:
                kind = str(exc.code()).removeprefix("StatusCode.")
                errors[kind] = errors.get(kind, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{kind}: {exc.details()}"[:300])
            else:
                if len(resp.raw_output_contents) != 1 or len(resp.raw_output_contents[0]) != out_bytes:
                    errors["wrong-output-size"] = errors.get("wrong-output-size", 0) + 1
                else:
                    lat.append(now - t0)
            if not again:
                active[0] -= 1
                if active[0] == 0:
                    done.set()
        if again:
            fire(stub)

    t_start = time.perf_counter()
    c0 = time.process_time()
    deadline[0] = t_start + seconds
    for stub in stubs:
        fire(stub)
    done.wait(seconds + 60)
    wall = time.perf_counter() - t_start
    client_cpu = time.process_time() - c0
    for c in channels:
        c.close()
    if active[0]:
        errors["timeout"] = errors.get("timeout", 0) + active[0]
    return _result(lat, errors, examples, wall, client_cpu)


def _result(lat: list[float], errors: dict[str, int], examples: list[str], wall: float, client_cpu: float) -> dict:
    a = np.asarray(lat or [float("nan")]) * 1e3
    return {"ok": len(lat), "errors": sum(errors.values()), "error_kinds": errors, "error_examples": examples,
            "wall_s": round(wall, 3), "rps": len(lat) / wall if wall > 0 else 0.0,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "client_cpu_s": round(client_cpu, 3), "client_cores": client_cpu / wall if wall > 0 else 0.0}


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    label: str  # table row
    protocol: str  # http | grpc
    model: str
    clients: int
    x_shape: tuple[int, ...]
    out_bytes: int


def model_stats(port: int, model: str, timeout: float = 10) -> dict[str, Any]:
    """``model``'s entry of the statistics extension (``GET /v2/models/{model}/stats``, Triton's and resdeploy's)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=timeout) as r:
        return json.loads(r.read())["model_stats"][0]


def model_counts(port: int, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model``; (0, 0) where the statistics do not answer. With
    --workers N it is the answering worker's, one sample of the same load."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        st = model_stats(port, model, timeout=5)
        return int(st["inference_count"]), int(st["execution_count"])
    return 0, 0


def measure(server: Server, case: Case, seconds: float, cpus: set[int] | None) -> dict:
    if cpus is not None:
        pin(server.pid, cpus)
    x = np.random.default_rng(0).standard_normal(case.x_shape).astype(np.float32)
    pids = tree(server.pid)
    la = loadavg()
    n0 = model_counts(server.http_port, case.model)
    cpu0, main0 = proc_cpu_s(pids), main_threads_cpu_s(pids)
    if case.protocol == "http":
        r = http_load(server.http_port, case.model, x, case.out_bytes, case.clients, seconds)
    else:
        r = grpc_load(server.grpc_port, case.model, x, case.out_bytes, case.clients, seconds)
    cpu1, main1 = proc_cpu_s(pids), main_threads_cpu_s(pids)
    n1 = model_counts(server.http_port, case.model)
    inferences, executions = n1[0] - n0[0], n1[1] - n0[1]
    r["mean_batch"] = inferences / executions if executions > 0 else float("nan")  # samples per model execution
    r["server_cpu_s"] = round(cpu1 - cpu0, 3)
    r["server_cpu_ms_per_req"] = (cpu1 - cpu0) * 1e3 / r["ok"] if r["ok"] else float("nan")
    r["main_thread_cpu_ms_per_req"] = (main1 - main0) * 1e3 / r["ok"] if r["ok"] else float("nan")
    r["server_cores"] = (cpu1 - cpu0) / r["wall_s"] if r["wall_s"] else 0.0
    r["loadavg_1m"] = la
    return r


def run_side_by_side(servers: list[Server], cases: list[Case], rounds: int, seconds: float,
                     cpus: set[int] | None = None, log: Any = print) -> dict:
    """Every case on every server, one server at a time, the server order alternating by round."""
    runs: dict[str, dict[str, list[dict]]] = {c.label: {s.name: [] for s in servers} for c in cases}
    for rnd in range(rounds):
        order = servers if rnd % 2 == 0 else list(reversed(servers))
        for case in cases:
            for srv in order:
                r = measure(srv, case, seconds, cpus)
                runs[case.label][srv.name].append(r)
                log(f"  round {rnd + 1} {case.label:<34} {srv.name:<9} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                    f"p99 {r['p99_ms']:6.2f} ms  server {r['server_cpu_ms_per_req']:.3f} ms CPU/req "
                    f"(main thread {r['main_thread_cpu_ms_per_req']:.3f}) batch {r['mean_batch']:.1f} "
                    f"({r['server_cores']:.2f} cores)  client {r['client_cores']:.2f} cores  errors {r['errors']}  "
                    f"load {r['loadavg_1m']:.1f}")
    return {"runs": runs, "summary": summarize(runs, *(s.name for s in servers[:2])) if len(servers) == 2 else summarize(runs)}


def summarize(runs: dict[str, dict[str, list[dict]]], a_name: str = "resdeploy", b_name: str = "triton") -> dict:
    """Medians per case and server; ``ratio`` is ``a_name`` over ``b_name``."""
    out = {}
    for label, by_server in runs.items():
        row = {}
        for name, rs in by_server.items():
            row[name] = {k: float(np.median([r[k] for r in rs])) for k in
                         ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_req", "main_thread_cpu_ms_per_req",
                          "client_cores", "loadavg_1m", "mean_batch")}
            row[name]["rps_range"] = [min(r["rps"] for r in rs), max(r["rps"] for r in rs)]
            row[name]["errors"] = sum(r["errors"] for r in rs)
            row[name]["ok"] = sum(r["ok"] for r in rs)
        if a_name in row and b_name in row:
            a, b = row[a_name], row[b_name]
            row["ratio"] = {"rps": a["rps"] / b["rps"] if b["rps"] else float("nan"),
                            "p50": a["p50_ms"] / b["p50_ms"], "p99": a["p99_ms"] / b["p99_ms"],
                            "cpu_per_req": a["server_cpu_ms_per_req"] / b["server_cpu_ms_per_req"]}
        out[label] = row
    return out


def markdown(summary: dict, title: str, a_name: str = "resdeploy", b_name: str = "triton",
             a_label: str = "resdeploy", b_label: str = "Triton") -> str:
    x, y = a_label[0], b_label[0]
    if x == y:
        x, y = "A", "B"
    lines = [f"### {title}", "",
             f"| case | {a_label} req/s | {b_label} req/s | **req/s ratio** | p50 ms ({x} / {y}) | p99 ms ({x} / {y}) | "
             f"server CPU ms/req ({x} / {y}) | of which {x}'s event loop | client cores ({x} / {y}) | mean batch ({x} / {y}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in summary.items():
        a, b = row.get(a_name), row.get(b_name)
        if a and b:
            lines.append(f"| {label} | {a['rps']:.0f} | {b['rps']:.0f} | **{row['ratio']['rps']:.2f}x** | "
                         f"{a['p50_ms']:.2f} / {b['p50_ms']:.2f} | {a['p99_ms']:.2f} / {b['p99_ms']:.2f} | "
                         f"{a['server_cpu_ms_per_req']:.3f} / {b['server_cpu_ms_per_req']:.3f} | "
                         f"{a['main_thread_cpu_ms_per_req']:.3f} | {a['client_cores']:.2f} / {b['client_cores']:.2f} | "
                         f"{a['mean_batch']:.1f} / {b['mean_batch']:.1f} |")
        else:
            (name, v), = [(k, v) for k, v in row.items() if k in (a_name, b_name)]
            lines.append(f"| {label} ({name} only) | {v['rps']:.0f} | | | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                         f"{v['server_cpu_ms_per_req']:.3f} | {v['main_thread_cpu_ms_per_req']:.3f} | "
                         f"{v['client_cores']:.2f} | {v['mean_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def ready(port: int) -> bool:
    with contextlib.suppress(OSError):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status == 200
    return False
