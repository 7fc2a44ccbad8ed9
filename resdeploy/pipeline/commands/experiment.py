from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproduce the seed's experiments (degradation: plain vs residual depth)")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    d = esub.add_parser("degradation", help="train plain20/56 and resnet20/56 with one schedule; JSON + PNG of "
                        "training and test error per epoch (He et al. 2015, Fig. 1/6)")
    d.add_argument("--out", default="runs/degradation", help="folder for degradation.json and degradation.png")
    d.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 8 epochs on 640 training images")
    d.add_argument("--nets", nargs="+", default=None, help="nets to train (default plain20 plain56 resnet20 resnet56)")
    d.add_argument("--data", default=None, help="digits (default: 8x8, 1,257 train images) | mnist | folder | .npz")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    d.add_argument("--image-size", type=int, default=None, help="resize the data to this size")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default 1: fastest on a shared CPU)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(func=run_degradation)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_degradation(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from resdeploy.pipeline.degradation import NETS, DegradationConfig, quick_config, run_degradation, write_outputs

    base = quick_config(args.nets or NETS) if args.quick else DegradationConfig(nets=tuple(args.nets or NETS))
    given = {"data": args.data, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
             "train_limit": args.train_limit, "image_size": args.image_size, "threads": args.threads, "seed": args.seed}
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    result = run_degradation(config, progress=lambda m: print(f"[degradation] {m}", file=sys.stderr, flush=True))
    js, png = write_outputs(result, args.out)
    print(json.dumps(result.to_dict(), indent=2) if args.json else f"{result}\nwrote {js} and {png}")
    return 0
