"""The short-path engine: discover (both sides) -> align -> diff the structure -> compare numbers block by block.

One run per check; the public checks are views of it: :func:`resdeploy.export.check_skip_adds` reports the residual
adds, :func:`resdeploy.export.check_short_paths` every kind. The reference side is what the module's forward
computes (torch.export); when the module declares its blocks (``short_paths()`` or ``residual_blocks()``, as every
resdeploy model does), the traced short paths are cross-checked against the declaration, but discovery never
depends on one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resdeploy.artifact import load_onnx
from resdeploy.errors import InputError
from resdeploy.export.onnx_graph import to_datagraph as onnx_datagraph
from resdeploy.export.align import Pairs, align, block_near
from resdeploy.export.check_report import Defect, ShortPathReport, SkipAddReport, SkipAddRow, shape_text
from resdeploy.export.discover import ADD_KINDS, KINDS, ShortPath, discover
from resdeploy.export.graph import DataGraph
from resdeploy.export.numeric import Numbers, is_full_precision, is_quantized, localise
from resdeploy.export.structure import Diff, diff

RANDOM_IMAGES = 2  # seeded random inputs for the numeric comparison when a reference comes without sample images


@dataclass(frozen=True)
class Declared:
    """One short path as a module declares it."""

    path: str
    kind: str
    inputs: int = 2
    shortcut: str | None = None


@dataclass(frozen=True)
class Trace:
    """What tracing a reference found: its short paths, and how to replay it for the numeric comparison."""

    paths: list[ShortPath]
    declared_problems: tuple[str, ...]  # disagreements between the trace and the module's declaration
    program: Any  # torch.export.ExportedProgram
    graph: DataGraph
    relu_fed: frozenset[str] = frozenset()  # merge outputs whose every consumer is a ReLU


def declarations(module: Any) -> tuple[list[Declared], str] | None:
    """The short paths ``module`` declares, and the method that declares them; None when it declares none."""
    fn = getattr(module, "short_paths", None)
    if callable(fn):
        return [Declared(d.path, d.kind, d.inputs, d.shortcut) for d in fn()], "short_paths()"
    fn = getattr(module, "residual_blocks", None)
    if callable(fn):
        return [Declared(b.path, "add", 2, b.kind) for b in fn()], "residual_blocks()"
    return None


def cross_check(paths: Sequence[ShortPath], declared: Sequence[Declared], method: str) -> list[str]:
    """Disagreements between traced short paths and a declaration, each naming the block and the fix."""
    traced: dict[str, list[ShortPath]] = {}
    for p in paths:
        traced.setdefault(p.block, []).append(p)
    problems: list[str] = []
    for d in declared:
        got = traced.get(d.path, [])
        if not got and d.kind == "add":
            problems.append(f"block {d.path} declares a {d.shortcut} shortcut, but its forward performs no residual add "
                            "(the `+ x` is missing); fix the block's forward")
        elif not got:
            problems.append(f"block {d.path} declares a {d.kind} short path, but its forward makes none; fix the "
                            "module's forward or its declaration")
        elif d.kind == "add" and got[0].kind == "add" and d.shortcut and got[0].shortcut != d.shortcut:
            problems.append(f"block {d.path} declares a {d.shortcut} shortcut, but its forward adds a {got[0].shortcut} "
                            f"one (node {got[0].node}); fix the block or its shortcut_kind")
        elif got[0].kind != d.kind:
            problems.append(f"block {d.path} declares a {d.kind} short path, but its forward makes a {got[0].kind} "
                            f"(node {got[0].node}); fix the module or its short_path_kind")
        elif got[0].inputs != d.inputs:
            problems.append(f"block {d.path} declares a {d.kind} of {d.inputs} inputs, but its forward merges "
                            f"{got[0].inputs}")
    names = {d.path for d in declared}
    for p in paths:
        if p.block not in names:
            what = f"residual {p.op}" if p.kind in ADD_KINDS else f"{p.kind} short path"
            problems.append(f"module {p.block or '<root>'} performs a {what} (node {p.node}) that {method} does not "
                            "declare")
    return problems


def trace(module: Any, example: Any) -> Trace:
    """The short paths ``module``'s forward performs on ``example`` (torch.export, eval mode), cross-checked against
    its declaration when it has one."""
    from resdeploy.export.torch_graph import capture, to_datagraph as torch_datagraph  # imports torch

    program = capture(module, example)
    graph = torch_datagraph(program)
    paths = discover(graph)
    declared = declarations(module)
    problems = cross_check(paths, *declared) if declared is not None else []
    return Trace(paths, tuple(problems), program, graph, frozenset(graph.relu_fed()))


def open_model(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None, str]:
    """(the graph, its file when given one, a label for reports)."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    proto = load_onnx(path) if path is not None else model
    return proto, path, str(path) if path is not None else (proto.graph.name or "<ModelProto>")


def input_shape(model: onnx.ModelProto) -> tuple[int, int, int] | None:
    """The static (C, H, W) of the graph's image input, or None."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return (dims[1], dims[2], dims[3])
    return None


def numeric_input(model: onnx.ModelProto, sample: np.ndarray | None, max_images: int) -> tuple[np.ndarray | None, Any, str]:
    """(images to compare on or None, the example to trace with, what the images are). Without sample images a
    float32 graph is compared on seeded random inputs; a quantized or float16 one only structurally."""
    import torch

    if sample is not None:
        sample = np.asarray(sample, np.float32)[:max_images]
        if sample.ndim != 4:
            raise InputError(f"sample has shape {sample.shape}; give (N, C, H, W) images normalised as the model expects")
        return sample, torch.from_numpy(sample[:1].copy()), "the sample images"
    shape = input_shape(model)
    if shape is None:
        raise InputError("the ONNX input has no static (C, H, W); give sample images to trace the reference with")
    rand = np.random.default_rng(0).standard_normal((max(1, min(RANDOM_IMAGES, max_images)), *shape)).astype(np.float32)
    return (rand if is_full_precision(model) else None), torch.from_numpy(rand[:1].copy()), "seeded random inputs"


def _well_formedness(label: str, paths: list[ShortPath], kinds: Collection[str], quantized: bool,
                     report_type: type[ShortPathReport]) -> ShortPathReport:
    """Without a reference: each short path judged on its own."""
    shown = [p for p in paths if p.kind in kinds]
    defects = [Defect(p.block, p.node, msg) for p in shown for msg in p.problems]
    rows = [SkipAddRow(p.block, p.node, _row_kind(p), shape_text(p.shape), p.fork,
                       "ok" if p.well_formed else "defect", short_path=p.kind) for p in shown]
    notes = [] if shown else [_empty_note(report_type)]
    return report_type(label, tuple(rows), tuple(defects), tuple(shown), False, False, None, quantized, tuple(notes))


def _row_kind(p: ShortPath) -> str:
    return p.shortcut if p.kind == "add" else p.kind


def _empty_note(report_type: type[ShortPathReport]) -> str:
    if report_type is SkipAddReport:
        return "no residual adds found (a plain network, or every skip is missing)"
    return "no short paths found (a plain network, or every path is missing)"


def _confirm_by_numbers(d: Diff, numbers: Numbers, pairs: Pairs, tpaths: Sequence[ShortPath], paths: Sequence[ShortPath],
                        numeric: bool) -> None:
    """Pairs only numbers can confirm (a scale folded into a conv): a defect unless the numbers confirmed them."""
    for k, why in d.needs_numbers.items():
        i, j = pairs[k]
        if d.status.get(k) != "ok" or k in numbers.output:
            continue
        block, node = tpaths[j].block, paths[i].node
        if not numeric:
            d.defects.append((k, Defect(block, node, f"{why}; give sample images so the check can confirm the scaled "
                                        "output numerically")))
            d.status[k] = "defect"
            continue
        # ORT fused the Add into a conv whose output it keeps in a blocked layout: the value cannot be exposed.
        # A wrong scale would carry into every later short path, so a later one that matches PyTorch confirms it.
        later = [q for q in numbers.output if q > k]
        if later and numbers.first_divergent is None:
            numbers.notes.append(f"{block}: {why}; its fused output is not exposable, confirmed by the matching "
                                 f"output of {tpaths[pairs[later[0]][1]].block} downstream")
        elif numbers.first_divergent is None:
            d.defects.append((k, Defect(block, node, f"{why}, and its output could not be compared numerically")))
            d.status[k] = "defect"


def _choose_report(paths: Sequence[ShortPath]) -> type[ShortPathReport]:
    """The skip-add report for a network whose short paths are all plain residual adds, else the short-path one."""
    return SkipAddReport if paths and all(p.kind == "add" for p in paths) else ShortPathReport


def run_check(model: onnx.ModelProto | str | Path, reference: Any | None = None, sample: np.ndarray | None = None, *,
              max_images: int = 4, kinds: Collection[str] = KINDS,
              report_type: type[ShortPathReport] | None = None) -> ShortPathReport:
    """One run of the engine on ``model`` (against ``reference``, numerically on ``sample`` or seeded random inputs),
    reporting the short paths of ``kinds``. ``reference``: an nn.Module, or the :class:`Trace` of one (from
    :func:`trace`: several graphs checked against one reference without tracing it each time). ``report_type``
    None: SkipAddReport when every short path on both sides is a plain add, else ShortPathReport. Never raises for
    defects; raises InputError for unreadable input."""
    proto, path, label = open_model(model)
    dg, _ = onnx_datagraph(proto)
    paths = discover(dg)
    quantized = is_quantized(proto)
    if reference is None:
        return _well_formedness(label, paths, kinds, quantized, report_type or _choose_report(paths))
    images, example, inputs = numeric_input(proto, sample, max_images)
    tr = reference if isinstance(reference, Trace) else trace(reference, example)
    pairs = align(paths, tr.paths, quantized=quantized)
    shown = {k for k, (i, j) in enumerate(pairs) if (tr.paths[j] if j is not None else paths[i]).kind in kinds}
    d = diff(paths, tr.paths, pairs, quantized=quantized)
    numbers = Numbers()
    if images is not None:
        matched = [(k, i, j) for k, (i, j) in enumerate(pairs) if k in shown and i is not None and j is not None]
        numbers = localise(proto, path, dg, paths, tr, matched, d.status, images, quantized=quantized, inputs=inputs,
                           structural_defects=bool(d.defects))
    _confirm_by_numbers(d, numbers, pairs, tr.paths, paths, images is not None)
    if images is None:
        numbers.notes.append("no sample images and a quantized or float16 graph: compared structurally only")
    rt = report_type or _choose_report([*paths, *tr.paths])
    return _report(rt, label, paths, tr, pairs, shown, d, numbers, quantized, inputs if images is not None else "")


def _report(rt: type[ShortPathReport], label: str, paths: list[ShortPath], tr: Trace, pairs: Pairs, shown: set[int],
            d: Diff, numbers: Numbers, quantized: bool, inputs: str) -> ShortPathReport:
    """Rows and defects of the pairs ``shown``, defects ordered by where their block sits in the network."""
    tblocks = [t.block for t in tr.paths]
    rows = []
    for k, (i, j) in enumerate(pairs):
        if k not in shown:
            continue
        p = paths[i] if i is not None else None
        t = tr.paths[j] if j is not None else None
        e = numbers.output.get(k)
        rows.append(SkipAddRow(t.block if t else block_near(pairs, k, tblocks), p.node if p else "-",
                               _row_kind(t or p), shape_text(p.shape if p else t.shape), p.fork if p else "-",
                               d.status[k], e[0] if e else None, e[1] if e else None, e[2] if e else None,
                               (t or p).kind, numbers.operand.get(k)))
    defects = [Defect(p.split()[1] if p.startswith("block ") else "", "", f"reference model: {p}")
               for p in tr.declared_problems]
    defects += [x for k, x in d.defects + numbers.defects if k in shown]
    order = {t.block: n for n, t in enumerate(tr.paths)}
    defects.sort(key=lambda x: order.get(x.block, -1 if x.message.startswith("reference model") else len(order)))
    notes = list(numbers.notes) + ([] if rows else [_empty_note(rt)])
    found = tuple(paths[i] for k, (i, _) in enumerate(pairs) if k in shown and i is not None)
    return rt(label, tuple(rows), tuple(defects), found, True, bool(inputs), numbers.first_divergent, quantized,
              tuple(notes), inputs)
