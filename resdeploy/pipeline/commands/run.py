"""``resdeploy run [CONFIG.toml]``: the whole pipeline into one run folder, cached, with a report."""

from __future__ import annotations

import argparse

from resdeploy.pipeline.commands.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: train/checkpoint/your network/your ONNX -> export -> check -> variants -> engines -> parity "
                                   "-> bench -> model repository -> report, cached by content",
                       description="Run every stage into one run folder. A stage whose inputs, config and library "
                                   "versions are unchanged is not redone (it says 'cached'). Exit 0 when every gate "
                                   "passed, 1 naming the failed gate, 2 on bad usage. Config keys: see "
                                   "resdeploy/pipeline/config.py (every default is documented there).")
    p.add_argument("config", nargs="?", default=None, help="TOML config (optional: every key has a default)")
    p.add_argument("--out", help="run folder (config key `out`, default runs/run)")
    p.add_argument("--checkpoint", help="start from this checkpoint instead of training ([model] checkpoint)")
    p.add_argument("--arch", help="architecture to train ([model] arch)")
    add_model_args(p, data=False, onnx=True)
    p.add_argument("--data", help="the data: training, calibration, parity ([train] data): mnist, digits, an image folder "
                                  "with one subfolder per class, or an .npz")
    p.add_argument("--epochs", type=int, help="training epochs ([train] epochs)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency stage ([bench] enabled = false)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, value in TOML syntax (repeatable), e.g. --set variants.precisions='[\"int8\"]'")
    p.add_argument("--json", action="store_true", help="print run.json's stage list as JSON at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from resdeploy.pipeline.commands.model_args import model_section
    from resdeploy.pipeline.config import load_config
    from resdeploy.pipeline.run import run_pipeline

    overrides = list(args.overrides)
    for flag, key in ((args.out, "out"), (args.checkpoint, "model.checkpoint"), (args.arch, "model.arch"),
                      (args.data, "train.data"), (args.epochs, "train.epochs")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if args.no_bench:
        overrides.append("bench.enabled=false")
    cfg = load_config(args.config, overrides)
    cfg.model = model_section(args, cfg.model)  # --model, --weights, --onnx ... over the config's [model]
    result = run_pipeline(cfg)  # prints one line per stage as it goes
    print(result.verdict())
    if args.json:
        print(json.dumps([s.to_dict() | {"result": None} for s in result.stages], indent=2))
    if not result:
        print(f"resdeploy run: {result.failed_gate}", file=sys.stderr)
        return 1
    return 0
