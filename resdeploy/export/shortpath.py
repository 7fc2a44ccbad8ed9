"""The short-path check: every short path of an ONNX graph against the PyTorch model it came from.

The all-kinds view of the short-path engine (:mod:`resdeploy.export.engine`): residual adds (identity, projection,
pooled and option-A shortcuts), scaled adds, concats, gated adds and mean joins, found by the rules of
:mod:`resdeploy.export.discover` on both graphs, aligned, diffed and compared block by block. A network whose short
paths are all plain residual adds gets the skip-add report (:class:`SkipAddReport`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resdeploy.artifact import load_onnx
from resdeploy.export.onnx_graph import to_datagraph
from resdeploy.export.check_report import ShortPathReport, SkipAddReport, require_pass
from resdeploy.export.discover import KINDS, ShortPath, discover
from resdeploy.export.engine import Trace, run_check, trace

__all__ = ["KINDS", "ShortPath", "ShortPathReport", "TorchShortPaths", "check_short_paths", "find_short_paths",
           "require_short_paths_pass", "trace_short_paths"]

TorchShortPaths = Trace  # what trace_short_paths returns: paths, declared_problems, program, graph, relu_fed


def find_short_paths(model: onnx.ModelProto | str | Path) -> list[ShortPath]:
    """The short paths of an ONNX graph in topological order."""
    proto = load_onnx(Path(model)) if isinstance(model, (str, Path)) else model
    dg, _ = to_datagraph(proto)
    return discover(dg)


def trace_short_paths(module: Any, example: Any) -> Trace:
    """The short paths ``module``'s forward performs on ``example`` (torch.export, eval mode), cross-checked
    against its declaration (``short_paths()`` or ``residual_blocks()``) when it has one."""
    return trace(module, example)


def check_short_paths(
    model: onnx.ModelProto | str | Path,
    reference: Any | None = None,
    sample: np.ndarray | None = None,
    *,
    max_images: int = 4,
) -> SkipAddReport | ShortPathReport:
    """Check every short path of ``model`` against ``reference`` (an nn.Module, or its :func:`trace_short_paths` to
    check several graphs against one reference), numerically on ``sample`` ((N,C,H,W) normalised; seeded random
    inputs for a float32 graph when None). Never raises for defects (``bool(report)`` is pass/fail); raises
    InputError for unreadable input."""
    return run_check(model, reference, sample, max_images=max_images)


def require_short_paths_pass(report: SkipAddReport | ShortPathReport) -> SkipAddReport | ShortPathReport:
    """Raise CheckFailed (exit 1) naming the first defect when the report failed."""
    return require_pass(report)
