from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from resdeploy.serve.config import add_arguments

    p = sub.add_parser("serve", help="serve a Triton model repository over the KServe v2 / Triton HTTP and gRPC protocols")
    p.add_argument("repo", help="model repository: REPO/<model>/config.pbtxt + REPO/<model>/<version>/model.onnx|model.plan")
    add_arguments(p)  # every option is a ServerConfig field: its flag, default and help are written there
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.serve.config import from_arguments
    from resdeploy.serve.server import serve

    return serve(args.repo, from_arguments(args))
