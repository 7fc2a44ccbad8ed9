"""The engine chosen by measurement, the repository that names it, and the bench's ISA / fraction-of-peak figures;
engine settings as part of the choice: each configuration (backend x precision x settings) judged by the parity
gates, the fastest that passes served with its settings, the winner of each batch size named, the batch sizes
weighed as the config says (real ONNX Runtime runners for the settings, the repository and the server).

Fake runners with a fake clock make the timing deterministic: one engine costs 1 ms a call, the other 3 ms, so the
choice must be the first whatever else runs on the machine."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from resdeploy.engines import check_settings, open_runner, settings_label
from resdeploy.errors import CheckFailed, InputError
from resdeploy.pipeline.machine import cpu_isa, fraction_of_peak
from resdeploy.pipeline.engine_choice import (EngineCandidate, candidate_settings, check_configurations, choose_engine,
                                              configurations, read_choice, winner_lines, write_choice)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Spec:
    name, shape = "input", (None, 1, 8, 8)


class _FakeRunner:
    def __init__(self, clock: _Clock, ms: float) -> None:
        self.clock, self.ms, self.inputs, self.active, self.calls = clock, ms, [_Spec()], False, 0

    def activate(self) -> None:
        self.active = True

    def deactivate(self) -> None:
        self.active = False

    def infer(self, feed: dict) -> dict:
        self.clock.t += self.ms * 1e-3 * len(next(iter(feed.values())))
        self.calls += 1
        return {"logits": np.zeros((1, 10), np.float32)}


def _choose(cost_ms: dict[str, float], cands: list[EngineCandidate], **kw):
    clock = _Clock()
    runners: dict[str, _FakeRunner] = {}

    def open_fn(c: EngineCandidate, threads):
        runners[c.name] = _FakeRunner(clock, cost_ms[c.name])
        return runners[c.name]

    return choose_engine(cands, open_fn=open_fn, clock=clock, **kw), runners


def test_picks_the_faster_engine_and_records_the_table(tmp_path):
    cands = [EngineCandidate("onnxruntime", "int8", Path("int8.onnx")), EngineCandidate("openvino", "int8", Path("int8.onnx"))]
    choice, runners = _choose({"onnxruntime int8": 3.0, "openvino int8": 1.0}, cands, batches=(1, 4), seconds=1.0)
    assert (choice.backend, choice.precision) == ("openvino", "int8")
    table = {t.name: t for t in choice.table}
    assert table["openvino int8"].p50_ms == {1: pytest.approx(1.0), 4: pytest.approx(4.0)}
    assert table["onnxruntime int8"].score == pytest.approx(3.0) and table["openvino int8"].score == pytest.approx(1.0)
    assert all(r.calls > 3 and not r.active for r in runners.values())  # timed, interleaved, closed
    assert "3.00x slower" in choice.reason and "openvino int8" in str(choice)
    path = write_choice(choice, tmp_path)
    data = read_choice(tmp_path)
    assert path.name == "engine-choice.json" and data["backend"] == "openvino" and len(data["table"]) == 2
    assert data["table"][0]["p50_ms"]["1"] == pytest.approx(3.0)


def test_an_engine_that_failed_parity_is_listed_never_timed_or_chosen():
    cands = [EngineCandidate("onnxruntime", "int8", Path("a.onnx")),
             EngineCandidate("openvino", "int8", Path("a.onnx"), parity_passed=False, parity="accuracy_drop")]
    choice, runners = _choose({"onnxruntime int8": 3.0, "openvino int8": 1.0}, cands, seconds=0.5)
    assert choice.backend == "onnxruntime" and "openvino int8" not in runners
    ov = next(t for t in choice.table if t.backend == "openvino")
    assert ov.score is None and "parity failed (accuracy_drop)" in ov.note
    with pytest.raises(CheckFailed, match="no candidate engine passed parity"):
        _choose({}, [cands[1]])
    with pytest.raises(InputError, match="CPU engines"):
        _choose({}, [EngineCandidate("tensorrt", "int8", Path("a.onnx"))])


def test_repository_names_the_chosen_engine_and_serve_reads_it(tmp_path, trained_resnet20_dir):
    from resdeploy.pipeline.workbench import export_fp32
    from resdeploy.pipeline.repository import make_model_repository
    from resdeploy.models import load_checkpoint
    from resdeploy.serve.repository import backend_parameter, read_config

    model, _ = load_checkpoint(trained_resnet20_dir)
    onnx_path = export_fp32(model, tmp_path / "m.onnx", np.zeros((2, 1, 28, 28), np.float32))
    choice = {"backend": "openvino", "precision": "fp32", "reason": "fastest", "machine": {"cpu_model": "CPU X"}}
    res = make_model_repository(onnx_path, tmp_path / "repo", model_name="m", engine_choice=choice)
    text = res.config_path.read_text()
    assert text.startswith("# resdeploy engine choice (measured on CPU X): openvino fp32")
    assert "Triton's onnxruntime backend runs it with ONNX Runtime" in text
    cfg = read_config(res.config_path)  # comments are valid protobuf text format
    assert backend_parameter(cfg) == "openvino"
    cfg.instance_group[0].kind = cfg.instance_group[0].KIND_GPU
    assert backend_parameter(cfg) is None  # the choice was among CPU engines
    with pytest.raises(InputError, match="serves one of"):
        make_model_repository(onnx_path, tmp_path / "repo2", model_name="m", engine_choice={"backend": "tensorrt"})


def test_isa_and_peak_for_the_two_kinds_of_fleet_cpu():
    zen4 = cpu_isa({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}, "AuthenticAMD", 25, 17, 2600.0)
    spr = cpu_isa({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile"},
                  "GenuineIntel", 6, 143, 2000.0)
    assert zen4["core"] == "AMD Zen 4" and zen4["int8"] == "AVX-512 VNNI" and zen4["bf16"] == "AVX-512 BF16"
    assert zen4["flop_per_cycle_per_core"] == {"fp32": 32, "fp16": 32, "bf16": 64, "int8": 128}
    assert zen4["peak_gflops_per_core"]["int8"] == pytest.approx(332.8)
    assert spr["int8"] == "AMX int8" and spr["flop_per_cycle_per_core"]["int8"] == 2048
    # 1 GMAC per image at 10 ms on one Zen 4 core at 2.6 GHz in int8: 200 GOPS of 332.8
    frac = fraction_of_peak(10**9, 1, 10.0, "int8", zen4, threads=1, cores=2)
    assert frac == pytest.approx(200 / 332.8)
    assert fraction_of_peak(10**9, 1, 10.0, "fp32", {}, 1, 2) is None


def test_config_keys_for_the_choice():
    from resdeploy.pipeline.config import load_config

    cfg = load_config(None, ["engines.choose=off"])
    assert cfg.engines.choose == "off" and cfg.variants.int8_search
    with pytest.raises(InputError, match="engines.choose"):
        load_config(None, ["engines.choose=fastest"])
    with pytest.raises(InputError, match="repository.precision = \"auto\""):
        load_config(None, ["engines.choose=off", "repository.precision=auto"])
    assert load_config(None, ["repository.precision=auto"]).repository.precision == "auto"
    json.dumps(cfg.to_dict())


def test_the_run_after_switching_engines_is_not_timed():
    """The previous engine's spinning threads and cache footprint make the first run after a switch slow; timed, that
    cost fell on whichever engine came next (resnet50 224x224: OpenVINO INT8 looked 1.29x slower than ORT INT8 in
    the choice and was 1.19x faster in the bench). Here each engine's first run after a switch costs +20 ms."""
    clock = _Clock()
    last: list[str] = []

    class _Switching(_FakeRunner):
        def __init__(self, name: str, ms: float) -> None:
            super().__init__(clock, ms)
            self.name = name

        def infer(self, feed: dict) -> dict:
            if last and last[-1] != self.name:
                clock.t += 20e-3
            last.append(self.name)
            return super().infer(feed)

    cands = [EngineCandidate("onnxruntime", "int8", Path("a.onnx")), EngineCandidate("openvino", "int8", Path("a.onnx"))]
    cost = {"onnxruntime int8": 16.0, "openvino int8": 15.0}
    choice = choose_engine(cands, open_fn=lambda c, t: _Switching(c.name, cost[c.name]), clock=clock, seconds=5.0)
    assert choice.backend == "openvino", str(choice)
    assert {n: t.p50_ms[1] for n, t in ((t.name, t) for t in choice.table)} == {
        "onnxruntime int8": pytest.approx(16.0), "openvino int8": pytest.approx(15.0)}


class _OutSpec:
    name = "logits"


class _Runner:
    """Costs ``fixed + per_image * batch`` ms a call on the fake clock; logits from the input's sum per image, with
    the first two classes swapped when ``swap`` (every top-1 answer changes)."""

    def __init__(self, clock: _Clock, fixed: float, per_image: float, swap: bool = False) -> None:
        self.clock, self.fixed, self.per_image, self.swap = clock, fixed, per_image, swap
        self.inputs, self.outputs, self.name, self.inference_precision = [_Spec()], [_OutSpec()], "fake", ""

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def infer(self, feed: dict) -> dict:
        x = next(iter(feed.values()))
        self.clock.t += (self.fixed + self.per_image * len(x)) * 1e-3
        s = x.reshape(len(x), -1).sum(1, keepdims=True)
        s = -s if self.swap else s
        return {"logits": np.concatenate([s, -s, 0 * s], 1).astype(np.float32)}


def _cands() -> list[EngineCandidate]:
    # ORT: little fixed cost, dear per image (wins batch 1); OpenVINO's own defaults: the reverse (wins batch 8)
    return [EngineCandidate("onnxruntime", "int8", Path("m.onnx")),
            EngineCandidate("openvino", "int8", Path("m.onnx"), settings={"precision_hint": "default",
                                                                          "performance_hint": "default"})]


COST = {"onnxruntime int8": (0.2, 1.0), "openvino int8 [OpenVINO defaults]": (2.0, 0.4)}


def _choose_b1_b8(**kw):
    clock = _Clock()
    return choose_engine(_cands(), open_fn=lambda c, t: _Runner(clock, *COST[c.name]), clock=clock, seconds=2.0,
                         batches=(1, 8), **kw)


def test_settings_are_checked_and_completed_with_the_runners_defaults():
    assert check_settings("onnxruntime", {}) == {"spinning": True}
    assert check_settings("openvino", {"precision_hint": "default"}) == {"precision_hint": "default",
                                                                         "performance_hint": "LATENCY"}
    with pytest.raises(InputError, match="no setting 'threads'.*its settings: spinning"):
        check_settings("onnxruntime", {"threads": 4})
    with pytest.raises(InputError, match='spinning = 1; use one of true, false'):
        check_settings("onnxruntime", {"spinning": 1})  # an int is not a bool here
    with pytest.raises(InputError, match='precision_hint = "F32"; use one of "f32", "bf16", "f16", "default"'):
        check_settings("openvino", {"precision_hint": "F32"})
    with pytest.raises(InputError, match="takes no engine settings"):
        check_settings("tensorrt", {})
    assert settings_label("onnxruntime", {"spinning": False}) == "spinning off"
    assert settings_label("openvino", {"precision_hint": "default", "performance_hint": "default"}) == "OpenVINO defaults"
    assert settings_label("openvino", {}) == ""


def test_candidates_are_each_runners_defaults_and_the_searched_settings(monkeypatch):
    import resdeploy.engines.openvino as ov

    assert candidate_settings("onnxruntime") == [{"spinning": True}, {"spinning": False}]
    monkeypatch.setattr(ov, "openvino_defaults", lambda device="CPU": {"precision": "bf16", "performance": "LATENCY"})
    assert candidate_settings("openvino")[1] == {"precision_hint": "default", "performance_hint": "default"}
    # where OpenVINO's own defaults are the runner's (f32, LATENCY) they are not timed twice
    monkeypatch.setattr(ov, "openvino_defaults", lambda device="CPU": {"precision": "f32", "performance": "LATENCY"})
    assert candidate_settings("openvino") == [{"precision_hint": "f32", "performance_hint": "LATENCY"}]
    names = [c.name for c in configurations([("onnxruntime", "int8", Path("m.onnx"))])]
    assert names == ["onnxruntime int8", "onnxruntime int8 [spinning off]"]


def test_each_configuration_is_judged_by_the_parity_gates():
    """A configuration whose numbers drift (a faster, lower precision) fails its gate and is never timed or chosen,
    however fast it is."""
    from resdeploy.pipeline.gates import ParityGates
    from resdeploy.pipeline.workbench import ParityData

    rng = np.random.default_rng(0)
    images = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    data = ParityData(images=images, labels=np.zeros(40, np.int64), labels_meaningful=False, calibration=images[:4],
                      description="test")
    s = images.reshape(40, -1).sum(1, keepdims=True)
    ref = np.concatenate([s, -s, 0 * s], 1).astype(np.float32)
    clock = _Clock()
    drift = {"onnxruntime int8": False, "openvino int8 [OpenVINO defaults]": True}
    judged = check_configurations(_cands(), ref, data, ParityGates(),
                                  open_fn=lambda c, t: _Runner(clock, *COST[c.name], swap=drift[c.name]))
    ok = {c.name: c.parity_passed for c in judged}
    assert ok == {"onnxruntime int8": True, "openvino int8 [OpenVINO defaults]": False}
    assert judged[1].parity.startswith("FAILED") and "(n=40)" in judged[0].parity
    given = replace(_cands()[1], parity="judged by the parity stage")  # not judged again: never opened here
    assert check_configurations([given], ref, data, ParityGates(), open_fn=None) == [given]
    choice = choose_engine(judged, open_fn=lambda c, t: _Runner(clock, *COST[c.name]), clock=clock, seconds=1.0,
                           batches=(1, 8))
    assert choice.name == "onnxruntime int8"
    ov = next(t for t in choice.table if t.backend == "openvino")
    assert ov.score is None and "parity failed (FAILED" in ov.note


def test_the_winner_of_each_batch_size_is_named_and_weights_decide():
    equal = _choose_b1_b8()
    # b1: ORT 1.2 ms vs OV 2.4 ms; b8: ORT 8.2 ms vs OV 5.2 ms -> scores sqrt(8.2/5.2)=1.26 vs sqrt(2.4/1.2)=1.41
    assert equal.name == "onnxruntime int8" and equal.weights == (0.5, 0.5)
    assert equal.winners[1]["engine"] == "onnxruntime int8"
    assert equal.winners[8]["engine"] == "openvino int8 [OpenVINO defaults]"
    assert equal.winners[8]["chosen_ratio"] == pytest.approx(8.2 / 5.2)
    lines = winner_lines(equal.to_dict())
    assert lines[0].startswith("batch 1: the chosen onnxruntime int8 is fastest, p50 1.200 ms; next openvino")
    assert lines[1] == ("batch 8: openvino int8 [OpenVINO defaults] is fastest, p50 5.200 ms; the chosen "
                        "onnxruntime int8 is 1.58x slower there (8.200 ms)")
    assert "equal weights" in equal.reason and "batch 8: openvino int8 [OpenVINO defaults] fastest" in equal.reason
    assert "batch 8" in str(equal)
    heavy = _choose_b1_b8(weights=[1, 3])  # batch 8 three times as common
    assert heavy.name == "openvino int8 [OpenVINO defaults]" and heavy.weights == (0.25, 0.75)
    assert heavy.settings == {"precision_hint": "default", "performance_hint": "default"}
    assert "weights b1 0.25, b8 0.75" in heavy.reason
    assert json.loads(json.dumps(heavy.to_dict()))["settings"]["precision_hint"] == "default"
    with pytest.raises(InputError, match="one number >= 0 per batch size"):
        _choose_b1_b8(weights=[1])


def test_config_states_how_batch_sizes_are_weighed():
    from resdeploy.pipeline.config import load_config

    cfg = load_config(None, ["bench.batches=[1, 8]", "engines.choice_weights=[3, 1]"])
    assert cfg.engines.choice_weights == [3.0, 1.0]
    with pytest.raises(InputError, match=r"choice_weights = \[1.0\]: give one weight >= 0 per batch size \[1, 8\]"):
        load_config(None, ["bench.batches=[1, 8]", "engines.choice_weights=[1]"])
    with pytest.raises(InputError, match="not all 0"):
        load_config(None, ["bench.batches=[1, 8]", "engines.choice_weights=[0, 0]"])


def test_the_ort_runner_runs_and_reports_its_spinning_setting(tmp_path, trained_resnet20_dir):
    onnx_path = _fp32(tmp_path, trained_resnet20_dir)
    with open_runner(str(onnx_path), backend="onnxruntime", spinning=False, threads=1) as r:
        assert r.session_settings() == {"threads": 1, "spinning": False}
        assert "spinning off" in r.description
    with open_runner(str(onnx_path), backend="onnxruntime", threads=1) as r:
        assert r.session_settings()["spinning"] is True


def _fp32(tmp_path: Path, ckpt: Path) -> Path:
    from resdeploy.models import load_checkpoint
    from resdeploy.pipeline.workbench import export_fp32

    model, _ = load_checkpoint(ckpt)
    return export_fp32(model, tmp_path / "m.onnx", np.zeros((2, 1, 28, 28), np.float32))


def test_the_repository_records_the_settings_and_the_server_runs_them(tmp_path, trained_resnet20_dir):
    """config.pbtxt carries the chosen engine and its settings; the server opens its runner with them (read back
    from the live ONNX Runtime session) and refuses settings that do not fit, naming the parameter."""
    from resdeploy.pipeline.repository import make_model_repository
    from resdeploy.serve.config import ServerConfig
    from resdeploy.serve.loading import ModelLoader
    from resdeploy.serve.repository import OPTIONS_PARAMETER, backend_options, read_config, scan_repository

    onnx_path = _fp32(tmp_path, trained_resnet20_dir)
    choice = {"backend": "onnxruntime", "precision": "fp32", "settings": {"spinning": False}, "reason": "fastest",
              "machine": {"cpu_model": "CPU X"}}
    res = make_model_repository(onnx_path, tmp_path / "repo", model_name="m", engine_choice=choice)
    text = res.config_path.read_text()
    assert text.startswith("# resdeploy engine choice (measured on CPU X): onnxruntime fp32 [spinning off]")
    assert backend_options(read_config(res.config_path)) == {"spinning": False}
    loader = ModelLoader(ServerConfig(threads=1))
    into: dict = {}
    asyncio.run(loader.load(scan_repository(tmp_path / "repo"), into))
    (model,) = into["m"].values()
    assert model.ready and model.runners, model.error
    assert [r.session_settings()["spinning"] for r in model.runners] == [False] * len(model.runners)
    for r in model.runners:
        r.deactivate()
    bad = text.replace('\\"spinning\\": false', '\\"spinning\\": \\"no\\"')
    assert bad != text
    res.config_path.write_text(bad)
    into = {}
    asyncio.run(loader.load(scan_repository(tmp_path / "repo"), into))
    (model,) = into["m"].values()
    assert not model.ready and not model.runners
    assert OPTIONS_PARAMETER in model.error and 'spinning = "no"; use one of true, false' in model.error
    with pytest.raises(InputError, match='engine choice settings: onnxruntime setting spinning = "yes"'):
        make_model_repository(onnx_path, tmp_path / "repo2", model_name="m",
                              engine_choice={**choice, "settings": {"spinning": "yes"}})
