from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, verify it (checker, shapes, parity) and check its skip adds")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (model.json + model.safetensors), or a state_dict "
                                                 "file with --arch (or your network: --model)")
    p.add_argument("--out", required=True, help="ONNX file to write (atomically; weights over 2 GB go to OUT.data)")
    p.add_argument("--arch", default=None, help="architecture of a bare state_dict (see `resdeploy models`)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch.onnx exporter (default dynamo)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset to write (default 18; dynamo cannot write < 18)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to 1 instead of a dynamic 'batch' axis")
    p.add_argument("--atol", type=float, default=None, help="FP32 parity gate on the logits (default 1e-4)")
    p.add_argument("--images", type=int, default=None, help="held-out images for the parity check (default 16)")
    p.add_argument("--no-check", action="store_true", help="skip the skip-add check after export")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from resdeploy.errors import InputError
    from resdeploy.export import ExportConfig
    from resdeploy.pipeline.commands.model_args import source_from_args
    from resdeploy.pipeline.exporting import export_checkpoint, export_user_model

    changes = {k: v for k, v in (("exporter", args.exporter), ("opset", args.opset), ("atol", args.atol),
                                  ("parity_images", args.images)) if v is not None}
    config = dataclasses.replace(ExportConfig(), dynamic_batch=not args.static_batch, **changes)
    src = source_from_args(args, precisions=())
    if (src is None) == (args.checkpoint is None):
        raise InputError("export: give a CHECKPOINT or --model MODULE:CALLABLE (your network), not both and not neither")
    if src is not None:
        result = export_user_model(src, args.out, config=config, check=not args.no_check)
    else:
        result = export_checkpoint(args.checkpoint, args.out, arch=args.arch, config=config, check=not args.no_check)
    if args.json:
        e = result.export
        print(json.dumps({"path": str(e.path), "sha256": e.sha256, "exporter": e.exporter, "opset": e.opset,
                          "nodes": e.nodes, "op_counts": e.op_counts, "external_data": e.external_data,
                          "parity": dataclasses.asdict(e.parity), "metadata": e.metadata,
                          "check": result.check.to_dict() if result.check is not None else None}, indent=2))
    else:
        print(result)
    return 0 if result else 1
