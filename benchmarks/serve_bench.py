"""Benchmark of `resdeploy serve` against the issue's two targets, on loopback:

1. Protocol overhead at batch 1 with binary tensors: server round-trip p50 minus the runner's own p50 (<= 1 ms),
   over HTTP (http.client keep-alive, pre-encoded body) and over gRPC (a grpc stub on one channel, pre-built
   ModelInferRequest with raw_input_contents), plus the same through tritonclient.http and tritonclient.grpc.
   Runner and round-trip samples are taken in alternating blocks so machine noise hits all of them alike.
2. Throughput at 16 concurrent clients with dynamic batching vs the same server with batching off (>= 2x).
   Interleaved rounds (unbatched, batched, unbatched, ...) with identical load; executed batch sizes from /stats.

    .venv/bin/python benchmarks/serve_bench.py --out runs/serve-bench [--onnx model.onnx] [--seconds 5 --rounds 3]
    .venv/bin/python benchmarks/serve_bench.py --out runs/serve-bench --overhead-only   # batch-1 overhead only

Writes OUT/serve_bench.json and OUT/serve_bench.md.

Side by side with the real Triton (benchmarks/side_by_side.py; Triton from benchmarks/triton_harness.py):

    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/vs-triton [--seconds 5 --rounds 3]
    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/vs-triton-1core --server-cpus 0
    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/vs-triton-r50 --resnet50
    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/vs-triton-w --only "16 clients" \
        --server-arg=--workers --server-arg=auto     # resdeploy with one worker per core
    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/ab --ab-against ../main   # A/B: main vs this tree
    .venv/bin/python benchmarks/serve_bench.py --vs-triton --out runs/ab-h2 --ab-against . --only gRPC \
        --reference-arg=--grpc-transport --reference-arg=h2     # A/B of two settings of this tree
    .venv/bin/python benchmarks/serve_bench.py --smoke --out runs/smoke     # CI: runs, every answer checked

Writes OUT/vs_triton.json and OUT/vs_triton.md (with each server's CPU per request, and how much of resdeploy's is
its event loop, the Python per request, rather than the model's thread); exits 1 if any answer was wrong.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.side_by_side import model_stats  # noqa: E402
from resdeploy import atomic  # noqa: E402
from resdeploy.pipeline.machine import machine_info, machine_line  # noqa: E402
from resdeploy.pipeline.repository import make_model_repository  # noqa: E402
from resdeploy.serve.loadgen import LoadConfig, encode_request, run_load  # noqa: E402
from resdeploy.engines import open_runner  # noqa: E402


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """The trained checkpoint as ONNX with a dynamic batch axis (kept independent of resdeploy.export)."""
    import torch

    from resdeploy.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    torch.onnx.export(model, torch.zeros(1, *info.input_spec.shape), str(out), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, threads: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "resdeploy", "serve", str(repo), "--port", str(port), "--grpc-port", "0",
                             "--threads", str(threads)], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{log_path.read_text()}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready in 120 s")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def grpc_port_of(log_path: Path) -> int:
    import re

    found = re.search(r"listening on grpc://[^ ]*:(\d+) ", log_path.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"no gRPC port in the server log {log_path}")
    return int(found.group(1))


def overhead(onnx_path: Path, port: int, grpc_port: int, x: np.ndarray, threads: int, blocks: int, per_block: int) -> dict:
    body, headers = encode_request({"input": x}, binary=True)
    runner_t, http_t, tc_t, grpc_t, tcg_t = [], [], [], [], []
    import grpc
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    tc = th.InferenceServerClient(f"127.0.0.1:{port}")
    tin = th.InferInput("input", list(x.shape), "FP32")
    tin.set_data_from_numpy(x, binary_data=True)
    tout = [th.InferRequestedOutput("logits", binary_data=True)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    # gRPC at the same level as http.client: one channel, the request message built once.
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    greq = service_pb2.ModelInferRequest(model_name="resnet20")
    greq.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    greq.raw_input_contents.append(x.tobytes())
    tcg = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tgin = tg.InferInput("input", list(x.shape), "FP32")
    tgin.set_data_from_numpy(x)
    with open_runner(str(onnx_path), backend="onnxruntime", provider="cpu", threads=threads) as r:
        for _ in range(20):  # warm every path
            r.infer({"input": x})
            conn.request("POST", "/v2/models/resnet20/infer", body=body, headers=headers)
            conn.getresponse().read()
            tc.infer("resnet20", [tin], outputs=tout)
            stub.ModelInfer(greq, timeout=30)
            tcg.infer("resnet20", [tgin])
        for _ in range(blocks):
            for _ in range(per_block):
                t = time.perf_counter()
                r.infer({"input": x})
                runner_t.append(time.perf_counter() - t)
            for _ in range(per_block):
                t = time.perf_counter()
                conn.request("POST", "/v2/models/resnet20/infer", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                http_t.append(time.perf_counter() - t)
                assert resp.status == 200
            for _ in range(per_block):
                t = time.perf_counter()
                tc.infer("resnet20", [tin], outputs=tout)
                tc_t.append(time.perf_counter() - t)
            for _ in range(per_block):
                t = time.perf_counter()
                resp = stub.ModelInfer(greq, timeout=30)
                grpc_t.append(time.perf_counter() - t)
                assert len(resp.raw_output_contents[0]) == 40
            for _ in range(per_block):
                t = time.perf_counter()
                tcg.infer("resnet20", [tgin])
                tcg_t.append(time.perf_counter() - t)
    conn.close()
    tc.close()
    channel.close()
    tcg.close()
    out = {"runner_p50_ms": pct(runner_t, 50), "runner_p90_ms": pct(runner_t, 90),
           "roundtrip_p50_ms": pct(http_t, 50), "roundtrip_p90_ms": pct(http_t, 90), "roundtrip_p99_ms": pct(http_t, 99),
           "tritonclient_p50_ms": pct(tc_t, 50), "tritonclient_p99_ms": pct(tc_t, 99),
           "grpc_roundtrip_p50_ms": pct(grpc_t, 50), "grpc_roundtrip_p90_ms": pct(grpc_t, 90),
           "grpc_roundtrip_p99_ms": pct(grpc_t, 99), "tritonclient_grpc_p50_ms": pct(tcg_t, 50),
           "tritonclient_grpc_p99_ms": pct(tcg_t, 99), "samples_each": len(runner_t)}
    out["overhead_p50_ms"] = out["roundtrip_p50_ms"] - out["runner_p50_ms"]
    out["overhead_tritonclient_p50_ms"] = out["tritonclient_p50_ms"] - out["runner_p50_ms"]
    out["overhead_grpc_p50_ms"] = out["grpc_roundtrip_p50_ms"] - out["runner_p50_ms"]
    out["overhead_tritonclient_grpc_p50_ms"] = out["tritonclient_grpc_p50_ms"] - out["runner_p50_ms"]
    return out


def stats_batches(port: int, model: str) -> dict[int, int]:
    st = model_stats(port, model)
    return {b["batch_size"]: b["compute_infer"]["count"] for b in st["batch_stats"]}


def throughput(port: int, x: np.ndarray, clients: int, seconds: float, rounds: int) -> dict:
    runs = {"resnet20_nobatch": [], "resnet20": []}
    before = stats_batches(port, "resnet20")
    for _ in range(rounds):
        for model in runs:
            r = run_load(LoadConfig(f"http://127.0.0.1:{port}", model, concurrency=clients, duration_s=seconds, warmup_requests=1),
                         {"input": x})
            print(f"  {model:>17}: {r}", flush=True)
            runs[model].append(r.to_json())
    after = stats_batches(port, "resnet20")
    batches = {b: after[b] - before.get(b, 0) for b in sorted(after) if after[b] > before.get(b, 0)}
    unb = float(np.mean([r["throughput_rps"] for r in runs["resnet20_nobatch"]]))
    bat = float(np.mean([r["throughput_rps"] for r in runs["resnet20"]]))
    n = sum(batches.values())
    return {"clients": clients, "seconds": seconds, "rounds": rounds, "unbatched_rps": unb, "batched_rps": bat,
            "ratio": bat / unb if unb else float("nan"), "executed_batch_sizes": batches,
            "mean_batch": sum(b * c for b, c in batches.items()) / n if n else 0.0,
            "errors": sum(r["errors"] for rs in runs.values() for r in rs),
            "batched_p99_ms": max(r["p99_ms"] for r in runs["resnet20"]),
            "unbatched_p99_ms": max(r["p99_ms"] for r in runs["resnet20_nobatch"]), "runs": runs}


def runner_batch_curve(onnx_path: Path, threads: int) -> dict[int, float]:
    """ms per sample at each batch size: whether batching can pay on this device at all."""
    out = {}
    with open_runner(str(onnx_path), backend="onnxruntime", provider="cpu", threads=threads) as r:
        for b in (1, 2, 4, 8, 16, 32):
            x = np.random.default_rng(0).standard_normal((b, 1, 28, 28)).astype(np.float32)
            for _ in range(3):
                r.infer({"input": x})
            ts = []
            for _ in range(max(5, 160 // b)):
                t = time.perf_counter()
                r.infer({"input": x})
                ts.append(time.perf_counter() - t)
            out[b] = float(np.median(ts) * 1e3 / b)
    return out


def overhead_rows(o: dict, threads: int) -> list[str]:
    return [
        f"| runner p50, batch 1 (ORT CPU, {threads} thread) | {o['runner_p50_ms']:.3f} ms | |",
        f"| HTTP round trip p50, batch 1, binary tensors (http.client keep-alive) | {o['roundtrip_p50_ms']:.3f} ms | |",
        f"| **HTTP protocol overhead p50** (round trip - runner) | **{o['overhead_p50_ms']:.3f} ms** | <= 1 ms |",
        f"| gRPC round trip p50, batch 1, raw_input_contents (grpc stub, one channel) | {o['grpc_roundtrip_p50_ms']:.3f} ms | |",
        f"| **gRPC protocol overhead p50** (round trip - runner) | **{o['overhead_grpc_p50_ms']:.3f} ms** | |",
        f"| tritonclient.http round trip p50 (overhead) | {o['tritonclient_p50_ms']:.3f} ms ({o['overhead_tritonclient_p50_ms']:.3f} ms) | |",
        f"| tritonclient.grpc round trip p50 (overhead) | {o['tritonclient_grpc_p50_ms']:.3f} ms "
        f"({o['overhead_tritonclient_grpc_p50_ms']:.3f} ms) | |",
        f"| HTTP round trip p90 / p99 | {o['roundtrip_p90_ms']:.3f} / {o['roundtrip_p99_ms']:.3f} ms | |",
        f"| gRPC round trip p90 / p99 | {o['grpc_roundtrip_p90_ms']:.3f} / {o['grpc_roundtrip_p99_ms']:.3f} ms | |"]


def markdown(res: dict) -> str:
    o, t = res["overhead"], res["throughput"]
    curve = " | ".join(f"b{b}: {v:.3f}" for b, v in res["runner_ms_per_sample"].items())
    if t is None:
        return "\n".join([f"# resdeploy serve benchmark, batch-1 overhead ({res['machine']})", "",
                          "| metric | value | target |", "| --- | --- | --- |", *overhead_rows(o, res["threads"]), "",
                          f"Samples each: {o['samples_each']}, in alternating blocks.", ""])
    return "\n".join([
        f"# resdeploy serve benchmark ({res['machine']})", "",
        "| metric | value | target |", "| --- | --- | --- |",
        *overhead_rows(o, res["threads"]),
        f"| throughput, {t['clients']} clients, batching off | {t['unbatched_rps']:.0f} req/s (p99 {t['unbatched_p99_ms']:.1f} ms) | |",
        f"| throughput, {t['clients']} clients, dynamic batching (max 32, preferred {res['preferred'] or '-'}, "
        f"delay {res['max_queue_delay_us']} us) | {t['batched_rps']:.0f} req/s (p99 {t['batched_p99_ms']:.1f} ms) | |",
        f"| **batched / unbatched** | **{t['ratio']:.2f}x** | >= 2x |",
        f"| mean executed batch (batched) | {t['mean_batch']:.1f} | |",
        f"| errors | {t['errors']} | 0 |", "",
        f"Runner ms per sample by batch size: {curve}", "",
        f"Executed batch sizes (batched runs): {t['executed_batch_sizes']}", ""])


def resnet50_onnx(out: Path) -> Path:
    """A resnet50 at 224x224 (random weights; compute is what matters) through resdeploy's export stage."""
    import torch

    from resdeploy.models.registry import create_model
    from resdeploy.pipeline.workbench import export_fp32

    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=1000, image_size=224).eval()
    return export_fp32(model, out)


def vs_triton(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.side_by_side import Case, markdown as sbs_markdown, run_side_by_side, start_resdeploy, start_triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = {int(c) for c in args.server_cpus.split(",")} if args.server_cpus else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = tmp / "repo"
        if args.resnet50:
            onnx_path = Path(args.onnx) if args.onnx else resnet50_onnx(tmp / "resnet50.onnx")
            make_model_repository(onnx_path, repo, "resnet50", max_batch_size=32)
            shape, out_bytes = (1, 3, 224, 224), 4000
            cases = [Case(f"resnet50 HTTP, {args.clients} clients", "http", "resnet50", args.clients, shape, out_bytes)]
        else:
            onnx_path = Path(args.onnx) if args.onnx else export_checkpoint(Path(args.checkpoint), tmp / "resnet20.onnx")
            make_model_repository(onnx_path, repo, "resnet20", max_batch_size=32)
            shape, out_bytes = (1, 1, 28, 28), 40
            if args.smoke:
                cases = [Case("HTTP, 4 clients", "http", "resnet20", 4, shape, out_bytes),
                         Case("gRPC, 4 clients", "grpc", "resnet20", 4, shape, out_bytes)]
            else:
                make_model_repository(onnx_path, repo, "resnet20_nobatch", max_batch_size=32, dynamic_batching=False)
                c = args.clients
                cases = [Case(f"HTTP, {c} clients, dynamic batching", "http", "resnet20", c, shape, out_bytes),
                         Case("HTTP, 1 client", "http", "resnet20", 1, shape, out_bytes),
                         Case(f"gRPC, {c} clients, dynamic batching", "grpc", "resnet20", c, shape, out_bytes),
                         Case("gRPC, 1 client", "grpc", "resnet20", 1, shape, out_bytes),
                         Case(f"HTTP, {c} clients, batching off", "http", "resnet20_nobatch", c, shape, out_bytes)]
        if args.only:
            cases = [c for c in cases if any(o in c.label for o in args.only)]
        servers = []
        other, other_label = ("reference", "reference") if args.ab_against else ("triton", "Triton")
        own = os.sched_getaffinity(0)
        try:
            print(f"starting resdeploy serve and {other_label} ...", flush=True)
            # Servers start on the pinned cores, as under `taskset`: each sizes its thread pools from the cores it
            # may use (pinning after start left resdeploy with 2 ORT threads on 1 core). The client is not pinned.
            if cpus:
                os.sched_setaffinity(0, cpus)
            servers.append(start_resdeploy(repo, out / "resdeploy.log", tuple(args.server_args)))
            if args.ab_against:  # the same server from another checkout (e.g. main's worktree), same arguments
                servers.append(start_resdeploy(repo, out / "reference.log", tuple(args.server_args + args.reference_args),
                                               name="reference", source=Path(args.ab_against).resolve()))
            else:
                servers.append(start_triton(repo, out))
            os.sched_setaffinity(0, own)
            res = run_side_by_side(servers, cases, args.rounds, args.seconds, cpus)
        finally:
            os.sched_setaffinity(0, own)
            for s in servers:
                s.stop()
    load = Path("/proc/loadavg").read_text().split()[:3]
    info = machine_info()
    res.update({"machine": machine_line(info), "machine_info": info,
                "server_cpus": sorted(cpus) if cpus else "all", "rounds": args.rounds, "seconds": args.seconds,
                "loadavg_at_end": load, "server_args": args.server_args, "model": "resnet50" if args.resnet50 else "resnet20",
                "ab_against": str(Path(args.ab_against).resolve()) if args.ab_against else None,
                "reference_args": args.reference_args})
    errors = sum(v.get("errors", 0) for row in res["summary"].values() for v in row.values() if isinstance(v, dict))
    res["errors"] = errors
    vs = (f"the same server from {res['ab_against']}{' with ' + ' '.join(args.reference_args) if args.reference_args else ''}"
          if args.ab_against else "Triton 2.51")
    title = (f"resdeploy serve vs {vs}, {res['model']}, {args.rounds} interleaved rounds x {args.seconds:g} s, "
             f"server CPUs {res['server_cpus']}, load average at end {' '.join(load)}; {res['machine']}")
    md = sbs_markdown(res["summary"], title, "resdeploy", other, "resdeploy", other_label)
    for label, row in res["summary"].items():
        if "batching off" in label:
            on = next((r for k, r in res["summary"].items() if "dynamic batching" in k and k.startswith("HTTP")), None)
            if on:
                gains = {n: on[n]["rps"] / row[n]["rps"] for n in ("resdeploy", other) if n in row and n in on}
                res["batching_gain"] = gains
                md += "\nDynamic batching gain (HTTP, same server, batched / unbatched req/s): " + ", ".join(
                    f"{n} {g:.2f}x" for n, g in gains.items()) + "\n"
    md += f"\nErrors (wrong or failed answers): {errors}\n"
    atomic.write_json(out / "vs_triton.json", res)
    atomic.write_text(out / "vs_triton.md", md)
    print(md)
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for serve_bench.json and serve_bench.md")
    ap.add_argument("--onnx", help="ONNX model (default: export tests/data/resnet20-mnist)")
    ap.add_argument("--checkpoint", default=str(ROOT / "tests" / "data" / "resnet20-mnist"))
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per instance (server and runner)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved unbatched/batched rounds")
    ap.add_argument("--preferred", type=int, nargs="*", default=[], help="preferred batch sizes of the batched model")
    ap.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batcher delay of the batched model")
    ap.add_argument("--blocks", type=int, default=10, help="alternating latency blocks")
    ap.add_argument("--per-block", type=int, default=50, help="requests per latency block")
    ap.add_argument("--overhead-only", action="store_true", help="only the batch-1 overhead (HTTP and gRPC), no throughput")
    ap.add_argument("--vs-triton", action="store_true", help="side by side with the real Triton (benchmarks/side_by_side.py)")
    ap.add_argument("--smoke", action="store_true", help="--vs-triton, short: 1 round x 1 s, 4 clients, HTTP and gRPC")
    ap.add_argument("--resnet50", action="store_true", help="--vs-triton on a resnet50 at 224x224 (compute-bound)")
    ap.add_argument("--server-cpus", help="--vs-triton: pin both servers to these CPUs (taskset-style list: 0 or 0,1)")
    ap.add_argument("--server-arg", dest="server_args", action="append", default=[],
                    help="--vs-triton: an extra `resdeploy serve` argument (repeatable)")
    ap.add_argument("--only", action="append", default=[], help="--vs-triton: only the cases whose label has this text")
    ap.add_argument("--ab-against", metavar="CHECKOUT",
                    help="--vs-triton with, in Triton's place, `resdeploy serve` from another checkout (an A/B of two "
                         "versions, e.g. main's worktree; same arguments, same interleaving)")
    ap.add_argument("--reference-arg", dest="reference_args", action="append", default=[],
                    help="--ab-against: an extra `resdeploy serve` argument for the reference server only (repeatable; "
                         "e.g. --ab-against . --reference-arg=--grpc-transport --reference-arg=h2: one tree, two settings)")
    args = ap.parse_args()
    if args.smoke:
        args.vs_triton, args.rounds, args.seconds = True, 1, 1.0
    if args.vs_triton:
        return vs_triton(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = Path(args.onnx) if args.onnx else export_checkpoint(Path(args.checkpoint), tmp / "resnet20.onnx")
        repo = tmp / "repo"
        make_model_repository(onnx_path, repo, "resnet20", max_batch_size=32, preferred_batch_sizes=tuple(args.preferred),
                              max_queue_delay_us=args.max_queue_delay_us)
        make_model_repository(onnx_path, repo, "resnet20_nobatch", max_batch_size=32, dynamic_batching=False)
        x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
        print("runner ms/sample by batch size ...", flush=True)
        curve = runner_batch_curve(onnx_path, args.threads) if not args.overhead_only else {}
        proc, port = start_server(repo, args.threads, out / "server.log")
        try:
            print("batch-1 latency: runner vs round trip ...", flush=True)
            ov = overhead(onnx_path, port, grpc_port_of(out / "server.log"), x, args.threads, args.blocks, args.per_block)
            print(f"  {ov}", flush=True)
            tp = None
            if not args.overhead_only:
                print(f"throughput at {args.clients} clients ...", flush=True)
                tp = throughput(port, x, args.clients, args.seconds, args.rounds)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
    info = machine_info()
    res = {"machine": machine_line(info), "machine_info": info,
           "threads": args.threads, "preferred": args.preferred, "max_queue_delay_us": args.max_queue_delay_us,
           "runner_ms_per_sample": curve, "overhead": ov, "throughput": tp, "server_exit": rc}
    atomic.write_json(out / "serve_bench.json", res)
    md = markdown(res)
    atomic.write_text(out / "serve_bench.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
