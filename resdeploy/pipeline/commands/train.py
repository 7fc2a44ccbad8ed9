from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an architecture on packaged real data and write a safe checkpoint")
    p.add_argument("--arch", default="resnet20", help="architecture (see `resdeploy models`)")
    p.add_argument("--data", default="mnist", help="mnist | digits | image folder (one subfolder per class) | file.npz")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--shortcut", choices=("A", "B"), default=None, help="CIFAR ResNets: option A (default) or B")
    p.add_argument("--image-size", type=int, default=None, help="train at this size (bilinear resize of the data)")
    p.add_argument("--channels", type=int, default=None, help="repeat grey images to this many channels (3 for ImageNet nets)")
    p.add_argument("--no-augment", action="store_true", help="disable random shifts")
    p.add_argument("--out", required=True, help="checkpoint folder to write (model.safetensors + model.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.models.train import TrainConfig, train

    kwargs = {"shortcut": args.shortcut} if args.shortcut else {}
    config = TrainConfig(arch=args.arch, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, threads=args.threads, image_size=args.image_size, channels=args.channels, augment=not args.no_augment, arch_kwargs=kwargs)
    result = train(config, out_dir=args.out)
    print(result)
    return 0
