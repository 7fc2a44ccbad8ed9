from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build an ONNX model (any precision) into an engine artifact: ONNX Runtime "
                                     "(optimised graph + fusion report) or a TensorRT plan")
    p.add_argument("model", help="ONNX model (fp32, or a variant from `resdeploy quantize`)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="onnxruntime",
                   help="auto: TensorRT where usable; on a CPU the ONNX Runtime build plus every CPU engine "
                        "(ONNX Runtime, OpenVINO) timed here, the fastest recorded in engine-choice.json")
    p.add_argument("--choice-batches", default="1", help="auto on a CPU: comma list of batch sizes to time (default 1)")
    p.add_argument("--choice-seconds", type=float, default=10.0, help="auto on a CPU: seconds spent timing (default 10)")
    p.add_argument("--out", required=True, help="output folder (onnxruntime), or .plan file / folder (tensorrt)")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                   help="onnxruntime graph optimisation level (default all)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="onnxruntime execution provider")
    p.add_argument("--data", default="mnist", help="real images for the build's output check")
    p.add_argument("--rewrite-option-a", action="store_true",
                   help="FP32: rewrite option-A shortcuts (Slice+Pad) as exact strided 1x1 convs so ONNX Runtime fuses their Adds")
    p.add_argument("--min-batch", type=int, default=None, help="tensorrt profile min batch")
    p.add_argument("--opt-batch", type=int, default=None, help="tensorrt profile opt batch")
    p.add_argument("--max-batch", type=int, default=None, help="tensorrt profile max batch")
    p.add_argument("--json", action="store_true", help="print the onnxruntime fusion report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from resdeploy.pipeline.building import BuildConfig, build

    config = BuildConfig(backend=args.backend, optimization=args.optimization, threads=args.threads,
                         provider=args.provider, data=args.data,
                         rewrite_option_a=args.rewrite_option_a,
                         choice_batches=tuple(int(b) for b in args.choice_batches.split(",") if b.strip()),
                         choice_seconds=args.choice_seconds)
    if args.backend in ("tensorrt", "auto"):
        from resdeploy.engines.tensorrt_build import TrtBuildConfig

        # Only the flags given are the user's; the defaults move inside them (e.g. --max-batch 4 alone gives opt 4).
        d = TrtBuildConfig()
        lo = args.min_batch or d.min_batch
        hi = args.max_batch or max(d.max_batch, lo)
        opt = args.opt_batch or min(max(d.opt_batch, lo), hi)
        config.trt = TrtBuildConfig(min_batch=lo, opt_batch=opt, max_batch=hi)
    report = build(args.model, args.out, config=config)
    if args.json and args.backend in ("onnxruntime", "auto") and hasattr(report, "fusion"):
        doc = {"build": report.build, "fusion": report.fusion.to_dict()}
        if hasattr(report, "choice"):
            doc["engine_choice"] = report.choice.to_dict()
        print(json.dumps(doc, indent=2))
    else:
        print(report)
    return 0
