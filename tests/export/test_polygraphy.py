"""The Polygraphy kit (resdeploy.pipeline.polygraphy_kit) and its probe graphs (resdeploy.export.probe), checked with
real Polygraphy: the CLI a user runs (`polygraphy run ... --onnxrt`), on the CPU through its ONNX Runtime backend.

What runs here: every command of the kit with `--onnxrt` in place of `--trt` and its flags (the same inputs,
references and tolerances). What does not: TensorRT itself (no GPU, no installable TensorRT): the `--trt` lines
are checked for their flags only. The tests live beside the export tests for their resnet20 export and the ONNX
surgery that builds each defect.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from resdeploy.export import check_skip_adds, find_short_paths
from resdeploy.pipeline.gates import ParityGates
from resdeploy.pipeline.polygraphy_kit import POLYGRAPHY_REQUIREMENT, agreement_args, write_polygraphy_kit

BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
DEFECT_BLOCK = 4  # layer2.1


def polygraphy(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the venv's polygraphy CLI (``argv`` starts with "polygraphy")."""
    exe = Path(sys.executable).with_name("polygraphy")
    assert exe.is_file(), f"{exe} missing: polygraphy is a dependency ({POLYGRAPHY_REQUIREMENT}); run make setup"
    return subprocess.run([str(exe), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)


def verdicts(log: str) -> list[tuple[str, bool]]:
    """(output name, passed) per output Polygraphy compared, in its order (the simple and cosine reports)."""
    out, current = [], None
    for line in log.splitlines():
        m = re.search(r"Comparing Output: '([^']+)'", line)
        if m:
            current = m.group(1)
        elif current is not None and ("PASSED" in line or "FAILED" in line):
            out.append((current, "FAILED" not in line))
            current = None
    return out


def command(kit, variant: str, check: str):
    return [c for c in kit.commands if c.variant == variant and c.check == check]


def negate_branch_conv(model: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Block k of a Q/DQ graph with its branch's last conv negated (its int8 weights): a numeric defect in one block."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    producers = {o: n for n in m.graph.node for o in n.output}
    conv = producers[find_short_paths(m)[k].operands[0]]
    assert conv.op_type == "Conv"
    weight = next(t for t in m.graph.initializer if t.name == producers[conv.input[1]].input[0])
    w = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array((-np.clip(w.astype(np.int16), -127, 127)).astype(w.dtype), weight.name))
    return m


@pytest.fixture(scope="module")
def calibration(trained_resnet20, mnist):
    from resdeploy.models import normalize

    spec = trained_resnet20[0].input_spec
    return normalize(mnist.val.images[:64], spec.mean, spec.std)


@pytest.fixture(scope="module")
def variants(r20_onnx, calibration, tmp_path_factory):
    """fp32 (the export), int8 (s8s8, TensorRT's flavour), int8-u8s8, and int8-defect (layer2.1's conv negated)."""
    from resdeploy.export.precision import quantize_int8

    d = tmp_path_factory.mktemp("variants")
    quantize_int8(r20_onnx, d / "model-int8.onnx", calibration, flavour="s8s8")
    quantize_int8(r20_onnx, d / "model-int8-u8s8.onnx", calibration, flavour="u8s8")
    defect = negate_branch_conv(onnx.load(str(d / "model-int8.onnx")), DEFECT_BLOCK)
    onnx.save(defect, str(d / "model-int8-defect.onnx"))
    return {"fp32": r20_onnx, "int8": d / "model-int8.onnx", "int8-u8s8": d / "model-int8-u8s8.onnx",
            "int8-defect": d / "model-int8-defect.onnx"}


@pytest.fixture(scope="module")
def kit(variants, trained_resnet20, r20_images, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "polygraphy"
    return write_polygraphy_kit(out, variants=variants, reference=trained_resnet20[0], inputs=r20_images,
                                calibration=calibration, gates=ParityGates())


def test_formats_are_polygraphys_own(kit, r20_images):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    feeds = load_json(str(kit.folder / "inputs.json"))
    assert len(feeds) == 1 and list(feeds[0]) == ["input"]  # a dynamic batch: every image in one iteration
    np.testing.assert_array_equal(feeds[0]["input"], r20_images)
    ref = RunResults.load(str(kit.folder / "reference.json"))
    [(runner, iterations)] = list(ref.items())
    assert runner == "pytorch-fp32" and list(iterations[0].keys()) == ["logits"]
    assert iterations[0]["logits"].shape == (len(r20_images), 10)
    probe_ref = RunResults.load(str(kit.folder / "reference-probe.json"))
    names = list(probe_ref["pytorch-fp32"][0].keys())
    # Probe outputs are named after the blocks (module paths); the u8s8 variant's after the ReLU it fused.
    assert kit.probes["fp32"] == kit.probes["int8"] == tuple(BLOCKS)
    assert kit.probes["int8-u8s8"] == tuple(f"{b}+relu" for b in BLOCKS)
    for label, probe_names in kit.probes.items():
        g = onnx.load(str(kit.folder / f"probe-{label}.onnx"))
        assert [o.name for o in g.graph.output] == [*probe_names, "logits"]  # in the network's order
        assert set(probe_names) <= set(names)
    assert set(kit.files) == {p.name for p in kit.folder.iterdir()}


def test_shipped_fp32_passes_and_a_removed_skip_fails(kit, variants, surgery, tmp_path):
    checks = command(kit, "fp32", "outputs")
    assert [c.args[c.args.index("--atol") + 1] for c in checks] == ["0.0001", "0.5"]  # max abs 1e-4, then top-1
    for c in checks:
        r = polygraphy(c.argv("onnxrt"), kit.folder)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert verdicts(r.stdout + r.stderr) == [("logits", True)]
    broken = tmp_path / "broken.onnx"
    onnx.save(surgery.remove_skip(onnx.load(str(variants["fp32"])), 1), str(broken))
    argv = checks[0].argv("onnxrt")
    argv[2] = str(broken)
    r = polygraphy(argv, kit.folder)
    assert r.returncode != 0 and verdicts(r.stdout + r.stderr) == [("logits", False)], r.stdout[-3000:]


def test_fp32_probe_passes_block_by_block(kit):
    [c] = command(kit, "fp32", "probes")
    r = polygraphy(c.argv("onnxrt"), kit.folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert verdicts(r.stdout + r.stderr) == [(n, True) for n in [*BLOCKS, "logits"]]


def test_int8_probes_pass_and_a_defect_is_named_where_resdeploy_localises_it(kit, variants, trained_resnet20,
                                                                           r20_images):
    for label in ("int8", "int8-u8s8"):
        [c] = command(kit, label, "probes")
        r = polygraphy(c.argv("onnxrt"), kit.folder)
        assert r.returncode == 0 and all(ok for _, ok in verdicts(r.stdout + r.stderr)), r.stdout[-3000:]
    [c] = command(kit, "int8-defect", "probes")
    r = polygraphy(c.argv("onnxrt"), kit.folder)
    got = verdicts(r.stdout + r.stderr)
    assert r.returncode != 0 and len(got) == 1 + len(BLOCKS), r.stdout[-3000:]
    first_failing = next(name for name, ok in got if not ok)
    report = check_skip_adds(variants["int8-defect"], trained_resnet20[0], r20_images)
    assert not report and report.first_divergent == BLOCKS[DEFECT_BLOCK], str(report)
    assert first_failing == report.first_divergent
    assert [name for name, _ in got] == [*BLOCKS, "logits"] and all(ok for _, ok in got[:DEFECT_BLOCK])


def test_int8_outputs_at_the_gates_agreement(kit):
    [c] = command(kit, "int8", "outputs")
    assert "agreement" in c.difference and "accuracy drop" in c.gate  # no labels: the stricter agreement form
    r = polygraphy(c.argv("onnxrt"), kit.folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Polygraphy's relative error of class indices divides by 0
@pytest.mark.parametrize("n", [1, 2, 7, 16, 200])
@pytest.mark.parametrize("min_agreement", [0.5, 0.95, 0.995, 1.0])
def test_agreement_flags_pass_exactly_at_the_gate(n, min_agreement):
    """Polygraphy's own comparison (its Python API) with the kit's flags passes iff agreement >= the gate."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc, TopKPostprocessFunc

    args = dict(zip(agreement_args(min_agreement, n)[::2], agreement_args(min_agreement, n)[1::2]))
    assert args["--postprocess"] == "top-1" and args["--check-error-stat"] == "quantile"
    compare = SimpleCompareFunc(check_error_stat="quantile", error_quantile=float(args["--error-quantile"]),
                                atol=float(args["--atol"]), rtol=float(args["--rtol"]))
    top1 = TopKPostprocessFunc(k=1)
    rng = np.random.default_rng(n)
    ref = rng.standard_normal((n, 10)).astype(np.float32)
    need = math.ceil(min_agreement * n)
    for agree in sorted({0, n // 2, need - 1, need, n} & set(range(n + 1))):
        out = ref.copy()
        out[agree:] = np.roll(out[agree:], 1, axis=1)  # another class on top for the images past `agree`
        res = compare(top1(IterationResult({"logits": out})), top1(IterationResult({"logits": ref})))
        assert bool(res["logits"]) == (agree / n >= min_agreement), (agree, n, min_agreement, args)


def test_data_loader_runs_with_numpy_only(kit, calibration):
    code = ("import sys, importlib.util\n"
            "for m in ('resdeploy', 'torch', 'onnx', 'onnxruntime', 'polygraphy'): sys.modules[m] = None\n"
            f"spec = importlib.util.spec_from_file_location('dl', {str(kit.folder / 'data_loader.py')!r})\n"
            "dl = importlib.util.module_from_spec(spec); spec.loader.exec_module(dl)\n"
            "import json\n"
            "print(json.dumps([(list(f), f['input'].shape, str(f['input'].dtype), float(f['input'].sum())) "
            "for f in dl.load_data()]))\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    feeds = json.loads(r.stdout)
    assert [(k, tuple(s), d) for k, s, d, _ in feeds] == [(["input"], (32, 1, 28, 28), "float32")] * 2
    assert [v for *_, v in feeds] == pytest.approx([float(calibration[:32].sum()), float(calibration[32:].sum())])


def test_commands_name_files_that_exist_and_the_gpu_flags(kit):
    text = (kit.folder / "commands.txt").read_text()
    made = {"calibration.cache", "int8-calibrated.engine"}  # written by the calibration commands themselves
    lines = [shlex.split(l) for l in text.splitlines() if l.startswith("polygraphy ")]
    assert len(lines) == len(kit.commands) + len(kit.extra)
    for argv in lines:
        for tok in argv:
            path = tok.split(":")[0] if tok.endswith(":load_data") else tok
            if re.search(r"\.(onnx|json|py|npy|engine|cache)$", path) and path not in made:
                assert (kit.folder / path).is_file(), (path, argv)
    int8 = command(kit, "int8", "probes")[0].line()
    assert "--trt --trt-min-shapes 'input:[1,1,28,28]'" in int8 and "--strongly-typed" in int8
    assert command(kit, "int8-u8s8", "outputs")[0].trt is None  # TensorRT takes only symmetric int8: ORT's line
    readme = (kit.folder / "README.md").read_text()
    assert all(c.line() in readme for c in kit.commands) and POLYGRAPHY_REQUIREMENT in readme


def test_onnx_reference_and_fp16_and_deterministic(r20_onnx, r20_images, calibration, tmp_path):
    """A user's own ONNX file as the reference (run --onnx): ONNX Runtime's FP32 values; the FP32 check at a relative
    gate (fp32_max_rel) and the FP16 probe pass; two writes give the same bytes."""
    from resdeploy.export.precision import fp16_variant

    fp16 = tmp_path / "variants" / "model-fp16.onnx"
    fp16.parent.mkdir()
    fp16_variant(r20_onnx, fp16)
    kits = [write_polygraphy_kit(tmp_path / run / "polygraphy", variants={"fp32": r20_onnx, "fp16": fp16},
                                 reference=r20_onnx, inputs=r20_images, calibration=calibration[:8],
                                 gates=ParityGates(fp32_max_rel=1e-5))
            for run in ("a", "b")]
    assert "ONNX Runtime" in kits[0].reference and kits[0].probes["fp16"] == tuple(BLOCKS)
    for name in kits[0].files:
        assert (kits[0].folder / name).read_bytes() == (kits[1].folder / name).read_bytes(), name
    rel = command(kits[0], "fp32", "outputs")[0]
    from polygraphy.comparator import RunResults

    logits = RunResults.load(str(kits[0].folder / "reference.json"))["onnxruntime-fp32-reference"][0]["logits"]
    assert "max rel error <= 1e-05" in rel.gate and "stricter" in rel.difference
    atol = float(rel.args[rel.args.index("--atol") + 1])
    assert atol == pytest.approx(1e-5 * np.abs(logits).max(axis=1).min(), rel=1e-5)
    for c in (rel, *command(kits[0], "fp16", "probes")):
        r = polygraphy(c.argv("onnxrt"), kits[0].folder)
        assert r.returncode == 0 and all(ok for _, ok in verdicts(r.stdout + r.stderr)), r.stdout[-3000:]


def test_bad_inputs_are_named(r20_onnx, r20_images, calibration, tmp_path):
    from resdeploy.errors import InputError

    def write(**kw):
        args = dict(variants={"fp32": r20_onnx}, reference=r20_onnx, inputs=r20_images, calibration=calibration,
                    gates=ParityGates())
        write_polygraphy_kit(tmp_path / "polygraphy", **{**args, **kw})

    with pytest.raises(InputError, match="label 'best'"):
        write(variants={"best": r20_onnx})
    with pytest.raises(InputError, match="missing.onnx does not exist"):
        write(variants={"fp32": tmp_path / "missing.onnx"})
    with pytest.raises(InputError, match=r"calibration images of shape \(8, 1, 14, 14\)"):
        write(calibration=calibration[:8, :, :14, :14])
    with pytest.raises(InputError, match="no input 'image'"):
        write(input_name="image")
    assert not (tmp_path / "polygraphy").exists()  # nothing written before the inputs are checked
