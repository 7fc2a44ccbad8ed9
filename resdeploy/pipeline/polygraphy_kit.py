"""The Polygraphy kit: a run's parity check, in Polygraphy's own formats, for the engines this machine cannot run.

:func:`write_polygraphy_kit` writes ``<run>/polygraphy/`` with Polygraphy's own classes (``polygraphy.json`` and
``polygraphy.comparator.RunResults``), so a user checks a TensorRT engine on their own GPU against resdeploy's
reference with the tool TensorRT users already trust:

* ``inputs.json`` - the images parity judged, as ``polygraphy run --save-inputs`` writes them (a list of feed
  dicts, one per iteration; one iteration holds every image when the graph's batch axis is dynamic), and
  ``inputs-probe.json`` - the first few of them, for the probes (block outputs are large).
* ``reference.json`` - the reference's outputs on those inputs, a ``RunResults`` under the ONNX output names. The
  reference is PyTorch FP32, or for a user's own ONNX file (``run --onnx``) that FP32 graph run by ONNX Runtime on
  the CPU with graph optimisation off.
* ``probe-<variant>.onnx`` - the variant with every short path's output (every residual Add's) also a graph
  output, named after its block's module path (``layer2.1``; see :mod:`resdeploy.export.probe`).
* ``reference-probe.json`` - the reference's values at those outputs on ``inputs-probe.json``, under the probes'
  output names (and the graph's outputs under theirs: Polygraphy pairs an output without a reference by position).
* ``calibration.npy`` + ``data_loader.py`` - ``load_data()`` yields feed dicts of the calibration images, for
  ``--data-loader-script data_loader.py:load_data``; it needs only numpy (no resdeploy on the GPU machine).
* ``README.md`` and ``commands.txt`` - the exact commands, with tolerances matched to resdeploy's parity gates, and
  ``kit.json`` - the same for tools: each command's TensorRT and ONNX Runtime argv, its gate and how it differs.

The commands (run inside the folder; ``--onnxrt`` in place of ``--trt`` and its shapes runs each on the CPU):

    polygraphy run ../model.onnx --trt --load-inputs inputs.json --load-outputs reference.json \\
        --check-error-stat max --atol 1e-4 --rtol 0                      # FP32: max abs logit error <= 1e-4
    polygraphy run ../model-int8.onnx --trt --strongly-typed --load-inputs inputs.json \\
        --load-outputs reference.json --postprocess top-1 --check-error-stat quantile \\
        --error-quantile Q --atol 0.5 --rtol 0                           # FP16/INT8: top-1 agreement >= the gate
    polygraphy run probe-int8.onnx --trt --strongly-typed --load-inputs inputs-probe.json \\
        --load-outputs reference-probe.json --compare cosine_similarity --cosine-similarity-threshold 0.9
                                                                         # the first FAILED output names the block

A dynamic batch axis adds TensorRT's profile (``--trt-min-shapes input:[1,C,H,W] --trt-opt-shapes/--trt-max-shapes
input:[N,C,H,W]``); FP16 and INT8 files build ``--strongly-typed`` (their precision is in the graph). A u8s8 INT8
file gets ONNX Runtime's line only (TensorRT takes symmetric int8: its twin is the s8s8 file). A probe engine
cannot fuse across its marked outputs: it localises a failure, the plain file is what passes or fails the gate.

How each maps to resdeploy's gates (:class:`KitCommand` ``gate`` and ``difference`` say it per command):

* FP32 max abs error: Polygraphy's ``--check-error-stat max --atol A --rtol 0`` is the same gate. A relative gate
  (``fp32_max_rel``: per image, max error over max |logit|) has no Polygraphy form; the kit gives the absolute
  tolerance it implies at the image with the smallest logits: stricter, never looser.
* Top-1 agreement (FP32's 100 %, FP16's, INT8's on random weights): the top-1 indices (``--postprocess top-1``)
  compared at a quantile: with ``N`` images in an iteration and ``K`` agreements required, the
  ``(K-1)/(N-1)`` quantile of the index differences is 0 exactly when at least ``K`` images agree (``--atol 0.5``
  separates 0 from a wrong index). The same gate when one iteration holds every image; per iteration (stricter)
  for a graph with a fixed batch.
* INT8 accuracy drop on a trained model: Polygraphy has no labels. Top-1 agreement >= 1 - drop/100 implies the
  drop gate (every lost correct answer is a disagreement): stricter, it can fail a variant whose flips cancel.
  Centered agreement (random weights) has no Polygraphy form: the plain agreement is checked instead.
* Probes: the skip-add check's localisation criterion for the variant: max |error| <= 1e-3 (FP32; 1e-2 for a
  float16 graph) of the block's max |value|, as a per-output ``--atol``, or cosine similarity >= 0.9 (Q/DQ INT8),
  which Polygraphy computes over the whole output as resdeploy does. It compares outputs only (the localisation
  also compares each Add's operands).
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from resdeploy import atomic
from resdeploy.artifact import graph_inputs, graph_outputs, load_onnx, save_onnx
from resdeploy.errors import InputError
from resdeploy.export import ProbeGraph, ProbeReference, build_probe, probe_reference

POLYGRAPHY_REQUIREMENT = "polygraphy>=0.53.6"  # the version the kit is tested with (--compare cosine_similarity)
MAX_IMAGES = 256  # images written to inputs.json: each is JSON (base64), and TensorRT builds for the whole batch
MAX_INPUT_BYTES = 64 << 20  # and at most this much of them (about 100 images of 3x224x224)
PROBE_IMAGES = 4  # images the probes run on (the skip-add check localises on 4): block outputs are large
CALIBRATION_BATCH = 32  # images per data_loader.py batch (TensorRT calibrates at one shape)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
NO_TRT = "ONNX Runtime's line: TensorRT takes only symmetric int8 activations, its twin is the s8s8 variant"
EXTRA = ("With data_loader.py (the calibration images): TensorRT's own INT8 calibration of the FP32 file "
         "(implicit quantization, deprecated in TensorRT 10; to compare with resdeploy's Q/DQ INT8) and that "
         "engine's INT8 check; then TensorRT FP32 against ONNX Runtime on the same images")
FILES = ("inputs.json", "inputs-probe.json", "reference.json", "reference-probe.json", "calibration.npy",
         "data_loader.py", "README.md", "commands.txt", "kit.json")


class Gates(Protocol):
    """What the kit reads of resdeploy's parity gates (``resdeploy.pipeline.gates.ParityGates``)."""

    fp32_max_abs: float
    fp32_max_rel: float | None
    fp32_min_agreement: float
    fp16_min_agreement: float
    int8_max_accuracy_drop: float
    int8_min_agreement: float
    random_weights_metric: str


@dataclass(frozen=True)
class KitCommand:
    """One Polygraphy command of the kit: ``polygraphy run <model> <runner> <args>``."""

    variant: str  # the variant's label (fp32, fp16, int8...)
    check: str  # what it compares: "outputs" (vs reference.json) or "probes" (vs reference-probe.json)
    model: str  # the ONNX file, relative to the kit's folder
    args: tuple[str, ...]  # inputs, reference and tolerances
    gate: str  # resdeploy's gate (or criterion) it stands for
    difference: str = ""  # how Polygraphy's check differs from that gate ("" when it is the same)
    trt: tuple[str, ...] | None = ()  # the TensorRT runner's flags after --trt; None: TensorRT cannot run the file

    def argv(self, runner: str = "trt") -> list[str]:
        """The command line for ``runner``: "trt" (the GPU check) or "onnxrt" (the same check on the CPU)."""
        if runner not in ("trt", "onnxrt"):
            raise InputError(f"polygraphy runner {runner!r}: use trt (TensorRT) or onnxrt (ONNX Runtime)")
        if runner == "trt" and self.trt is None:
            raise InputError(f"{self.model}: TensorRT cannot run this variant (uint8 activations); use runner onnxrt")
        flags = ["--trt", *self.trt] if runner == "trt" and self.trt is not None else ["--onnxrt"]
        return ["polygraphy", "run", self.model, *flags, *self.args]

    def line(self, runner: str | None = None) -> str:
        """The shell line: TensorRT's unless the file cannot run there (then ONNX Runtime's)."""
        return shlex.join(self.argv(runner or ("trt" if self.trt is not None else "onnxrt")))


@dataclass(frozen=True)
class KitResult:
    """What :func:`write_polygraphy_kit` wrote."""

    folder: Path
    files: tuple[str, ...]  # written, relative to ``folder``
    reference: str  # what the reference is (PyTorch FP32, or the FP32 ONNX graph in ONNX Runtime)
    images: int  # images in inputs.json
    batch: int  # images per iteration
    probe_images: int  # images in inputs-probe.json
    probes: Mapping[str, tuple[str, ...]]  # variant label -> its probe output names, in graph order
    commands: tuple[KitCommand, ...]
    extra: tuple[str, ...] = ()  # TensorRT's own INT8 calibration and a calibration-data comparison
    notes: tuple[str, ...] = field(default_factory=tuple)

    def commands_text(self) -> str:
        """commands.txt: every command with a comment saying what it checks (run inside the folder)."""
        lines = [f"# Polygraphy checks of this run ({POLYGRAPHY_REQUIREMENT}); run them inside this folder.",
                 "# Each exits non-zero when its check fails. On a machine without TensorRT, replace --trt and its",
                 "# flags by --onnxrt (ONNX Runtime, CPU)."]
        for c in self.commands:
            lines += ["", f"# {c.variant} {c.check}: {c.gate}" + (f" ({c.difference})" if c.difference else "")
                      + (f"; {NO_TRT}" if c.trt is None else ""), c.line()]
        if self.extra:
            lines += ["", f"# {EXTRA}", *self.extra]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """What run.json records of the kit: enough for the report to print every command."""
        return {"folder": self.folder.name, "files": list(self.files), "reference": self.reference,
                "images": self.images, "batch": self.batch, "probe_images": self.probe_images,
                "probes": {k: list(v) for k, v in self.probes.items()},
                "commands": [{"variant": c.variant, "check": c.check, "gate": c.gate, "difference": c.difference,
                              "tensorrt": c.trt is not None, "line": c.line(), "onnxrt_argv": c.argv("onnxrt"),
                              "trt_argv": c.argv("trt") if c.trt is not None else None} for c in self.commands],
                "extra": list(self.extra), "notes": list(self.notes)}

    def markdown(self) -> str:
        """The commands section for a report (and the folder's README)."""
        out = [f"Reference: {self.reference}, on {self.images} images ({self.batch} per iteration; the probes on the "
               f"first {self.probe_images}). Run inside "
               f"`{self.folder.name}/` with `pip install \"{POLYGRAPHY_REQUIREMENT}\"` (and TensorRT for `--trt`); "
               "`--onnxrt` in place of `--trt` and its flags runs the same check on the CPU.", ""]
        for c in self.commands:
            out += [f"**{c.variant} {c.check}** - {c.gate}." + (f" Differs: {c.difference}." if c.difference else
                                                                  " The same gate.") + (f" {NO_TRT}." if c.trt is None
                                                                                        else ""),
                    "", "```", c.line(), "```", ""]
        out += ["Probe outputs are named after the block whose short path (residual Add) they expose; the first "
                "output Polygraphy reports FAILED, in order, is the first block that departs from the reference. "
                "`+relu`: the variant fused the block's ReLU into the Add, so both sides are compared after it.", ""]
        if self.extra:
            out += [f"{EXTRA}:", "", "```", *self.extra, "```", ""]
        return "\n".join(out + [f"- {n}" for n in self.notes])


@dataclass(frozen=True)
class _Feeds:
    """The images the kit writes, and how they are batched."""

    input_name: str
    static: bool  # the graph's batch axis is fixed
    images: np.ndarray  # inputs.json
    batch: int  # images per inputs.json iteration
    probe_images: np.ndarray  # inputs-probe.json (the first few: block outputs are large)
    probe_batch: int
    calibration: np.ndarray
    calibration_batch: int  # images per data_loader.py feed


def write_polygraphy_kit(out_dir: str | Path, *, variants: Mapping[str, str | Path], reference: Any,
                         inputs: np.ndarray, calibration: np.ndarray, gates: Gates, labels_meaningful: bool = True,
                         input_name: str | None = None, max_images: int = MAX_IMAGES,
                         probe_images: int = PROBE_IMAGES) -> KitResult:
    """Write the Polygraphy kit of a run to ``out_dir`` (see the module docstring); every file atomically.

    ``variants``: label -> ONNX file; a label is a precision (fp32, fp16, bf16, int8), optionally with a suffix
    (``int8-s8s8``). ``reference``: the PyTorch FP32 nn.Module, or the FP32 ONNX file it is (``run --onnx``).
    ``inputs``: the (N, C, H, W) float32 images parity judged (at most ``max_images`` and MAX_INPUT_BYTES are
    written; the probes run on the first ``probe_images``); ``calibration``: the calibration split's images.
    ``gates``: parity's gates; ``labels_meaningful``: INT8 is gated on accuracy drop (a trained model) rather than
    top-1 agreement (random weights)."""
    folder = Path(out_dir)
    files = _variant_files(variants)
    first = load_onnx(next(iter(files.values())))
    feeds = _feeds(first, inputs, calibration, input_name, max_images, probe_images)
    ref = probe_reference(reference, feeds.images[:1])
    names = [o.name for o in graph_outputs(load_onnx(files["fp32"]) if "fp32" in files else first)]
    outputs = ref.outputs(feeds.images, names)
    probes = {label: build_probe(path, ref) for label, path in files.items()}
    # The outputs too, so that every output of a probe graph has its reference (Polygraphy pairs leftovers by index).
    probe_values = {**ref.values(feeds.probe_images, [p for g in probes.values() for p in g.probes]),
                    **{k: v[:len(feeds.probe_images)] for k, v in outputs.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder, feeds, outputs, probe_values, ref)
    for label, g in probes.items():
        save_onnx(g.model, folder / f"probe-{label}.onnx")
    atomic.write_bytes(folder / "calibration.npy", _npy(feeds.calibration))
    atomic.write_text(folder / "data_loader.py", data_loader_source(feeds.input_name, feeds.calibration_batch))
    chw = feeds.images.shape[1:]
    shapes = _trt_shapes(feeds.input_name, chw, feeds.batch, feeds.static)
    commands = tuple(c for label, path in files.items() for c in _commands(
        label, os.path.relpath(path, folder), probes[label], outputs, probe_values, feeds, gates, labels_meaningful,
        shapes if _trt_ok(path) else None))
    extra = _calibration_commands(
        files, folder, _trt_shapes(feeds.input_name, chw, max(feeds.batch, feeds.calibration_batch), feeds.static,
                                   opt=feeds.calibration_batch),
        _output_checks("int8", gates, labels_meaningful, outputs, feeds.batch)[0][0],
        _output_checks("fp32", gates, labels_meaningful, outputs, feeds.batch)[0][0])
    notes = [f"{label}: {n}" for label, g in probes.items() for n in g.notes]
    if len(inputs) > len(feeds.images):
        notes.append(f"inputs.json holds the first {len(feeds.images)} of the {len(inputs)} images parity judged")
    written = [*FILES, *(f"probe-{k}.onnx" for k in files)]
    written += [f"{f}.data" for f in written if (folder / f"{f}.data").is_file()]  # a large probe's weights
    result = KitResult(folder, tuple(sorted(written)), ref.label, len(feeds.images), feeds.batch,
                       len(feeds.probe_images), {k: g.names for k, g in probes.items()}, commands, extra, tuple(notes))
    atomic.write_text(folder / "commands.txt", result.commands_text())
    atomic.write_json(folder / "kit.json", result.to_dict())
    atomic.write_text(folder / "README.md", readme(result))
    return result


def write_run_kit(out_dir: str | Path, reference: Any, variants: Mapping[str, str | Path], gates: Gates, *,
                  limit: int | None = None, calibration_size: int = 128) -> KitResult:
    """The kit of a run or a parity check: parity's own test images (:func:`load_parity_data` with the same
    ``limit``), its calibration split, against ``reference`` (a workbench ``Reference``: the PyTorch module, or the
    user's FP32 ONNX graph)."""
    from resdeploy.pipeline.workbench import load_parity_data

    data = load_parity_data(reference, limit, calibration_size)
    return write_polygraphy_kit(out_dir, variants=variants, reference=reference.onnx or reference.model,
                                inputs=data.images, calibration=data.calibration, gates=gates,
                                labels_meaningful=data.labels_meaningful)


def read_kit_commands(out_dir: str | Path) -> str:
    """The commands a kit folder holds (its commands.txt), for a report written after the run."""
    path = Path(out_dir) / "commands.txt"
    if not path.is_file():
        raise InputError(f"{path} does not exist; write the kit with write_polygraphy_kit (resdeploy run or parity)")
    return path.read_text()


def _variant_files(variants: Mapping[str, str | Path]) -> dict[str, Path]:
    files = {label: Path(p) for label, p in variants.items()}
    if not files:
        raise InputError("polygraphy kit: no variants given; pass the run's ONNX files as {label: path}")
    for label, path in files.items():
        if _precision(label) not in PRECISIONS:
            raise InputError(f"polygraphy kit: variant label {label!r}; start it with one of {', '.join(PRECISIONS)}")
        if not path.is_file():
            raise InputError(f"polygraphy kit: variant {label} file {path} does not exist")
    return files


def _feeds(model: Any, inputs: np.ndarray, calibration: np.ndarray, input_name: str | None, max_images: int,
           probe_images: int) -> _Feeds:
    name, fixed = _input_of(model, input_name)
    per_image = int(np.prod(np.shape(inputs)[1:], dtype=np.int64)) * 4
    images, batch = _images(inputs, fixed, max(1, min(max_images, MAX_INPUT_BYTES // max(per_image, 1))), "inputs")
    probe, probe_batch = _images(images, fixed, max(probe_images, fixed or 1), "inputs")
    cal = np.ascontiguousarray(np.asarray(calibration, np.float32))
    if cal.ndim != 4 or cal.shape[1:] != images.shape[1:]:
        raise InputError(f"polygraphy kit: calibration images of shape {cal.shape}; expected (N, "
                         f"{', '.join(map(str, images.shape[1:]))}) like the inputs")
    cal_batch = fixed if fixed is not None else min(CALIBRATION_BATCH, len(cal))
    if len(cal) < cal_batch or not len(cal):
        raise InputError(f"polygraphy kit: {len(cal)} calibration images; the graph's batch needs {cal_batch or 1}")
    return _Feeds(name, fixed is not None, images, batch, probe, probe_batch, cal, cal_batch)


def _precision(label: str) -> str:
    return label.split("-")[0].lower()


def _input_of(model: Any, input_name: str | None) -> tuple[str, int | None]:
    """(the image input's name, its fixed batch or None when dynamic)."""
    ins = graph_inputs(model)
    if input_name is None and len(ins) != 1:
        raise InputError(f"polygraphy kit: the graph has {len(ins)} inputs ({[i.name for i in ins]}); name the image "
                         "input with input_name")
    info = next((i for i in ins if input_name in (None, i.name)), None)
    if info is None:
        raise InputError(f"polygraphy kit: the graph has no input {input_name!r}; its inputs are "
                         f"{[i.name for i in ins]}")
    if len(info.shape) != 4:
        raise InputError(f"polygraphy kit: input {info.name} has shape {info.shape}; the kit feeds (N, C, H, W) images")
    return info.name, info.shape[0]


def _images(inputs: np.ndarray, batch: int | None, max_images: int, what: str) -> tuple[np.ndarray, int]:
    """(the images to write, images per iteration): every image in one iteration for a dynamic batch; a fixed batch
    gets whole iterations of it."""
    x = np.ascontiguousarray(np.asarray(inputs, np.float32)[:max_images])
    if x.ndim != 4 or not len(x):
        raise InputError(f"polygraphy kit: {what} of shape {np.shape(inputs)}; give (N, C, H, W) float32 images "
                         "normalised as the model expects")
    if batch is None:
        return x, len(x)
    if len(x) < batch:
        raise InputError(f"polygraphy kit: {len(x)} {what} images; the graph's fixed batch is {batch}")
    return x[:len(x) // batch * batch], batch


def _npy(a: np.ndarray) -> bytes:
    """``np.save`` bytes (deterministic, unlike ``np.savez``'s zip timestamps)."""
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_json(folder: Path, feeds: _Feeds, outputs: Mapping[str, np.ndarray],
                probe_values: Mapping[str, np.ndarray], ref: ProbeReference) -> None:
    """inputs.json, inputs-probe.json, reference.json and reference-probe.json, serialised by Polygraphy itself."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import to_json

    runner = "pytorch-fp32" if ref.module is not None else "onnxruntime-fp32-reference"

    def run_results(values: Mapping[str, np.ndarray], n: int, batch: int) -> str:
        iterations = [IterationResult({k: v[s:s + batch] for k, v in values.items()}, runner_name=runner)
                      for s in range(0, n, batch)]
        rr = RunResults()
        rr.append((runner, iterations))
        return rr.to_json() + "\n"

    def feed_dicts(images: np.ndarray, batch: int) -> str:
        return to_json([{feeds.input_name: images[s:s + batch]} for s in range(0, len(images), batch)]) + "\n"

    atomic.write_text(folder / "inputs.json", feed_dicts(feeds.images, feeds.batch))
    atomic.write_text(folder / "inputs-probe.json", feed_dicts(feeds.probe_images, feeds.probe_batch))
    atomic.write_text(folder / "reference.json", run_results(outputs, len(feeds.images), feeds.batch))
    atomic.write_text(folder / "reference-probe.json",
                      run_results(probe_values, len(feeds.probe_images), feeds.probe_batch))


def _trt_ok(path: Path) -> bool:
    """False for a Q/DQ graph with uint8 activations (u8s8): TensorRT takes only symmetric int8."""
    import onnx

    model = load_onnx(path)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return not any(n.op_type == "QuantizeLinear" and len(n.input) > 2
                   and inits.get(n.input[2]) == onnx.TensorProto.UINT8 for n in model.graph.node)


def _shape(name: str, dims: Sequence[int]) -> str:
    return f"{name}:[{','.join(map(str, dims))}]"


def _trt_shapes(name: str, chw: Sequence[int], batch: int, static: bool, opt: int | None = None) -> tuple[str, ...]:
    """TensorRT's optimisation profile for a dynamic batch: 1 to ``batch`` images, tuned for ``opt``."""
    if static:
        return ()
    return ("--trt-min-shapes", _shape(name, [1, *chw]), "--trt-opt-shapes", _shape(name, [opt or batch, *chw]),
            "--trt-max-shapes", _shape(name, [batch, *chw]))


def _fmt(v: float) -> str:
    """A tolerance as text, rounded towards strictness (down), never looser than ``v``."""
    s = f"{v:.6g}"
    return s if float(s) <= v else f"{v * (1 - 1e-6):.6g}"


def agreement_args(min_agreement: float, batch: int) -> tuple[str, ...]:
    """Polygraphy flags that pass an iteration of ``batch`` images when at least ``min_agreement`` of their top-1
    classes agree with the reference's: the (K-1)/(batch-1) quantile of the top-1 index differences is 0 exactly
    when K = ceil(min_agreement * batch) images or more agree; ``--atol 0.5`` tells 0 from a wrong class."""
    need = max(1, math.ceil(min_agreement * batch - 1e-9))
    q = 1.0 if batch == 1 else (need - 1) / (batch - 1)
    return ("--postprocess", "top-1", "--check-error-stat", "quantile", "--error-quantile", f"{q:.10g}",
            "--atol", "0.5", "--rtol", "0")


def _output_checks(precision: str, gates: Gates, labels_meaningful: bool, outputs: Mapping[str, np.ndarray],
                   batch: int) -> list[tuple[tuple[str, ...], str, str]]:
    """(flags, gate, difference) of each check of a variant's outputs against reference.json."""
    per_iter = "" if batch >= len(next(iter(outputs.values()))) else "checked per iteration of a fixed batch: stricter"

    def agree(a: float, gate: str, diff: str = "") -> tuple[tuple[str, ...], str, str]:
        return agreement_args(a, batch), gate, "; ".join(d for d in (diff, per_iter) if d)

    if precision == "fp32":
        if gates.fp32_max_rel is None:
            abs_check = (("--check-error-stat", "max", "--atol", _fmt(gates.fp32_max_abs), "--rtol", "0"),
                         f"max abs error <= {gates.fp32_max_abs:g}", "")
        else:
            scale = min(float(np.abs(v.reshape(len(v), -1)).max(axis=1).min()) for v in outputs.values())
            abs_check = (("--check-error-stat", "max", "--atol", _fmt(gates.fp32_max_rel * scale), "--rtol", "0"),
                         f"max rel error <= {gates.fp32_max_rel:g} (per image, of its max |output|)",
                         "Polygraphy has no per-image relative error: the absolute error this allows on the image "
                         "with the smallest outputs, for every image (stricter)")
        return [abs_check, agree(gates.fp32_min_agreement, f"top-1 agreement >= {gates.fp32_min_agreement:.2%}")]
    if precision in ("fp16", "bf16"):
        return [agree(gates.fp16_min_agreement, f"top-1 agreement >= {gates.fp16_min_agreement:.2%}")]
    if labels_meaningful:
        a = 1 - gates.int8_max_accuracy_drop / 100
        return [agree(a, f"accuracy drop <= {gates.int8_max_accuracy_drop:g} points",
                      f"no labels in Polygraphy: top-1 agreement >= {a:.2%}, which implies the drop gate (stricter: it "
                      "fails a variant whose flips cancel out)")]
    centered = gates.random_weights_metric == "centered_top1_agreement"
    return [agree(gates.int8_min_agreement, f"{gates.random_weights_metric} >= {gates.int8_min_agreement:.2%}",
                  "plain top-1 agreement: centered agreement has no Polygraphy form (weaker)" if centered else "")]


def _probe_check(g: ProbeGraph, names: Sequence[str], probe_values: Mapping[str, np.ndarray],
                 batch: int) -> tuple[tuple[str, ...], str, str]:
    """(flags, criterion, difference) of a probe graph's outputs ``names`` against reference-probe.json: the skip-add
    check's criterion."""
    kind, limit = g.criterion
    if kind == "cosine":
        return (("--compare", "cosine_similarity", "--cosine-similarity-threshold", f"{limit:g}"),
                f"every block's output (and the graph's): cosine similarity >= {limit:g} (the skip-add check's Q/DQ "
                "criterion)",
                "outputs only: the skip-add check also compares each Add's operands")
    atols = []
    for name in names:
        v = probe_values[name]
        scale = min(float(np.abs(v[s:s + batch]).max()) for s in range(0, len(v), batch))
        atols.append(f"{name}:{_fmt(limit * scale)}")
    return (("--check-error-stat", "max", "--rtol", "0", "--atol", *atols),
            f"every block's output (and the graph's): max abs error <= {limit:g} x its max |value| (the skip-add "
            "check's criterion)",
            "outputs only: the skip-add check also compares each Add's operands")


def _commands(label: str, model: str, probe: ProbeGraph, outputs: Mapping[str, np.ndarray],
              probe_values: Mapping[str, np.ndarray], feeds: _Feeds, gates: Gates, labels_meaningful: bool,
              shapes: tuple[str, ...] | None) -> list[KitCommand]:
    """A variant's commands: its outputs against reference.json, then its probe against reference-probe.json.
    ``shapes``: TensorRT's profile flags, None when TensorRT cannot run the file."""
    precision = _precision(label)
    trt = None if shapes is None else (*shapes, *(("--strongly-typed",) if precision != "fp32" else ()))
    io = ("--load-inputs", "inputs.json", "--load-outputs", "reference.json")
    out = [KitCommand(label, "outputs", model, (*io, *flags), gate, diff, trt)
           for flags, gate, diff in _output_checks(precision, gates, labels_meaningful, outputs, feeds.batch)]
    if probe.probes:
        flags, gate, diff = _probe_check(probe, [*probe.names, *outputs], probe_values, feeds.probe_batch)
        io = ("--load-inputs", "inputs-probe.json", "--load-outputs", "reference-probe.json")
        out.append(KitCommand(label, "probes", f"probe-{label}.onnx", (*io, *flags), gate, diff, trt))
    return out


def _calibration_commands(files: Mapping[str, Path], folder: Path, shapes: tuple[str, ...], int8_flags: Sequence[str],
                          fp32_flags: Sequence[str]) -> tuple[str, ...]:
    """TensorRT's own INT8 calibration of the FP32 file on data_loader.py's images (``shapes``: a profile tuned for
    their batch) and that engine's check with the INT8 gate's flags; then TensorRT FP32 against ONNX Runtime on the
    same images, at the FP32 gate's flags."""
    if "fp32" not in files:
        return ()
    model = os.path.relpath(files["fp32"], folder)
    convert = ["polygraphy", "convert", model, "--int8", *shapes, "--data-loader-script", "data_loader.py:load_data",
               "--calibration-cache", "calibration.cache", "-o", "int8-calibrated.engine"]
    run = ["polygraphy", "run", "int8-calibrated.engine", "--model-type", "engine", "--trt", "--load-inputs",
           "inputs.json", "--load-outputs", "reference.json", *int8_flags]
    compare = ["polygraphy", "run", model, "--trt", *shapes, "--onnxrt", "--data-loader-script",
               "data_loader.py:load_data", *fp32_flags]
    return shlex.join(convert), shlex.join(run), shlex.join(compare)


def data_loader_source(input_name: str, batch: int) -> str:
    """data_loader.py: feed dicts of calibration.npy beside it, ``batch`` images each; needs only numpy."""
    return f'''"""Polygraphy data loader: resdeploy's calibration images as feed dicts.

    polygraphy run <model.onnx> --trt --onnxrt --data-loader-script data_loader.py:load_data
    polygraphy convert <model.onnx> --int8 --data-loader-script data_loader.py:load_data -o <engine>

Needs only numpy. The images are calibration.npy beside this file: (N, C, H, W) float32, normalised as the model
expects. Batches of BATCH images; a last partial batch is left out (TensorRT calibrates at one shape).
"""

import os

import numpy as np

INPUT_NAME = {input_name!r}
BATCH = {batch}
HERE = os.path.dirname(os.path.abspath(__file__))


def load_data():
    images = np.load(os.path.join(HERE, "calibration.npy"), allow_pickle=False)
    for start in range(0, len(images) - BATCH + 1, BATCH):
        yield {{INPUT_NAME: np.ascontiguousarray(images[start:start + BATCH])}}
'''


def readme(kit: KitResult) -> str:
    """The folder's README: what each file is, then the commands (:meth:`KitResult.markdown`)."""
    probes = "\n".join(f"| `probe-{k}.onnx` | the {k} variant, its {len(v)} block outputs also graph outputs |"
                       for k, v in kit.probes.items())
    return f"""# Polygraphy checks of this run

resdeploy's parity check, in Polygraphy's formats, for engines resdeploy cannot run here (TensorRT on your GPU).

| file | what |
|---|---|
| `inputs.json` | the images parity judged, as `polygraphy run --save-inputs` writes them |
| `inputs-probe.json` | the first {kit.probe_images} of them, for the probes (block outputs are large) |
| `reference.json` | {kit.reference}'s outputs on them (a `RunResults`) |
{probes}
| `reference-probe.json` | {kit.reference}'s values at each probe output, under its name |
| `data_loader.py`, `calibration.npy` | `--data-loader-script data_loader.py:load_data`: calibration images, numpy only |
| `commands.txt`, `kit.json` | the commands below (`kit.json`: each as argv, for tools) |

{kit.markdown()}
"""
