from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.model_args import add_model_args


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency and throughput of every backend x precision x batch, with PyTorch/OpenVINO anchors")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (or use --arch for random weights)")
    p.add_argument("--arch", help="an architecture with random weights (seed 0), e.g. resnet18, resnet50")
    p.add_argument("--batches", type=int_list, default=(1, 8, 32), help="comma list of batch sizes (default 1,8,32)")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument("--runs", type=int, default=None, help="timed runs per case and batch (default 100)")
    timing.add_argument("--duration", type=float, default=None, help="seconds of timed rounds per batch size instead of --runs")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per case and batch (default 5)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="the whole bench never runs longer than this (default 300)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, ONNX Runtime and OpenVINO (default 2)")
    p.add_argument("--backends", type=csv_list, default=("onnxruntime", "openvino"),
                   help="resdeploy engines: onnxruntime, openvino (and onnxruntime-cuda, tensorrt with --gpu)")
    p.add_argument("--precisions", type=csv_list, default=("fp32", "fp16", "int8"), help="comma list of fp32, fp16, int8")
    p.add_argument("--anchors", type=csv_list, default=("eager", "compile", "openvino"),
                   help="comparison points: eager (always), compile, openvino (f32 and OpenVINO's default precision)")
    p.add_argument("--gpu", action="store_true", help="add the GPU section where CUDA is present")
    p.add_argument("--settings", choices=("default", "all"), default="default",
                   help="engine settings timed: each runner's defaults, or all the engine choice searches "
                        "(ONNX Runtime spinning off, OpenVINO's own hints)")
    p.add_argument("--parity-samples", type=int, default=64, help="real images each case's parity is checked on (default 64)")
    p.add_argument("--fp32-max-rel", type=float, default=None,
                   help="parity gate: FP32 on max relative error instead of max abs 1e-4 (random nets have large logits)")
    p.add_argument("--ort-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ONNX Runtime session config entry for every ORT case (repeatable)")
    p.add_argument("--fp32", dest="fp32", help="use this FP32 ONNX model instead of exporting one; alone, it is also the "
                                               "reference (ONNX Runtime)")
    p.add_argument("--fp16", help="use this FP16 ONNX model")
    p.add_argument("--int8", help="use this INT8 ONNX model")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys
    import tempfile
    from pathlib import Path

    from resdeploy.errors import InputError
    from resdeploy.pipeline.bench import BenchConfig, run_bench
    from resdeploy.pipeline.commands.model_args import source_from_args
    from resdeploy.pipeline.gates import ParityGates
    from resdeploy.pipeline.sources import imported_fp32

    ort_config = {}
    for item in args.ort_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--ort-config {item!r}: write KEY=VALUE, e.g. session.intra_op.allow_spinning=0")
        ort_config[key] = value
    gates = ParityGates() if args.fp32_max_rel is None else dataclasses.replace(ParityGates(), fp32_max_rel=args.fp32_max_rel)
    alone = None if args.checkpoint or args.arch or args.model else args.fp32  # an FP32 ONNX alone is its own reference
    src = source_from_args(args, precisions=tuple(args.precisions), onnx=alone)
    with tempfile.TemporaryDirectory(prefix="resdeploy-bench-") as tmp:
        fp32 = imported_fp32(src, Path(tmp), args.fp32) if src is not None else args.fp32
        config = BenchConfig(gates=gates, checkpoint=args.checkpoint, arch=args.arch,
                             reference=src.reference() if src is not None else None, batches=tuple(args.batches),
                             warmup=args.warmup, runs=args.runs if args.runs is not None else (None if args.duration else 100),
                             duration=args.duration, max_seconds=args.max_seconds, threads=args.threads,
                             backends=tuple(args.backends), precisions=tuple(args.precisions), anchors=tuple(args.anchors),
                             gpu=args.gpu, settings=args.settings, parity_samples=args.parity_samples, ort_session_config=ort_config,
                             variants={k: v for k, v in {"fp32": fp32, "fp16": args.fp16, "int8": args.int8}.items() if v})
        result = run_bench(config, out_dir=args.out)
    print(result)
    if not result:
        print("resdeploy bench: no resdeploy engine was measured with a passing parity gate", file=sys.stderr)
        return 1
    return 0
