"""Why does INT8 lose accuracy on a trained ResNet? The evidence issue 12 asks for, from one checkpoint.

    python benchmarks/int8_diagnose.py CHECKPOINT --workdir /tmp/diag [--search]

Prints (and writes ``diagnosis.json`` in the workdir):

* per-channel activation ranges on the val calibration images: for every block, the worst channel-range ratio
  (largest channel range / median channel range) of its activations: ``255 / ratio`` is how many uint8 steps a
  typical channel gets from a per-tensor scale;
* each residual Add's input scales: the branch's and the shortcut's absolute maxima, their ratio, and the Add
  output's uint8 step against the branch's median channel range;
* BN-folded conv weights: per output channel absolute maxima (max / median over channels), the largest weight;
* plain MinMax INT8 with 100 / 500 / all val images: test-split accuracy and the per-block error from the
  skip-add localisation (cosine of each Add output with PyTorch, and what each block adds);
* with ``--search``: the accuracy-driven search (``quantize --accuracy-drop 1``) step by step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--calibration", default="100,500,1000", help="val images for the MinMax runs (comma list)")
    ap.add_argument("--localise-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--search", action="store_true", help="also run the accuracy-driven search")
    args = ap.parse_args(argv)

    import torch

    from resdeploy.artifact import load_onnx
    from resdeploy.export.calibration import CalibrationSet
    from resdeploy.export.mixed import activation_ranges, regions
    from resdeploy.export.precision import Int8Config, quantize_int8
    from resdeploy.export.skipadd import check_skip_adds, find_residual_adds
    from resdeploy.models import load_checkpoint, load_data, normalize
    from resdeploy.models.data import fit_images
    from resdeploy.pipeline.workbench import export_fp32
    from resdeploy.pipeline.quantizing import _predict

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="int8-diag-"))
    work.mkdir(parents=True, exist_ok=True)
    model, info = load_checkpoint(args.checkpoint)
    spec = model.input_spec
    data = load_data(str(info.metrics.get("data", "mnist")))
    val = normalize(fit_images(data.val.images, spec.shape), spec.mean, spec.std)
    test = normalize(fit_images(data.test.images, spec.shape), spec.mean, spec.std)
    test_y = data.test.labels
    fp32 = work / "fp32.onnx"
    if not fp32.is_file():
        export_fp32(model, fp32, test[:4])
    src = load_onnx(fp32, weights=True)
    out: dict = {"checkpoint": str(args.checkpoint), "arch": info.arch, "input": list(spec.shape),
                 "checkpoint_test_accuracy": info.metrics.get("test_accuracy"), "val_images": len(val)}
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"{info.arch} {'x'.join(map(str, spec.shape))}, checkpoint test accuracy {info.metrics.get('test_accuracy')}")

    # -- activation ranges -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ranges = activation_ranges(src, val[:500], threads=args.threads)
    regs = regions(src)
    adds = {a.node: a for a in find_residual_adds(src)}
    say(f"\nactivation ranges on {min(500, len(val))} val images ({time.perf_counter() - t0:.0f} s)")
    say(f"{'region':<10} {'worst act ratio':>15} {'(tensor)':<14} {'branch max':>10} {'skip max':>9} "
        f"{'out max':>8} {'out step/branch med':>19}")
    per_region = []
    for r in regs:
        acts = [o for n in src.graph.node if n.name in r.nodes and n.op_type == "Relu" for o in n.output if o in ranges]
        worst = max(acts, key=lambda t: ranges[t].outlier_ratio(), default=None)
        row = {"region": r.name, "worst_activation": worst,
               "worst_ratio": ranges[worst].outlier_ratio() if worst else None}
        a = adds.get(r.add)
        if a is not None and a.branch_input in ranges and a.shortcut_input in ranges and a.output in ranges:
            b, sk, o = ranges[a.branch_input], ranges[a.shortcut_input], ranges[a.output]
            step = float(o.high.max() - min(0.0, float(o.low.min()))) / 255.0
            bmed = float(np.median(b.high - b.low))
            row.update(branch_absmax=float(b.absmax.max()), shortcut_absmax=float(sk.absmax.max()),
                       out_absmax=float(o.absmax.max()), out_step=step,
                       out_step_over_branch_median=step / bmed if bmed > 0 else None,
                       branch_channel_ratio=b.outlier_ratio(), out_channel_ratio=o.outlier_ratio())
        per_region.append(row)
        say(f"{r.name:<10} {row['worst_ratio'] or 0:15.1f} {str(worst)[:14]:<14} {row.get('branch_absmax', 0):10.2f} "
            f"{row.get('shortcut_absmax', 0):9.2f} {row.get('out_absmax', 0):8.2f} "
            f"{row.get('out_step_over_branch_median') or 0:19.3f}")
    out["regions"] = per_region

    # -- BN-folded weights -------------------------------------------------------------------------------------
    from onnx import numpy_helper

    inits = {t.name: t for t in src.graph.initializer}
    convs = []
    for n in src.graph.node:
        if n.op_type != "Conv" or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        per_out = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        med = float(np.median(per_out)) or 1e-12
        # within an output channel (what one per-channel scale has to cover): largest over median element
        flat = np.abs(w).reshape(w.shape[0], -1)
        inner = float(np.max(flat.max(axis=1) / np.maximum(np.median(flat, axis=1), 1e-12)))
        convs.append({"conv": n.name, "shape": list(w.shape), "absmax": float(per_out.max()),
                      "out_channel_ratio": float(per_out.max() / med), "within_channel_max_over_median": inner})
    worst_w = sorted(convs, key=lambda c: -c["out_channel_ratio"])[:5]
    say("\nBN-folded conv weights: per-output-channel absmax ratio (max/median), worst 5:")
    for c in worst_w:
        say(f"  {c['conv']:<16} {c['shape']} absmax {c['absmax']:.3g} ratio {c['out_channel_ratio']:.1f} "
            f"within-channel max/median {c['within_channel_max_over_median']:.1f}")
    out["weights"] = {"largest_absmax": max(c["absmax"] for c in convs), "worst": worst_w,
                      "median_out_channel_ratio": float(np.median([c["out_channel_ratio"] for c in convs]))}

    # -- plain MinMax INT8 at several calibration sizes + per-block error ---------------------------------------
    fp32_acc = float((_predict(fp32, test, args.threads) == test_y).mean())
    out["fp32_accuracy"] = fp32_acc
    say(f"\nFP32 ONNX accuracy on the test split ({len(test_y)} images): {fp32_acc:.2%}")
    minmax = []
    for n_cal in [int(x) for x in args.calibration.split(",") if x]:
        n_cal = min(n_cal, len(val))
        path = work / f"int8-minmax-{n_cal}.onnx"
        t0 = time.perf_counter()
        quantize_int8(fp32, path, CalibrationSet(val[:n_cal], "val"), flavour="u8s8",
                      config=Int8Config(method="minmax", max_images=n_cal))
        acc = float((_predict(path, test, args.threads) == test_y).mean())
        skip = check_skip_adds(path, model, val[-args.localise_images:], max_images=args.localise_images)
        rows, prev = [], 0.0
        for r in skip.rows:
            if r.cosine is None:
                continue
            err = 1 - r.cosine
            rows.append({"block": r.block, "cosine": r.cosine, "added_error": max(0.0, err - prev), "rel_err": r.rel_err})
            prev = err
        minmax.append({"calibration_images": n_cal, "accuracy": acc, "first_divergent": skip.first_divergent,
                       "blocks": rows, "seconds": time.perf_counter() - t0})
        worst = sorted(rows, key=lambda r: -r["added_error"])[:4]
        say(f"MinMax INT8, {n_cal} val images: accuracy {acc:.2%} (drop {100 * (fp32_acc - acc):.1f} points), first "
            f"divergent {skip.first_divergent}; largest added errors: "
            + ", ".join(f"{r['block']} {r['added_error']:.3f}" for r in worst))
    out["minmax"] = minmax
    if minmax:
        say("per-block cosine (MinMax, " + str(minmax[-1]["calibration_images"]) + " images): "
            + " ".join(f"{r['block']}={r['cosine']:.3f}" for r in minmax[-1]["blocks"]))

    if args.search:
        from resdeploy.pipeline.quantizing import QuantizeConfig, SearchConfig, quantize_model

        cfg = QuantizeConfig(precision="int8", data=str(info.metrics.get("data", "mnist")), threads=args.threads)
        cfg.search = SearchConfig()
        say("\naccuracy-driven search (quantize --accuracy-drop 1):")
        t0 = time.perf_counter()
        try:
            res = quantize_model(fp32, work / "int8-search.onnx", config=cfg, reference=model, say=lambda m: say("  " + m))
            out["search"] = res.search.to_dict() if res.search else None
            say(str(res.search))
        except Exception as exc:  # noqa: BLE001 - the diagnosis still writes what it found
            out["search"] = {"error": str(exc)}
            say(f"search failed: {exc}")
        out["search_seconds"] = time.perf_counter() - t0
    (work / "diagnosis.json").write_text(json.dumps(out, indent=2, default=float))
    say(f"\nwrote {work / 'diagnosis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
