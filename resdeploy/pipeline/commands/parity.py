from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.bench import csv_list
from resdeploy.pipeline.commands.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="compare every backend x precision with PyTorch FP32 on real held-out images; exit 1 on a failed gate")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (model.json + model.safetensors)")
    p.add_argument("--arch", help="instead of a checkpoint: an architecture with random weights (seed 0); "
                                  "data = MNIST digits resized and replicated to its input")
    p.add_argument("--onnx", "--fp32", dest="fp32", help="FP32 ONNX model (default: exported from the checkpoint or "
                                                               "--model); alone, it is also the reference (ONNX Runtime)")
    p.add_argument("--fp16", help="FP16 ONNX model (default: converted from the FP32 model)")
    p.add_argument("--int8", help="INT8 Q/DQ ONNX model (default: quantized u8s8 with val-split calibration)")
    p.add_argument("--backends", type=csv_list, default=("onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt"),
                   help="comma list of onnxruntime, openvino, onnxruntime-cuda, tensorrt (default: all; unavailable ones "
                        "are reported as skipped)")
    p.add_argument("--precisions", type=csv_list, default=("fp32", "fp16", "int8"), help="comma list of fp32, fp16, int8")
    p.add_argument("--limit", type=int, default=None, help="use the first N test images (default: the whole test split)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per engine")
    p.add_argument("--fp32-max-abs", type=float, default=None, help="gate: FP32 max abs logit error (default 1e-4)")
    p.add_argument("--fp32-max-rel", type=float, default=None,
                   help="gate FP32 on max relative error (max |diff| / max |logit| per image) instead of max abs")
    p.add_argument("--fp16-min-agreement", type=float, default=None, help="gate: FP16 top-1 agreement (default 0.995)")
    p.add_argument("--int8-max-drop", type=float, default=None, help="gate: INT8 accuracy drop in points (default 1.0)")
    p.add_argument("--int8-min-agreement", type=float, default=None, help="gate: INT8 top-1 agreement on random-weight models (default 0.95)")
    p.add_argument("--random-weights-gate", choices=("top1", "centered"), default=None,
                   help="INT8 gate metric on random-weight models: top1 agreement (default) or centered top-1 (stricter)")
    p.add_argument("--workdir", help="keep the ONNX variants built here (default: a temporary folder)")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--polygraphy", metavar="DIR", help="also write the Polygraphy kit here: parity's inputs, the "
                   "reference's outputs and block values, probe graphs and the commands that check an engine (TensorRT "
                   "on your GPU) against this reference; variants built here are kept in DIR/variants unless --workdir")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from resdeploy import atomic
    from resdeploy.errors import InputError
    from resdeploy.pipeline.gates import ParityGates
    from resdeploy.pipeline.parity import ParityConfig, run_parity
    from resdeploy.pipeline.workbench import load_reference, make_variant

    import tempfile
    from pathlib import Path

    from resdeploy.pipeline.commands.model_args import source_from_args
    from resdeploy.pipeline.sources import imported_fp32

    alone = None if args.checkpoint or args.arch or args.model else args.fp32  # an FP32 ONNX alone is its own reference
    src = source_from_args(args, precisions=tuple(args.precisions), onnx=alone)
    if sum(map(bool, (args.checkpoint, args.arch, src))) != 1:
        raise InputError("parity: give one of a CHECKPOINT folder, --arch NAME (random weights), --model (your network) "
                         "or --fp32 FILE alone (your ONNX as its own reference)")
    overrides = {k: v for k, v in {"fp32_max_abs": args.fp32_max_abs, "fp32_max_rel": args.fp32_max_rel, "fp16_min_agreement": args.fp16_min_agreement,
                                   "int8_max_accuracy_drop": args.int8_max_drop,
                                   "int8_min_agreement": args.int8_min_agreement,
                                   "random_weights_metric": {"top1": "top1_agreement", "centered": "centered_top1_agreement"}.get(
                                       args.random_weights_gate)}.items() if v is not None}
    config = ParityConfig(backends=tuple(args.backends), precisions=tuple(args.precisions), limit=args.limit,
                          threads=args.threads, gates=dataclasses.replace(ParityGates(), **overrides))
    variants = {k: v for k, v in {"fp32": args.fp32, "fp16": args.fp16, "int8": args.int8}.items() if v}
    reference = src.reference() if src is not None else load_reference(args.checkpoint, args.arch, config.seed)
    workdir = args.workdir or (str(Path(args.polygraphy) / "variants") if args.polygraphy else None)
    with tempfile.TemporaryDirectory(prefix="resdeploy-parity-") as tmp:
        if src is not None:
            variants["fp32"] = imported_fp32(src, Path(workdir or tmp), variants.get("fp32"))
        report = run_parity(reference, {k: v for k, v in variants.items() if v}, config=config, workdir=workdir)
    print(report)
    if args.polygraphy:
        from resdeploy.pipeline.polygraphy_kit import write_run_kit

        judged = {k: Path(variants[k]) if variants.get(k) else Path(workdir) / f"{k}.onnx" for k in config.precisions}
        s8s8 = Path(workdir) / "int8-s8s8.onnx"  # TensorRT takes symmetric int8: the kit's --trt INT8 line needs it
        if "int8" in judged and "fp32" in judged and reference.model is not None:
            if not s8s8.is_file():
                make_variant(reference, judged["fp32"], s8s8, "int8", flavour="s8s8")
            judged["int8-s8s8"] = s8s8
        kit = write_run_kit(args.polygraphy, reference, judged, config.gates, limit=args.limit)
        print(f"wrote the Polygraphy kit to {kit.folder} ({len(kit.commands)} checks: {kit.folder / 'README.md'})",
              file=sys.stderr)
    if args.json:
        atomic.write_json(args.json, report.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    if not report:
        fails = report.failures()
        first = str(fails[0]) if fails else "no backend ran"
        print(f"resdeploy parity: gate failed: {first}" + (f" (+{len(fails) - 1} more)" if len(fails) > 1 else ""), file=sys.stderr)
        return 1
    return 0
