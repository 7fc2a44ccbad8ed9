"""`resdeploy experiment degradation`: seeds that differ, the schedule, the warm-up, the verdict or preview line at
the end of the output, JSON + PNG, bad input. Tiny settings (8x8 digits, a few iterations): these check plumbing;
the result itself is docs/degradation.md's full run."""

import json
from dataclasses import replace

import pytest

from resdeploy.pipeline.cli import main
from resdeploy.pipeline.degradation import DegradationConfig, DegradationResult, quick_config, run_degradation
from resdeploy.pipeline.degradation_rule import INCONCLUSIVE, NOT_SHOWN, SHOWN
from resdeploy.pipeline.degradation_train import RunResult, batch_order, init_model, load_tensors, lr_at

TINY = DegradationConfig(data="digits", iterations=3, train_limit=64, batch_size=32, seeds=2, curve_points=2,
                         curve_train_images=32, jobs=1)


def tiny_cli(tmp_path, *extra):
    return ["experiment", "degradation", "--data", "digits", "--iterations", "3", "--train-limit", "64",
            "--batch-size", "32", "--jobs", "1", "--out", str(tmp_path / "deg"), *extra]


def test_seeds_differ_in_initial_weights_and_batch_order():
    result = run_degradation(replace(TINY, nets=("plain20",)))
    a, b = result.runs
    assert (a.seed, b.seed) == (0, 1)
    assert a.init_fingerprint != b.init_fingerprint and a.order_fingerprint != b.order_fingerprint
    again = run_degradation(replace(TINY, nets=("plain20",), seeds=1))
    assert again.runs[0] == replace(a, seconds=again.runs[0].seconds, cpu_seconds=again.runs[0].cpu_seconds)
    data, _ = load_tensors(TINY)
    w0, w1 = (next(iter(init_model("resnet20", data, s).parameters())) for s in (0, 1))
    assert not w0.equal(w1)
    o0, o1 = (next(batch_order(64, 32, s)) for s in (0, 1))
    assert not o0.equal(o1)


def test_parallel_processes_give_the_same_runs():
    config = replace(TINY, nets=("plain20", "resnet20"), seeds=1)
    one, two = run_degradation(config), run_degradation(replace(config, jobs=2))
    strip = lambda r: replace(r, seconds=0.0, cpu_seconds=0.0)  # noqa: E731
    assert [strip(r) for r in one.runs] == [strip(r) for r in two.runs]
    assert two.machine["processes"] == 2


def test_lr_schedule_drops_at_half_and_three_quarters():
    c = DegradationConfig(iterations=640)
    assert [lr_at(c, i) for i in (0, 319, 320, 479, 480, 639)] == pytest.approx([.1, .1, .01, .01, .001, .001])


def test_warmup_runs_on_the_deepest_nets_only():
    # warmup_until 0: the error never falls below it, so warm-up lasts until the first lr drop (iteration 2 of 4).
    config = replace(TINY, nets=("plain20", "plain56"), seeds=1, iterations=4, warmup=True, warmup_until=0.0)
    runs = {r.net: r for r in run_degradation(config).runs}
    assert runs["plain20"].warmup_iterations == 0 and runs["plain56"].warmup_iterations == 2


def synthetic(net, seed, finals):
    return RunResult(net, seed, 1, (1, 2), (0.9, finals[seed]), (0.9, finals[seed]), 0, 1.0, 1.0, "i", "o")


@pytest.mark.parametrize("plain56, resnet56, expected", [
    ((.30, .35, .32), (.001, .0, .002), SHOWN),
    ((.001, .0, .0), (.0, .0, .0), NOT_SHOWN),
    ((.0, .0, .45), (.0, .0, .0), INCONCLUSIVE),
])
def test_verdict_from_the_curves_final_points(plain56, resnet56, expected):
    finals = {"plain20": (.0, .001, .0), "plain56": plain56, "resnet20": (.0, .0, .001), "resnet56": resnet56}
    runs = tuple(synthetic(n, s, f) for n, f in finals.items() for s in range(3))
    result = DegradationResult(DegradationConfig(), "synthetic", runs, 1.0, {})
    assert result.verdict().outcome == expected
    assert result.summary()[1].train_error == pytest.approx(sum(plain56) / 3)
    assert str(result).splitlines()[-2].startswith(f"verdict: degradation {expected.upper()}")


def test_full_run_ends_with_the_verdict_and_its_numbers(tmp_path, capsys):
    assert main(tiny_cli(tmp_path, "--seeds", "2")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("verdict: degradation ") and "over 2 seed(s)" in lines[-2]
    assert lines[-1].strip().startswith("rule's numbers: plain56 - plain20: ") and "margin 1.00 points" in lines[-1]
    data = json.loads((tmp_path / "deg" / "degradation.json").read_text())
    assert data["verdict"]["outcome"] in (SHOWN, NOT_SHOWN, INCONCLUSIVE) and data["preview"] is None
    assert len(data["runs"]) == 8 and [s["net"] for s in data["summary"]] == list(DegradationConfig().nets)
    assert (tmp_path / "deg" / "degradation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_ends_with_the_preview_line(tmp_path, capsys):
    assert main(tiny_cli(tmp_path, "--quick", "--nets", "plain20", "resnet20")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("preview: --quick trains 3 iterations x 2 seed(s)") and "no verdict" in out[-1]
    assert not any(line.startswith("verdict:") for line in out)
    data = json.loads((tmp_path / "deg" / "degradation.json").read_text())
    assert data["verdict"] is None and data["preview"] == out[-1]
    assert quick_config().preview and not DegradationConfig().preview


@pytest.mark.parametrize("extra, named", [(("--seeds", "0"), "--seeds"), (("--nets", "plain21"), "plain21"),
                                          (("--nets", "plain20", "plain20"), "twice"),
                                          (("--iterations", "0"), "--iterations"), (("--data", "nope"), "nope")])
def test_bad_input_exits_2_naming_the_fix(tmp_path, capsys, extra, named):
    assert main(tiny_cli(tmp_path, *extra)) == 2
    assert named in capsys.readouterr().err
