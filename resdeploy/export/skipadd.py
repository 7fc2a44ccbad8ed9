"""The skip-add check: are the residual adds of an ONNX graph the ones the PyTorch model performs?

The residual-add view of the short-path engine (:mod:`resdeploy.export.engine`), usable in three layers:

* :func:`find_residual_adds` - the residual Adds of an ONNX graph with fork, shortcut kind and shape (the rule is
  in :mod:`resdeploy.export.discover`; it sees through Identity/Cast/Q/DQ and no-op reshapes).
* :func:`trace_residual_adds` - the same facts from the PyTorch model via ``torch.export``.
* :func:`check_skip_adds` - validates each Add; with a reference, aligns the ONNX adds with the model's (count,
  order, kinds, shapes, fork positions), then runs both on the same input (the sample images, else seeded random
  inputs for a float32 graph) and compares each Add's output and operands, reporting the first block that diverges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resdeploy.artifact import check_external_data, load_onnx  # the one loader, with its external-data policy
from resdeploy.export.onnx_graph import to_datagraph
from resdeploy.export.check_report import Defect, SkipAddReport, SkipAddRow, require_pass
from resdeploy.export.discover import ADD_KINDS, ResidualAdd, discover
from resdeploy.export.engine import run_check, trace
from resdeploy.export.numeric import FLOAT_RTOL, QLINEAR_OUTPUT_SCALE, QUANT_MIN_COSINE

__all__ = ["ADD_OPS", "Defect", "FLOAT_RTOL", "QLINEAR_OUTPUT_SCALE", "QUANT_MIN_COSINE", "ResidualAdd",
           "SkipAddReport", "SkipAddRow", "TorchResidualAdd", "check_external_data", "check_skip_adds",
           "find_residual_adds", "load_onnx", "require_pass", "trace_residual_adds"]

ADD_OPS = ("Add", "Sum", "QLinearAdd")


@dataclass(frozen=True)
class TorchResidualAdd:
    """One residual add of the PyTorch model, as its forward computes it."""

    block: str  # module path of the module whose forward does the add, e.g. "layer2.0"
    node: str  # FX node name of the add
    kind: str  # identity | projection | pooled | option_a | unknown
    shape: tuple[int, ...]  # (C, H, W) of the add's output
    fork: str  # FX node name of the block input (the tensor both operands start from)
    branch_input: str  # FX node name of the branch operand
    shortcut_input: str  # FX node name of the shortcut operand
    op: str = "add"
    branch_convs: int = 0
    shortcut_convs: int = 0
    position: tuple[int, int] = (-1, 0)  # (index of the short path the fork follows, -1 = input; convs since)
    problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.block}: {self.kind} {'x'.join(map(str, self.shape))} (fork {self.fork}, node {self.node})"


def find_residual_adds(model: onnx.ModelProto | str | Path, *, include_other_merges: bool = False) -> list[ResidualAdd]:
    """The residual Adds of ``model`` in topological order. ``include_other_merges`` also returns Sub/Mul/...
    nodes that merge a branch with its skip (defects, never valid residuals)."""
    proto = load_onnx(Path(model)) if isinstance(model, (str, Path)) else model
    dg, _ = to_datagraph(proto)
    adds = [ResidualAdd.of(p) for p in discover(dg) if p.kind in ADD_KINDS]
    return [a for a in adds if include_other_merges or a.op in ADD_OPS]


def trace_residual_adds(module: Any, example: Any) -> list[TorchResidualAdd]:
    """The residual adds (and other residual merges) that ``module``'s forward performs on ``example``, in order."""
    return [TorchResidualAdd(p.block, p.node, p.shortcut, tuple(int(d) for d in p.shape) if p.shape else (), p.fork,
                             p.operands[0], p.operands[1], p.op, p.operand_convs[0], p.operand_convs[1], p.position,
                             p.problems)
            for p in trace(module, example).paths if p.kind in ADD_KINDS]


def check_skip_adds(
    model: onnx.ModelProto | str | Path,
    reference: Any | None = None,
    sample: np.ndarray | None = None,
    *,
    max_images: int = 4,
) -> SkipAddReport:
    """Check the residual adds of ``model``; against ``reference`` (an nn.Module, or its trace from
    :func:`resdeploy.export.trace_short_paths`) when given, numerically on ``sample`` (N,C,H,W float32, already
    normalised; seeded random inputs for a float32 graph when None). Never raises for defects: read the report
    (``bool(report)`` is pass/fail); raises InputError for unreadable input."""
    report = run_check(model, reference, sample, max_images=max_images, kinds=ADD_KINDS, report_type=SkipAddReport)
    assert isinstance(report, SkipAddReport)
    return report
