"""The zoo tier's networks, measured: short paths found by kind, check result, surgeries caught (at which block),
export and check time. Writes benchmarks/results/zoo-networks.json and .md (a table), with the CPU and ISA.

Runs in the zoo venv (torchvision + timm): ``make zoo-venv && .venv-zoo/bin/python benchmarks/zoo_networks.py``.
Timings are wall-clock seconds on this machine in this run; the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resdeploy.pipeline.machine import machine_line  # noqa: E402
from resdeploy import atomic  # noqa: E402
from tests.zoo import onnx_surgery  # noqa: E402
from tests.zoo.networks import NETWORKS, SURGERIES, Network, expected_blocks, export_network, images  # noqa: E402


def surgery_result(name: str, proto: Any, reference: Any, x: Any, block: str, earlier: list[str]) -> dict[str, Any]:
    """One surgery on ``block``: whether the check caught it (passed, for the swap) and where it said it is.
    ``reference``: the module's trace (made once per network)."""
    from resdeploy.export import check_short_paths

    t0 = time.perf_counter()
    report = check_short_paths(onnx_surgery.apply(name, proto, block, earlier), reference, x[:2])
    seconds = time.perf_counter() - t0
    first = report.defects[0] if report.defects else None
    expected_pass = name == "swapped"
    ok = bool(report) if expected_pass else (not report and first is not None and first.block == block)
    by = None if first is None else ("numbers" if "differs from PyTorch" in first.message else "structure")
    return {"surgery": name, "block": block, "passed_check": bool(report), "expected": "pass" if expected_pass else "fail",
            "caught": ok, "caught_by": by, "reported_block": first.block if first else None,
            "message": first.message if first else None, "check_s": round(seconds, 2)}


def measure(net: Network, work: Path) -> dict[str, Any]:
    import onnx
    import torch

    from resdeploy.export import check_short_paths, trace_short_paths

    x = images(8)
    model, export, export_s = export_network(net, work, x)
    t0 = time.perf_counter()
    report = check_short_paths(export.path, model, x[:2])
    check_s = time.perf_counter() - t0
    proto = onnx.load(str(export.path))
    blocks = expected_blocks(net, model)
    block, earlier = onnx_surgery.target_block(blocks, proto)
    trace = trace_short_paths(model, torch.from_numpy(x[:1]))
    surgeries = [surgery_result(s, proto, trace, x, block, earlier) if s in net.surgeries else
                 {"surgery": s, "block": block, "caught": None, "note": "not applicable: no tensor of the skip's "
                  "shape inside the branch" if s == "inside_branch" else "not applicable to a concat"}
                 for s in SURGERIES]
    data = report.to_dict()
    return {"network": net.id, "source": f"{net.source} {net.name}", "pattern": net.pattern, "kwargs": net.kwargs,
            "kinds": {k: v for k, v in data["kinds"].items() if v}, "expected_kinds": net.kinds,
            "residual_adds": data["residual_adds"], "passed": bool(report), "blocks_named_right":
            [r.block for r in report.rows] == blocks, "export_s": round(export_s, 2), "check_s": round(check_s, 2),
            "parity_max_rel_err": export.parity.max_rel_err, "onnx_mb": round(export.size_bytes / 1e6, 1),
            "surgeries": surgeries}


def markdown(result: dict[str, Any]) -> str:
    short = {"removed": "rm", "rewired": "rewire", "inside_branch": "inside", "scaled_to_zero": "x0",
             "add_to_sub": "sub", "swapped": "swap"}
    lines = ["# Zoo tier: real networks through export + short-path check + graph surgery", "",
             f"Machine: {result['machine']}; load average {result['load_average']}. "
             f"torch {result['versions'].get('torch', '?')}, torchvision {result['versions'].get('torchvision', '?')}, "
             f"timm {result['versions'].get('timm', '?')}. Input 3x64x64, random weights (realistic: constant inits "
             "re-drawn, BatchNorm statistics from real digits), check on 2 real images.", "",
             "Surgeries (each on the block named): rm = skip removed, rewire = skip from an earlier block's input or "
             "skip (DenseNet: a layer's features replaced by another layer's), inside = skip from inside the branch, "
             "x0 = skip scaled to zero, sub = Add turned into Sub; each must fail naming that block first: ok (s) when "
             "the structural diff names it, ok (n) when the numbers (outputs and operands vs PyTorch) do. swap = "
             "operands swapped, must pass: ok. n/a: the surgery does not apply (no tensor of the skip's shape inside "
             "a bottleneck or inverted residual; no Add in a concat).", "",
             "| network | pattern | short paths by kind | check | surgery block | " +
             " | ".join(short.values()) + " | export s | check s |",
             "|---|---|---|---|---|" + "---|" * len(short) + "---:|---:|"]
    for r in result["networks"]:
        kinds = ", ".join(f"{v} {k}" for k, v in r["kinds"].items()) or "none"
        marks = []
        for s in r["surgeries"]:
            tag = f" ({s['caught_by'][0]})" if s.get("caught_by") and s["expected"] == "fail" else ""
            marks.append("n/a" if s["caught"] is None else f"ok{tag}" if s["caught"] else "MISSED")
        lines.append(f"| {r['network']} | {r['pattern']} | {kinds} | {'pass' if r['passed'] else 'FAIL'} | "
                     f"{r['surgeries'][0]['block']} | " + " | ".join(marks) + f" | {r['export_s']:.1f} | {r['check_s']:.1f} |")
    lines += ["", f"Whole run: {result['wall_s']:.0f} s. Per-surgery check times and the first defect's message are in "
              "zoo-networks.json."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="network ids (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo-networks"),
                    help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    import timm
    import torch
    import torchvision

    nets = [n for n in NETWORKS if args.only is None or n.id in args.only]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in nets:
            print(f"{net.id} ...", flush=True)
            rows.append(measure(net, Path(tmp)))
            print(f"  {rows[-1]['kinds']} {'pass' if rows[-1]['passed'] else 'FAIL'} export {rows[-1]['export_s']} s "
                  f"check {rows[-1]['check_s']} s", flush=True)
    result = {"machine": machine_line(), "load_average": [round(v, 2) for v in os.getloadavg()],
              "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__},
              "wall_s": round(time.perf_counter() - t0, 1), "networks": rows}
    out = Path(args.out)
    atomic.write_json(out.with_suffix(".json"), result)
    atomic.write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    bad = [r["network"] for r in rows if not r["passed"] or any(s["caught"] is False for s in r["surgeries"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
