"""The degradation verdict rule on synthetic final training errors: shown, not shown, inconclusive, the margin's
edge. Dyadic numbers (exact in binary) put a case exactly on the edge."""

import pytest

from resdeploy.pipeline.degradation_rule import (INCONCLUSIVE, MARGIN, NOT_SHOWN, SHOWN, family_gap, judge,
                                                 spread)


def verdict(plain20, plain56, resnet20, resnet56, margin=MARGIN):
    p = family_gap("plain20", "plain56", plain20, plain56)
    r = family_gap("resnet20", "resnet56", resnet20, resnet56)
    return judge(p, r, seeds=len(plain20), margin=margin)


def test_shown_when_plain_degrades_and_residual_does_not():
    v = verdict([.02, .03, .025], [.30, .35, .32], [.0, .001, .0], [.002, .0, .001])
    assert v.outcome == SHOWN
    text = str(v)
    assert "SHOWN" in text and "plain56 - plain20: +29.83" in text and "margin 1.00 points" in text


def test_not_shown_when_plain_nets_do_not_degrade():
    v = verdict([.0, .0, .001], [.001, .0, .0], [.0, .0, .0], [.0, .0, .0])
    assert v.outcome == NOT_SHOWN and "does not train worse" in v.reason


def test_not_shown_when_both_families_degrade():
    v = verdict([.0, .0, .0], [.5, .5, .5], [.0, .0, .0], [.2, .2, .2])
    assert v.outcome == NOT_SHOWN and "did not remove" in v.reason


def test_inconclusive_when_the_spread_swallows_the_plain_gap():
    # A 15-point gap, but two of three plain56 seeds train as well as plain20: the spread (26 points) swallows it.
    v = verdict([.0, .0, .0], [.0, .0, .45], [.0, .0, .0], [.0, .0, .0])
    assert v.outcome == INCONCLUSIVE and "plain56" in v.reason


def test_inconclusive_when_the_residual_gap_is_undecided():
    v = verdict([.0, .0, .0], [.5, .5, .5], [.0, .0, .0], [.0, .0, .06])
    assert v.outcome == INCONCLUSIVE and "resnet56" in v.reason and "plain56" not in v.reason


def test_one_seed_is_inconclusive_and_says_how_to_fix():
    v = verdict([.0], [.5], [.0], [.0])
    assert v.outcome == INCONCLUSIVE and "--seeds 2" in v.reason


@pytest.mark.parametrize("deep, expected", [(.25, NOT_SHOWN), (.25 + 2 ** -10, SHOWN)])
def test_margin_edge_without_spread(deep, expected):
    # Identical seeds: spread 0, gap exactly the margin (0.25) is "not worse"; a hair above is "worse".
    v = verdict([.0, .0], [deep, deep], [.0, .0], [.0, .0], margin=.25)
    assert v.plain.spread == 0 and v.outcome == expected


@pytest.mark.parametrize("shift, expected", [(0.0, INCONCLUSIVE), (2 ** -8, SHOWN)])
def test_margin_edge_beyond_the_spread(shift, expected):
    # plain56 seeds .5/.75/1.0: mean .75, sample sd exactly .25; gap - spread = .5 = the margin: undecided.
    deep = [v + shift for v in (.5, .75, 1.0)]
    v = verdict([.0, .0, .0], deep, [.0, .0, .0], [.0, .0, .0], margin=.5)
    assert v.plain.spread == .25 and v.outcome == expected


def test_spread_is_the_sample_standard_deviation():
    assert spread([1.0]) == 0.0 and spread([.5, .75, 1.0]) == .25
