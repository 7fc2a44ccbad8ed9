"""The degradation experiment's verdict rule, fixed before any run was judged by it.

Inputs: every seed's *final* training error (eval mode, whole training split, after the last iteration) for the
shallower and the deeper net of each family (plain, residual). For each family the rule computes

* the **gap**: mean final training error of the deeper net minus the shallower net's (over seeds);
* its **spread**: ``sqrt(sd_deep**2 + sd_shallow**2)``, the seeds' sample standard deviations (ddof=1) combined,
  i.e. how much the gap between two single runs varies. It is not divided by sqrt(seeds): the rule asks for a gap
  that one typical run pair would show, which is stricter than a standard error;

and compares them with one **margin** (:data:`MARGIN`, 1 percentage point of training error):

* a family's deeper net *trains worse* when ``gap - spread > margin``;
* it *does not train worse* when ``gap + spread <= margin``;
* anything in between is undecided: the spread swallows the difference.

Verdict:

* **shown**: the deeper plain net trains worse and the deeper residual net does not;
* **not shown**: the deeper plain net does not train worse, or both deeper nets train worse (the shortcut did not
  remove the degradation);
* **inconclusive**: any other case, and any run with fewer than two seeds (no spread to judge a gap against).

The three numbers the rule uses (printed with every verdict): the plain gap ± its spread, the residual gap ± its
spread, and the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# One percentage point of final training error. Below it, a deeper net's extra misfits are too few to call
# "trains worse" (on a few thousand training images, a handful of images); the paper's plain-56 vs plain-20 gap
# on CIFAR-10 (Fig. 6, left) is several points, so an effect of that kind clears it.
MARGIN = 0.01

SHOWN, NOT_SHOWN, INCONCLUSIVE = "shown", "not shown", "inconclusive"


def spread(values: Sequence[float]) -> float:
    """The seeds' sample standard deviation (ddof=1); 0.0 for a single value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class Gap:
    """Deeper minus shallower mean final training error of one family, with the combined seed spread."""

    shallow: str
    deep: str
    gap: float
    spread: float

    def worse(self, margin: float) -> bool:
        return self.gap - self.spread > margin

    def not_worse(self, margin: float) -> bool:
        return self.gap + self.spread <= margin


def family_gap(shallow: str, deep: str, shallow_errors: Sequence[float], deep_errors: Sequence[float]) -> Gap:
    if not shallow_errors or not deep_errors:
        raise ValueError(f"{shallow} and {deep} need at least one final training error each")
    combined = math.sqrt(spread(shallow_errors) ** 2 + spread(deep_errors) ** 2)
    return Gap(shallow, deep, mean(deep_errors) - mean(shallow_errors), combined)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # SHOWN | NOT_SHOWN | INCONCLUSIVE
    reason: str
    plain: Gap
    residual: Gap
    margin: float
    seeds: int

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reason": self.reason, "margin": self.margin, "seeds": self.seeds,
                "plain": asdict(self.plain), "residual": asdict(self.residual),
                "rule": "deeper trains worse: gap - spread > margin; not worse: gap + spread <= margin; "
                        "shown: plain worse and residual not worse; not shown: plain not worse, or both worse; "
                        "else inconclusive (also with fewer than 2 seeds)"}

    def numbers(self) -> str:
        """The three numbers the rule used, in percentage points."""
        p, r = self.plain, self.residual
        return (f"{p.deep} - {p.shallow}: {100 * p.gap:+.2f} ± {100 * p.spread:.2f} points; "
                f"{r.deep} - {r.shallow}: {100 * r.gap:+.2f} ± {100 * r.spread:.2f} points; "
                f"margin {100 * self.margin:.2f} points")

    def __str__(self) -> str:
        head = {SHOWN: "degradation SHOWN", NOT_SHOWN: "degradation NOT SHOWN",
                INCONCLUSIVE: "degradation INCONCLUSIVE"}[self.outcome]
        return f"verdict: {head} over {self.seeds} seed(s): {self.reason}\n  rule's numbers: {self.numbers()}"


def judge(plain: Gap, residual: Gap, seeds: int, margin: float = MARGIN) -> Verdict:
    """Apply the rule (module docstring) to the two families' gaps."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if seeds < 2:
        return Verdict(INCONCLUSIVE, "one seed has no spread to judge a gap against; run with --seeds 2 or more",
                       plain, residual, margin, seeds)
    if plain.worse(margin) and residual.not_worse(margin):
        outcome, reason = SHOWN, (f"{plain.deep} trains worse than {plain.shallow} beyond margin and spread; "
                                  f"{residual.deep} does not train worse than {residual.shallow}")
    elif plain.not_worse(margin):
        outcome, reason = NOT_SHOWN, f"{plain.deep} does not train worse than {plain.shallow}"
    elif plain.worse(margin) and residual.worse(margin):
        outcome, reason = NOT_SHOWN, (f"{plain.deep} trains worse, but so does {residual.deep}: the shortcuts "
                                      "did not remove the degradation")
    else:
        undecided = [g.deep for g in (plain, residual) if not g.worse(margin) and not g.not_worse(margin)]
        outcome, reason = INCONCLUSIVE, f"the seeds' spread swallows the gap of {' and '.join(undecided)}"
    return Verdict(outcome, reason, plain, residual, margin, seeds)
