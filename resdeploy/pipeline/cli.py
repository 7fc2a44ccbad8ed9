"""The ``resdeploy`` command line. It only parses arguments and calls the library.

Each subcommand lives in ``resdeploy/pipeline/commands/<name>.py`` with ``register(subparsers)``;
its handler returns the exit code. Exit codes: 0 ok, 1 a check failed, 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from resdeploy import __version__
from resdeploy.errors import ResdeployError

# Order here is the order in `resdeploy --help`: the pipeline's stages, first to last.
COMMANDS = ("run", "models", "train", "export", "check", "quantize", "build", "fusion", "repo", "serve", "parity", "bench", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resdeploy", description="Deployment pipeline for residual networks.")
    parser.add_argument("--version", action="version", version=f"resdeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"resdeploy.pipeline.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ResdeployError as exc:
        print(f"resdeploy {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"resdeploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
