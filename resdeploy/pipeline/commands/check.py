from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check the short paths (residual adds, concats...) of an ONNX model, against a "
                                     "checkpoint when given")
    p.add_argument("onnx_model", metavar="MODEL", help="ONNX file")
    p.add_argument("--reference", default=None, help="checkpoint the model was exported from: compare structure and numbers "
                                                     "(or your network: --model with --weights)")
    p.add_argument("--arch", default=None, help="architecture of a bare state_dict reference")
    p.add_argument("--images", type=int, default=2, help="held-out images for the per-block numeric comparison")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (residual_adds, and short paths per kind under \"kinds\")")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.errors import InputError
    from resdeploy.pipeline.commands.model_args import source_from_args
    from resdeploy.pipeline.exporting import check_onnx

    src = source_from_args(args)
    if src is not None and args.reference:
        raise InputError("check: give --reference CHECKPOINT or --model, not both")
    reference = src.reference().model if src is not None else args.reference
    report = check_onnx(args.onnx_model, reference, arch=args.arch, images=args.images, data=args.data)
    print(report.to_json() if args.json else report)
    return 0 if report else 1
