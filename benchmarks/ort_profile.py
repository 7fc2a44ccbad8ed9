"""Where ONNX Runtime spends its time on a model: its own profiler, aggregated by op type, at batch 1.

    python benchmarks/ort_profile.py int8.onnx [--threads 2] [--runs 50]

Prints per op type: calls per run, total ms per run, share of the run, and the model's MACs per op type so the
achieved GOPS of the convolutions can be set against the CPU's peak (machine.cpu_isa)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from resdeploy.artifact import open_artifact
    from resdeploy.pipeline.bench import model_macs
    from resdeploy.pipeline.machine import isa_line, machine_info

    art = open_artifact(args.model)
    shape = [1 if not isinstance(d, int) else d for d in art.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = args.threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(args.model), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(5):
            sess.run(None, {name: x})
        prof = Path(sess.end_profiling())
        sess = ort.InferenceSession(str(args.model), so, providers=["CPUExecutionProvider"])
        for _ in range(args.runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        del prof
    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    runs = 0
    total_run = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"] / 1e3
            calls[op] += 1
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
            total_run += e["dur"] / 1e3
    runs = max(runs, 1)
    kernel_total = sum(by_op.values()) / runs
    macs = model_macs(args.model)
    print(f"{args.model}: {runs} runs at batch 1, {args.threads} threads; model_run mean {total_run / runs:.3f} ms, "
          f"kernels {kernel_total:.3f} ms; {macs / 1e6:.0f} MMAC per image")
    print(f"{'op':<28} {'calls/run':>9} {'ms/run':>9} {'share':>7}")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"{op:<28} {calls[op] / runs:9.1f} {ms / runs:9.3f} {100 * ms / runs / max(kernel_total, 1e-9):6.1f}%")
    conv_ms = sum(ms for op, ms in by_op.items() if "Conv" in op) / runs
    if conv_ms:
        print(f"convolutions: {2 * macs / (conv_ms / 1e3) / 1e9:.1f} GOPS achieved over {args.threads} thread(s)")
    print("ISA: " + isa_line(machine_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
