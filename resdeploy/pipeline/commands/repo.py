from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repo", help="make a Triton model repository (config.pbtxt + version folder) from an ONNX model",
                       description="Lay out REPO/<name>/config.pbtxt + REPO/<name>/<version>/model.onnx (or TensorRT "
                                   "plans built from it) for NVIDIA Triton and `resdeploy serve`; optionally a KServe "
                                   "InferenceService manifest next to it.")
    p.add_argument("model", help="the .onnx file (with --plan: the ONNX the plans were built from)")
    p.add_argument("--out", required=True, help="repository folder (REPO/<name>/config.pbtxt, REPO/<name>/<version>/model.onnx)")
    p.add_argument("--name", default="resnet20", help="model name (the folder name and the URL's <model>)")
    p.add_argument("--version", type=int, default=1, help="version folder to write")
    p.add_argument("--version-policy", default="latest:1", metavar="POLICY",
                   help="which versions Triton serves: latest:N, all, or specific:1,3 (default latest:1)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="0: no batching; default: the TensorRT profile's maximum with --plan, else 32")
    p.add_argument("--preferred", type=int, nargs="*", default=[], help="preferred batch sizes of the dynamic batcher")
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="how long a batch may wait to fill (microseconds)")
    p.add_argument("--max-queue-size", type=int, default=0, help="queued requests beyond this are refused (0 = unbounded)")
    p.add_argument("--queue-timeout-us", type=int, default=0, help="a request queued longer is refused (0 = no timeout)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count: parallel model instances")
    p.add_argument("--kind", choices=("KIND_AUTO", "KIND_CPU", "KIND_GPU"), default="KIND_AUTO", help="instance_group kind")
    p.add_argument("--gpus", type=int, nargs="*", default=[], help="GPU ids of the KIND_GPU instance group (default: all)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="omit dynamic_batching (one request per execution)")
    p.add_argument("--warmup", choices=("zero", "random", "none"), default="zero",
                   help="model_warmup samples at batch 1 and max_batch_size, run by Triton at load (default zero)")
    p.add_argument("--plan", action="append", default=[], metavar="PLAN",
                   help="a TensorRT plan built from MODEL (its sidecar PLAN.json beside it); repeat, one per compute "
                        "capability: the model is then served by Triton's tensorrt backend")
    acc = p.add_mutually_exclusive_group()
    acc.add_argument("--trt-accelerator", dest="trt_accelerator", action="store_true", default=None,
                     help="ONNX models: run GPU instances through ONNX Runtime's TensorRT provider (default: on for KIND_GPU)")
    acc.add_argument("--no-trt-accelerator", dest="trt_accelerator", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder's model")
    k = p.add_argument_group("KServe manifest (an InferenceService running this repository on Triton)")
    k.add_argument("--kserve-manifest", metavar="PATH", nargs="?", const="-",
                   help="write the InferenceService YAML (no PATH: beside the repository, <name>-inferenceservice.yaml)")
    k.add_argument("--storage-uri", help="where the cluster finds the repository (s3://, gs://, pvc://...); required with --kserve-manifest")
    k.add_argument("--gpus-per-replica", type=int, default=1, help="nvidia.com/gpu per replica (0 = CPU only)")
    k.add_argument("--min-replicas", type=int, default=1, help="replicas kept running (0 = scale to zero)")
    k.add_argument("--max-replicas", type=int, default=4, help="autoscaling ceiling")
    k.add_argument("--target-concurrency", type=int, default=None,
                   help="in-flight requests per replica the autoscaler aims for (default: 2 x max_batch_size)")
    k.add_argument("--triton-image-tag", default=None, help="Triton server image tag (default: the pinned one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.errors import InputError
    from resdeploy.pipeline.repository import make_model_repository

    if args.kserve_manifest is not None and not args.storage_uri:
        raise InputError("--kserve-manifest needs --storage-uri: where the cluster reads the repository from "
                         "(e.g. s3://bucket/model_repository or pvc://models-pvc/model_repository)")
    result = make_model_repository(args.model, args.out, model_name=args.name, max_batch_size=args.max_batch_size,
                                   preferred_batch_sizes=tuple(args.preferred), max_queue_delay_us=args.max_queue_delay_us,
                                   max_queue_size=args.max_queue_size, instances=args.instances,
                                   dynamic_batching=not args.no_dynamic_batching, kind=args.kind, version=args.version,
                                   overwrite=args.overwrite, queue_timeout_us=args.queue_timeout_us, gpus=args.gpus,
                                   version_policy=args.version_policy, warmup=args.warmup, plans=args.plan,
                                   trt_accelerator=args.trt_accelerator)
    print(result)
    if args.kserve_manifest is not None:
        from resdeploy.pipeline.kserve import write_inference_service

        path = write_inference_service(result, args.kserve_manifest, storage_uri=args.storage_uri,
                                       gpus_per_replica=args.gpus_per_replica, min_replicas=args.min_replicas,
                                       max_replicas=args.max_replicas, target_concurrency=args.target_concurrency,
                                       image_tag=args.triton_image_tag)
        print(f"KServe InferenceService: {path}")
    return 0
