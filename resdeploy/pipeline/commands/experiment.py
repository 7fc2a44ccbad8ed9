from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproduce the seed's experiments (degradation: plain vs residual depth)")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    d = esub.add_parser("degradation", help="train plain20/56 and resnet20/56 over several seeds with He et al.'s "
                        "CIFAR protocol; a verdict by a stated rule; JSON + PNG (He et al. 2015, Fig. 1/6)")
    d.add_argument("--out", default="runs/degradation", help="folder for degradation.json and degradation.png")
    d.add_argument("--quick", action="store_true", help="a preview in a few minutes on 2 cores (80 iterations, "
                   "2 seeds): prints no verdict")
    d.add_argument("--nets", nargs="+", default=None, help="nets to train (default plain20 plain56 resnet20 resnet56)")
    d.add_argument("--seeds", type=int, default=None, help="runs per net, seeds --seed, --seed + 1, ... (default 3)")
    d.add_argument("--seed", type=int, default=None, help="the first seed (default 0)")
    d.add_argument("--data", default=None, help="mnist (default: 28x28, 3,500 train images) | digits (8x8) | "
                   "folder | .npz")
    d.add_argument("--iterations", type=int, default=None, help="SGD steps per run (default 640); lr /10 at 50 %% "
                   "and 75 %%")
    d.add_argument("--warmup", action="store_true", help="He et al.'s warm-up for the deepest nets: lr 0.01 until "
                   "training error < 80 %%")
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    d.add_argument("--image-size", type=int, default=None, help="resize the data to this size")
    d.add_argument("--jobs", type=int, default=None, help="processes training in parallel (default 0: one per CPU)")
    d.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1: fastest on a "
                   "shared CPU)")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(func=run_degradation)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_degradation(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from resdeploy.pipeline.degradation import NETS, DegradationConfig, quick_config, run_degradation, stderr_progress
    from resdeploy.pipeline.degradation_plot import write_outputs

    nets = tuple(args.nets or NETS)
    base = quick_config(nets) if args.quick else DegradationConfig(nets=nets)
    given = {"data": args.data, "iterations": args.iterations, "lr": args.lr, "batch_size": args.batch_size,
             "train_limit": args.train_limit, "image_size": args.image_size, "threads": args.threads,
             "seed": args.seed, "seeds": args.seeds, "jobs": args.jobs, "warmup": args.warmup or None}
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    result = run_degradation(config, progress=stderr_progress)
    js, png = write_outputs(result, args.out)
    print(json.dumps(result.to_dict(), indent=2) if args.json else f"wrote {js} and {png}\n{result}")
    return 0
