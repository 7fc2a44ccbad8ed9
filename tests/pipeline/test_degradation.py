"""`resdeploy experiment degradation`: the CLI trains the nets with one schedule and writes JSON + PNG (a tiny
setting here; the README's run uses the defaults)."""

import json

import pytest

from resdeploy.pipeline.cli import main


def test_cli_writes_json_and_png(tmp_path):
    out = tmp_path / "deg"
    rc = main(["experiment", "degradation", "--nets", "plain20", "resnet20", "--epochs", "2", "--train-limit", "96",
               "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "degradation.json").read_text())
    assert [h["net"] for h in data["histories"]] == ["plain20", "resnet20"]
    assert all(len(h["train_error"]) == len(h["test_error"]) == 2 for h in data["histories"])
    assert all(0 <= e <= 1 for h in data["histories"] for e in h["train_error"] + h["test_error"])
    assert data["config"]["data"] == "digits" and "96 train" in data["data"]
    png = (out / "degradation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_needs_both_depths():
    from resdeploy.pipeline.degradation import DegradationConfig, DegradationResult, NetHistory

    h = lambda net, tr: NetHistory(net, 1, tuple(tr), tuple(tr), 0.0)  # noqa: E731
    r = DegradationResult(DegradationConfig(epochs=4), "x", (h("plain20", [.5, .1, 0, 0]), h("plain56", [.9, .6, .5, .5]),
                                                             h("resnet20", [.5, .1, 0, 0]), h("resnet56", [.5, .1, 0, .004])), 1.0)
    v = r.verdict()
    assert v["plain"]["deeper_trains_worse"] and not v["resnet"]["deeper_trains_worse"] and v["degradation_shown"]


def test_unknown_net_is_an_input_error(tmp_path):
    assert main(["experiment", "degradation", "--nets", "plain21", "--epochs", "1", "--out", str(tmp_path)]) == 2
