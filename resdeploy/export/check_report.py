"""What the short-path check reports: one row per short path, the defects (each naming its block), the counts.

One report type for every view of the engine: :class:`SkipAddReport` (the residual adds of a ResNet) and
:class:`ShortPathReport` (every kind) differ only in their title. ``bool(report)`` is pass/fail.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from resdeploy.errors import CheckFailed
from resdeploy.export.discover import KINDS, ResidualAdd, ShortPath


@dataclass(frozen=True)
class Defect:
    block: str  # module path ("" when no reference is given and the exporter left no scope)
    node: str  # ONNX node ("" when the ONNX graph lacks it)
    message: str

    def __str__(self) -> str:
        return f"block {self.block or '?'} (ONNX node {self.node or '-'}): {self.message}"


@dataclass(frozen=True)
class SkipAddRow:
    block: str
    node: str
    kind: str  # the shortcut kind of a plain add (identity, projection...), else the short-path kind
    shape: str
    fork: str
    status: str  # ok | defect | missing | extra | diverged
    max_abs_err: float | None = None  # the short path's output vs PyTorch's
    rel_err: float | None = None
    cosine: float | None = None
    short_path: str = "add"  # the short-path kind (add, scaled_add, concat, gated_add, mean_join)
    operand_rel_err: float | None = None  # worst operand vs PyTorch's (1 - cosine when quantized): a wrong wire shows here


def shape_text(s: tuple[object, ...] | None) -> str:
    return "x".join("?" if d is None else str(d) for d in s) if s else "?"


@dataclass(frozen=True)
class ShortPathReport:
    model: str
    rows: tuple[SkipAddRow, ...]
    defects: tuple[Defect, ...]
    paths: tuple[ShortPath, ...]  # found in the ONNX graph
    reference: bool  # a PyTorch reference was compared
    numeric: bool  # outputs and operands were compared on input (see ``inputs``)
    first_divergent: str | None = None  # block whose output (or an operand) first differs numerically
    quantized: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    inputs: str = ""  # what the numbers ran on: "real images", "seeded random inputs", "" when not numeric
    title: str = "short-path"

    def __bool__(self) -> bool:
        return not self.defects

    @property
    def adds(self) -> tuple[ResidualAdd, ...]:
        """The residual merges among the short paths (plain and scaled adds, and any op found in an add's place)."""
        return tuple(ResidualAdd.of(p) for p in self.paths if p.kind in ("add", "scaled_add"))

    def kinds(self) -> dict[str, int]:
        """Short paths found per kind (every kind listed, 0 when absent)."""
        return {k: sum(1 for p in self.paths if p.kind == k) for k in KINDS}

    def residual_adds(self) -> int:
        return sum(1 for p in self.paths if p.is_add)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "passed": bool(self), "reference": self.reference, "numeric": self.numeric,
            "inputs": self.inputs, "quantized": self.quantized, "residual_adds": self.residual_adds(),
            "short_paths": len(self.paths), "kinds": self.kinds(), "first_divergent": self.first_divergent,
            "rows": [asdict(r) for r in self.rows],
            "defects": [{"block": d.block, "node": d.node, "message": d.message} for d in self.defects],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _headline(self) -> str:
        if self.title == "skip-add":
            what = f"{self.residual_adds()} residual adds"
        else:
            kinds = ", ".join(f"{v} {k}" for k, v in self.kinds().items() if v) or "none"
            what = f"{len(self.paths)} short paths ({kinds})"
        return (f"{self.title} check of {self.model}: {what}"
                + (" vs PyTorch reference" if self.reference else " (no reference: well-formedness only)")
                + (f" + numeric localisation on {self.inputs}" if self.numeric else ""))

    def __str__(self) -> str:
        wb = min(34, max([14, *(len(r.block) for r in self.rows)]))
        lines = [self._headline(), f"{'#':>3}  {'block':<{wb}} {'ONNX node':<22} {'kind':<10} {'shape':<13} "
                                   f"{'fork':<18} {'status':<9} {'max abs':>9} {'rel':>9} {'operands':>9}"]
        for i, r in enumerate(self.rows):
            err = (f"{r.max_abs_err:9.2e} {r.rel_err:9.2e}" if r.max_abs_err is not None and r.rel_err is not None
                   else f"{'-':>9} {'-':>9}")
            op = f"{r.operand_rel_err:9.2e}" if r.operand_rel_err is not None else f"{'-':>9}"
            lines.append(f"{i:>3}  {r.block[-wb:]:<{wb}} {r.node[:22]:<22} {r.kind:<10} {r.shape:<13} {r.fork[:18]:<18} "
                         f"{r.status:<9} {err} {op}")
        lines += [f"note: {n}" for n in self.notes]
        if self.first_divergent:
            lines.append(f"first block whose {'Add' if self.title == 'skip-add' else 'short-path'} output or operands "
                         f"diverge numerically: {self.first_divergent}")
        lines.append("PASSED" if self else f"FAILED: {len(self.defects)} defect(s)")
        lines += [f"  - {d}" for d in self.defects]
        return "\n".join(lines)


@dataclass(frozen=True)
class SkipAddReport(ShortPathReport):
    """The report of :func:`resdeploy.export.check_skip_adds`: the residual adds only."""

    title: str = "skip-add"


def require_pass(report: ShortPathReport) -> ShortPathReport:
    """Raise CheckFailed (exit 1) naming the first defect when the report failed; return it otherwise."""
    if not report:
        raise CheckFailed(f"{report.title} check of {report.model} failed: {report.defects[0]}"
                          + (f" (+{len(report.defects) - 1} more)" if len(report.defects) > 1 else ""))
    return report
