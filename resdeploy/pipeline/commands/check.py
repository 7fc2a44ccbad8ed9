from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check the short paths (residual adds, concats...) of an ONNX model, against a "
                                     "checkpoint when given")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--reference", default=None, help="checkpoint the model was exported from: compare structure and numbers")
    p.add_argument("--arch", default=None, help="architecture of a bare state_dict reference")
    p.add_argument("--images", type=int, default=2, help="held-out images for the per-block numeric comparison")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (residual_adds, and short paths per kind under \"kinds\")")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.pipeline.exporting import check_onnx

    report = check_onnx(args.model, args.reference, arch=args.arch, images=args.images)
    print(report.to_json() if args.json else report)
    return 0 if report else 1
