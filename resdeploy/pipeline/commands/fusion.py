"""``resdeploy fusion LAYERS.json [--onnx MODEL.onnx] [--json]``: where did TensorRT put each residual Add?"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fusion", help="TensorRT fusion report: the engine layer that absorbed each residual Add",
                       description="Report, from TensorRT's engine-inspector layer information (the JSON that "
                                   "`trtexec --exportLayerInfo` or IEngineInspector writes; a .plan needs TensorRT and a "
                                   "GPU), which engine layer runs each residual Add: fused into the branch or the "
                                   "projection convolution, or a standalone elementwise layer (a warning).")
    p.add_argument("layers", metavar="LAYERS.json|PLAN", help="layer-information JSON, or a .plan/.engine with its sidecar")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="map the skip-add check's residual Adds of this model to engine layers "
                                                        "(default: every Add-named node in the layer names)")
    p.add_argument("--profile", type=int, default=0, help="optimisation profile whose layers to read (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--require-fused", action="store_true",
                   help="exit 1 unless every residual Add is fused into a convolution (for CI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from resdeploy.errors import CheckFailed, InputError
    from resdeploy.engines.tensorrt_fusion import fusion_report, load_layer_info, parse_layer_info

    path = Path(args.layers)
    if path.suffix in (".plan", ".engine", ".trt"):
        from resdeploy.engines.tensorrt_build import engine_layer_info

        layers = parse_layer_info(engine_layer_info(path), source=str(path), profile=args.profile)
    else:
        layers = load_layer_info(path, profile=args.profile)
    residual_adds, model = None, None
    if args.onnx:
        try:
            from resdeploy.export.skipadd import find_residual_adds, load_onnx
        except ImportError as exc:
            raise InputError(f"--onnx needs the skip-add check (resdeploy.export.skipadd), which did not import: {exc}") from None
        model = load_onnx(args.onnx)
        residual_adds = find_residual_adds(model)
        if not residual_adds:
            raise InputError(f"{args.onnx} has no residual Adds (skip-add check found none); is it a residual network?")
    report = fusion_report(layers, residual_adds, model, source=str(path))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.require_fused and not report.all_fused:
        raise CheckFailed(f"{len(report.adds) - report.fused_count} of {len(report.adds)} residual Adds are not fused into a "
                          "convolution (see the warnings above)")
    return 0
