from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repo", help="make a Triton model repository (config.pbtxt + version folder) from an ONNX model")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--out", required=True, help="repository folder (REPO/<name>/config.pbtxt, REPO/<name>/<version>/model.onnx)")
    p.add_argument("--name", default="resnet20", help="model name (the folder name and the URL's <model>)")
    p.add_argument("--version", type=int, default=1, help="version folder to write")
    p.add_argument("--max-batch-size", type=int, default=32, help="0: the model has no batch axis")
    p.add_argument("--preferred", type=int, nargs="*", default=[], help="preferred batch sizes of the dynamic batcher")
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="how long a batch may wait to fill (microseconds)")
    p.add_argument("--max-queue-size", type=int, default=0, help="queued requests beyond this get 503 (0 = unbounded)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count: parallel model instances")
    p.add_argument("--kind", choices=("KIND_AUTO", "KIND_CPU", "KIND_GPU"), default="KIND_AUTO", help="instance_group kind")
    p.add_argument("--no-dynamic-batching", action="store_true", help="omit dynamic_batching (one request per execution)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.pipeline.repository import make_model_repository

    result = make_model_repository(args.model, args.out, model_name=args.name, max_batch_size=args.max_batch_size,
                                   preferred_batch_sizes=tuple(args.preferred), max_queue_delay_us=args.max_queue_delay_us,
                                   max_queue_size=args.max_queue_size, instances=args.instances,
                                   dynamic_batching=not args.no_dynamic_batching, kind=args.kind, version=args.version,
                                   overwrite=args.overwrite)
    print(result)
    return 0
