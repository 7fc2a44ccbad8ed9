"""The "your own network" flags, one family shared by export, check, quantize, parity, bench and run.

    --model MODULE:CALLABLE | path/to/file.py:CALLABLE   the factory (Polygraphy's script.py:func convention)
    --model-kwargs JSON                                   its keyword arguments, e.g. '{"num_classes": 10}'
    --weights FILE                                        .safetensors, or a state_dict .pt/.pth (weights_only)
    --input-shape C,H,W                                   the input it takes
    --mean M[,M...] --std S[,S...]                        normalisation of [0, 1] pixels (default: none)
    --data SOURCE                                         the data (calibration, parity); where a command has none
    --onnx FILE                                           run only: start from your FP32 ONNX file

Not a subcommand (cli.COMMANDS does not list it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_HELP = ("your network's factory, MODULE:CALLABLE or path/to/file.py:CALLABLE, called with --model-kwargs; "
              "IMPORTING IT RUNS ITS CODE (as your training script does): name only code you trust")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); write e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write e.g. '{{\"num_classes\": 10}}'")
    return value


def shape(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.split(",")]
    except ValueError:
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write C,H,W, e.g. 3,224,224")
    return dims


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def add_model_args(p: argparse.ArgumentParser, *, data: bool = True, onnx: bool = False) -> None:
    """Add the flag family to ``p`` (``data``: also --data; ``onnx``: also --onnx, for run)."""
    g = p.add_argument_group("your own network (instead of a checkpoint)")
    g.add_argument("--model", metavar="MODULE:CALLABLE", help=MODEL_HELP)
    g.add_argument("--model-kwargs", metavar="JSON", type=json_object, help="keyword arguments for the factory")
    g.add_argument("--weights", metavar="FILE", help="its trained weights: .safetensors, or a state_dict .pt/.pth "
                                                     "(read with weights_only; keys must match exactly)")
    g.add_argument("--input-shape", metavar="C,H,W", type=shape, help="the input it takes, e.g. 3,224,224")
    g.add_argument("--mean", metavar="M,...", type=floats, help="per-channel mean of [0, 1] pixels (default: none)")
    g.add_argument("--std", metavar="S,...", type=floats, help="per-channel std (with --mean)")
    if onnx:
        g.add_argument("--onnx", metavar="FILE", help="start from your FP32 ONNX file (external data beside it allowed); "
                                                      "the reference is that graph run by ONNX Runtime")
    if data:
        g.add_argument("--data", default=None, help="data for calibration and parity: an image folder with one subfolder "
                                                    "per class, an .npz, mnist or digits (default: none given)")


def model_section(args: argparse.Namespace, base: Any = None) -> Any:
    """The ``[model]`` section the flags describe (over ``base``, a ModelSection), validated."""
    from resdeploy.pipeline.config import ModelSection

    m = base if base is not None else ModelSection()
    for flag, key in (("model", "factory"), ("model_kwargs", "factory_kwargs"), ("weights", "weights"),
                      ("input_shape", "input_shape"), ("mean", "mean"), ("std", "std"), ("onnx", "onnx")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(m, key, value)
    m.validate()
    return m


def source_from_args(args: argparse.Namespace, *, data: str | None = None, precisions: Any = (),
                     onnx: str | None = None) -> Any:
    """The user's network the flags name (a sources.ModelSource), or None without --model (and without ``onnx``,
    an FP32 ONNX file to take as the reference). Untrained (no --weights): the factory's own initial weights."""
    from resdeploy.pipeline.sources import resolve_source

    m = model_section(args)
    if not m.factory:
        if not onnx:
            return None
        m.onnx = onnx
    return resolve_source(m, data=data if data is not None else (getattr(args, "data", None) or ""),
                          precisions=precisions)


__all__ = ["MODEL_HELP", "add_model_args", "json_object", "model_section", "shape", "source_from_args"]
