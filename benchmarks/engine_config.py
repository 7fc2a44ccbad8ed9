"""The engine configuration resdeploy serves against the anchors users would try, on this machine, in one run.

    .venv/bin/python benchmarks/engine_config.py --arch resnet50 --batches 1,8 --out benchmarks/results/engine-config
    .venv/bin/python benchmarks/engine_config.py --checkpoint runs/resnet50-224 --batches 1,8   # a trained one

What it does, as `resdeploy run` does it:
1. The FP32 and INT8 variants of the network (``--checkpoint``, else random weights, seed 0: whose near-uniform
   logits make INT8's top-1 agreement gate hard to pass; INT8 calibrated on the val split) in
   ``--workdir`` (reused when already there: resnet50's INT8 takes minutes).
2. The engine choice: every CPU engine x precision x settings judged by the parity gates on the test images, those
   that pass timed at ``--batches`` (engine_choice.choose_engine), the fastest kept.
3. The bench, with the chosen configuration as its served case and the anchors: PyTorch eager, OpenVINO with its
   own defaults on the FP32 file and on resdeploy's INT8 file; every case's parity beside its speed.

Writes ``<model>-<cpu>-engine-choice.json``, ``<model>-<cpu>-bench.json``/``.md`` and
``<model>-<cpu>-verdict.json``/``.md``: per batch size, the served configuration's p50 against the fastest anchor
that passed parity (target: at least as fast), and its fraction of the machine's int8 peak. The verdict is the
bench's (timed interleaved with the anchors), not the choice's own timing. Speed is judged here, never in tests.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path

from resdeploy import atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", help="random weights of this architecture (without --checkpoint)")
    p.add_argument("--checkpoint", default="", help="a trained checkpoint folder instead of random weights")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--weights", default="", help="choice_weights per batch size, e.g. 3,1 (default equal)")
    p.add_argument("--choice-seconds", type=float, default=40.0)
    p.add_argument("--bench-seconds", type=float, default=500.0)
    p.add_argument("--limit", type=int, default=200, help="test images each configuration's parity is judged on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/resdeploy-engine-config")
    p.add_argument("--out", default="benchmarks/results/engine-config")
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    weights = [float(w) for w in args.weights.split(",")] if args.weights else []

    from resdeploy.pipeline import workbench as wb
    from resdeploy.pipeline.bench import BenchConfig, run_bench
    from resdeploy.pipeline.engine_choice import check_configurations, choose_engine, configurations
    from resdeploy.pipeline.gates import ParityGates
    from resdeploy.pipeline.machine import isa_line, machine_info

    t0 = time.perf_counter()
    ref = wb.load_reference(args.checkpoint) if args.checkpoint else wb.load_reference(arch=args.arch)
    name = Path(args.checkpoint).name if args.checkpoint else args.arch
    data = wb.load_parity_data(ref, args.limit, 64)
    work = Path(args.workdir) / name
    given = {p: work / f"{p}.onnx" for p in ("fp32", "int8") if (work / f"{p}.onnx").is_file()}
    paths = wb.prepare_variants(ref, work, ("fp32", "int8"), data.calibration, given=given, progress=print,
                                sample=data.images[:4])
    print(f"variants ready in {time.perf_counter() - t0:.0f} s: {paths}")
    gates = ParityGates()
    cands = configurations([(b, p, paths[p]) for b in ("onnxruntime", "openvino") for p in ("fp32", "int8")])
    cands = check_configurations(cands, ref.logits(data.images), data, gates, threads=args.threads, say=print)
    choice = choose_engine(cands, batches=batches, threads=args.threads, seconds=args.choice_seconds,
                           image=data.images[:1], weights=weights)
    print(choice)
    served = {"backend": choice.backend, "precision": choice.precision, "settings": dict(choice.settings)}
    bc = BenchConfig(reference=ref, gates=gates, batches=batches, max_seconds=args.bench_seconds, threads=args.threads,
                     backends=("onnxruntime", "openvino"), precisions=("fp32", "int8"), anchors=("eager", "openvino"),
                     variants={k: str(v) for k, v in paths.items()}, served=served)
    out = Path(args.out)
    tmp = out / ".bench-tmp"
    result = run_bench(bc, out_dir=tmp, stream=io.StringIO())
    print(result)

    m = machine_info()
    stem = f"{name}-{_slug(m.get('cpu_model') or 'cpu')}"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / f"{stem}-engine-choice.json", choice.to_dict())
    for suffix in (".json", ".md"):
        (tmp / f"bench{suffix}").replace(out / f"{stem}-bench{suffix}")
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    verdict = _verdict(result, batches, name, ref.name + ("" if ref.trained else ", random weights"), isa_line(result.machine))
    atomic.write_json(out / f"{stem}-verdict.json", verdict)
    atomic.write_text(out / f"{stem}-verdict.md", _verdict_md(verdict))
    print(_verdict_md(verdict))
    return 0 if verdict["met"] else 1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _verdict(result, batches, name: str, model: str, isa: str) -> dict:
    """Per batch size: the served case, the fastest anchor passing parity, the ratio and the fractions of peak."""
    served = result.served()
    rows = []
    for b in batches:
        row = {"batch": b, "served": served.name if served else None}
        if served is None or b not in served.stats:
            rows.append({**row, "met": False, "why": "the served configuration was not measured"})
            continue
        anchor = result.best(b, "anchor")
        s_p50 = served.stats[b].p50_ms
        row.update(served_p50_ms=s_p50, served_parity=(served.parity or {}).get("passed"),
                   served_int8_peak=result.fraction_of_peak(served, b, "int8"),
                   speedup_vs_eager=result.speedups(b).get(served.name),
                   cases={c.name: {"p50_ms": c.stats[b].p50_ms, "kind": c.kind,
                                   "parity": (c.parity or {}).get("passed"),
                                   "int8_peak": result.fraction_of_peak(c, b, "int8")}
                          for c in result.cases if b in c.stats})
        if anchor is not None:
            row.update(anchor=anchor.name, anchor_p50_ms=anchor.stats[b].p50_ms,
                       served_speed_vs_anchor=anchor.stats[b].p50_ms / s_p50)
        # "at least as fast": within the run's own repeatability (p50 of interleaved blocks), 2 %
        row["met"] = bool(row.get("served_parity")) and (anchor is None or s_p50 <= 1.02 * anchor.stats[b].p50_ms)
        rows.append(row)
    return {"format": "resdeploy-engine-config/1", "model": name, "reference": model, "isa": isa, "macs_per_image": result.macs, "machine": result.machine,
            "command": "benchmarks/engine_config.py " + " ".join(sys.argv[1:]), "served": served.name if served else None,
            "rows": rows, "met": all(r["met"] for r in rows)}


def _verdict_md(v: dict) -> str:
    m = v["machine"]
    lines = [f"# {v['model']}: the served engine configuration against the anchors", "",
             f"- machine: {m.get('cpu_model')}, {m.get('usable_cpus')} usable CPUs; ISA: {v['isa']}",
             f"- load average at start/end: {m.get('load_average_start')} / {m.get('load_average_end')}",
             "- % of int8 peak: 2 x MACs x batch / p50 over the theoretical int8 peak at the nominal clock; above 100 % "
             "means the cores ran faster than nominal (turbo, which a VM does not report)",
             f"- command: `{v['command']}`; served: **{v['served']}**", ""]
    for r in v["rows"]:
        lines += [f"## batch {r['batch']}", "", "| case | kind | p50 ms | x eager | % of int8 peak | parity |",
                  "|---|---|---:|---:|---:|---|"]
        eager = (r.get("cases") or {}).get("torch eager fp32", {}).get("p50_ms")
        for name, c in sorted((r.get("cases") or {}).items(), key=lambda kv: kv[1]["p50_ms"]):
            pk = f"{100 * c['int8_peak']:.1f}%" if c.get("int8_peak") is not None else "-"
            x = f"{eager / c['p50_ms']:.1f}" if eager else "-"
            mark = " (served)" if name == r.get("served") else ""
            lines.append(f"| {name}{mark} | {c['kind']} | {c['p50_ms']:.3f} | {x} | {pk} | "
                         f"{'pass' if c['parity'] else 'FAIL' if c['parity'] is False else '-'} |")
        if "anchor" in r:
            lines.append(f"\nServed {r['served']}: {r['served_speed_vs_anchor']:.2f}x the speed of the fastest anchor "
                         f"passing parity ({r['anchor']}); target met: {'yes' if r['met'] else 'NO'}.\n")
        else:
            lines.append(f"\nTarget met: {'yes' if r['met'] else 'NO'} ({r.get('why', 'no anchor passed parity')}).\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
