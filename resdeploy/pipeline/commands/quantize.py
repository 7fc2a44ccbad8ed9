from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write the FP16 or INT8 (Q/DQ) variant of an exported FP32 ONNX model, checked")
    p.add_argument("onnx_model", metavar="MODEL", help="the exported FP32 ONNX model")
    p.add_argument("--precision", choices=("fp16", "int8"), required=True)
    p.add_argument("--out", required=True, help="ONNX file to write (atomically, only when every check passes)")
    p.add_argument("--data", default="mnist", help="data for calibration (val split) and the accuracy gate (test split)")
    p.add_argument("--reference", default=None, help="checkpoint the skip-add check compares the variant with (or your "
                                                     "network: --model with --weights)")
    p.add_argument("--backend", choices=("onnxruntime", "openvino", "tensorrt"), default="onnxruntime",
                   help="engine the INT8 variant is for; picks the flavour (onnxruntime/openvino u8s8, tensorrt s8s8)")
    p.add_argument("--flavour", choices=("u8s8", "s8s8"), default=None, help="force the INT8 flavour")
    p.add_argument("--calibration-images", type=int, default=None, help="val images to calibrate on (default 500)")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"), default=None, help="calibration method (default minmax)")
    p.add_argument("--eval-images", type=int, default=None, help="test images for the accuracy gate (default all)")
    p.add_argument("--max-drop", type=float, default=None, help="INT8 accuracy-drop gate in points (default 1.0)")
    p.add_argument("--accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="INT8: search until the accuracy drop on the test split is <= POINTS: calibration methods, "
                        "SmoothQuant scaling, then the most sensitive blocks kept in float one at a time")
    p.add_argument("--search-methods", default=None,
                   help="with --accuracy-drop: calibration methods to try, in order (default minmax,percentile,entropy)")
    p.add_argument("--max-kept", type=int, default=None, help="with --accuracy-drop: most regions kept in float (default 8)")
    p.add_argument("--no-smooth", action="store_true", help="with --accuracy-drop: skip the SmoothQuant step")
    p.add_argument("--min-agreement", type=float, default=None, help="FP16 top-1 agreement gate (default 0.995)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    p.add_argument("--rewrite-option-a", action="store_true",
                   help="rewrite option-A shortcuts as exact strided 1x1 convs before quantizing (ONNX Runtime then fuses their Adds)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_args(p, data=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import sys

    from resdeploy.pipeline.quantizing import QuantizeConfig, quantize_model

    config = QuantizeConfig(precision=args.precision, backend=args.backend, flavour=args.flavour, data=args.data,
                            eval_images=args.eval_images, threads=args.threads,
                            rewrite_option_a=args.rewrite_option_a)
    if args.calibration_images is not None:
        config.calibration_images = args.calibration_images
    if args.method is not None:
        config.int8.method = args.method
    if args.max_drop is not None:
        config.max_int8_drop = args.max_drop
    if args.min_agreement is not None:
        config.min_fp16_agreement = args.min_agreement
    if args.accuracy_drop is not None:
        from resdeploy.errors import InputError
        from resdeploy.pipeline.quantizing import SearchConfig

        if args.precision != "int8":
            raise InputError("--accuracy-drop searches INT8 variants; use it with --precision int8")
        config.max_int8_drop = args.accuracy_drop
        search = SearchConfig()
        if args.search_methods:
            search.methods = tuple(m.strip() for m in args.search_methods.split(",") if m.strip())
        if args.max_kept is not None:
            search.max_kept = args.max_kept
        if args.no_smooth:
            search.smooth_alpha = None
        config.search = search
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.accuracy_drop is not None else None
    from resdeploy.errors import InputError
    from resdeploy.pipeline.commands.model_args import source_from_args

    src = source_from_args(args, data=args.data)
    if src is not None and args.reference:
        raise InputError("quantize: give --reference CHECKPOINT or --model, not both")
    reference = src.reference().model if src is not None else args.reference
    result = quantize_model(args.onnx_model, args.out, config=config, reference=reference, say=say)
    if args.json:
        r = result.report
        print(json.dumps({"path": str(result.path), "precision": result.precision, "flavour": result.flavour,
                          "flavour_reason": result.flavour_reason, "calibration": r.calibration,
                          "graph": dataclasses.asdict(r.graph) if r.graph else None,
                          "fp16": dataclasses.asdict(r.fp16) if r.fp16 else None,
                          "accuracy": dataclasses.asdict(result.accuracy) if result.accuracy else None,
                          "gate": result.gate, "skipadd": result.skipadd.to_dict(),
                          "search": result.search.to_dict() if result.search else None}, indent=2))
    else:
        print(result)
    return 0 if result else 1
