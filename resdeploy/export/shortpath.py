"""The short-path check: the skip-add check generalised to every short path of the seed's families.

Kinds (declared by the model, found in both graphs by the rules below, on the same DataGraph as the residual rule
of :mod:`resdeploy.export.graph`, so Q/DQ, Identity/Cast and ORT's fused convs are seen through the same way):

* ``add`` - a residual Add, found and judged by the residual rule (fork, identity/projection/option-A shortcut).
* ``scaled_add`` - a residual Add whose branch operand is multiplied by a scalar ``p`` first (stochastic depth at
  inference, ``x + p*f(x)``). ORT's optimizer may fold ``p`` into the branch's last conv (ConvMulFusion); the Add
  then stays and the scale can only be confirmed numerically, so a folded scale needs sample images to pass.
* ``concat`` - a channel Concat of three-or-more-dimensional tensors of which one is an *earlier* tensor: an
  ancestor of another input (DenseNet's ``cat([x, f(x)])``). Its fork is that earlier tensor.
* ``gated_add`` - ``Add(Mul(H, T), Mul(x, Sub(1, T)))`` (a Highway layer): the gate ``T`` feeds both Muls, once
  directly, once as ``1 - T``; the carry operand ``x`` is the fork. A ``T`` where ``1 - T`` belongs, or another
  constant than 1, is a defect of the gated add.
* ``mean_join`` - a ``Mean`` node, or a tree of Adds over ``n`` tensors followed by a Div by ``n`` (or a Mul by
  ``1/n``): FractalNet's join. The Adds inside belong to the join and are not residual adds.

For each short path the check records its fork (the latest tensor every operand starts from), the convs on each
operand's path from the fork, its output shape, its position (the short path the fork follows, and the convs
since) and its problems. With a reference it aligns the ONNX list with the traced PyTorch list (same
edit-distance alignment as the skip-add check; a scaled add whose scale was folded pairs with a scaled add),
reports count, order, kinds, forks and shapes, then compares each short path's output with PyTorch's on real
input and names the first block that diverges. ``check_short_paths`` hands models that have only residual adds
to :func:`resdeploy.export.skipadd.check_skip_adds` unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resdeploy.artifact import load_onnx
from resdeploy.errors import CheckFailed, InputError
from resdeploy.export import onnx_graph
from resdeploy.export.graph import LEARNED, DataGraph, DNode, analyse
from resdeploy.export.skipadd import (FLOAT_RTOL, QLINEAR_OUTPUT_SCALE, QUANT_MIN_COSINE, Defect, SkipAddReport, SkipAddRow, align_by,
                                      block_near, matched_neighbours,
                                      _dequantize_qlinear_output, _errors, _input_shape, _is_quantized,
                                      _onnx_values, _shape, _shape_matches, check_skip_adds)

__all__ = ["ShortPath", "ShortPathReport", "check_short_paths", "find_short_paths", "trace_short_paths",
           "require_short_paths_pass", "KINDS"]

KINDS = ("add", "concat", "gated_add", "scaled_add", "mean_join")
SCALE_RTOL = 1e-3  # a scale written as float32 (or dequantized) differs from the Python float by far less


@dataclass(frozen=True)
class ShortPath:
    """One short path of a graph (ONNX or traced PyTorch)."""

    kind: str  # add | concat | gated_add | scaled_add | mean_join | other (a merge no rule accepts: a defect)
    node: str  # DataGraph node that makes it (the Concat, the final Add, the Div/Mean); ONNX or FX node name
    output: str  # its output tensor
    operands: tuple[str, ...]  # merged tensors (gated_add: transform H, gate T, carry x)
    fork: str  # the latest tensor all operands start from
    shape: tuple[object, ...] | None  # (C, H, W) of the output
    operand_convs: tuple[int, ...]  # learned convs between the fork and each operand (gated_add: H, T, x)
    position: tuple[int, int]  # (index of the short path the fork follows, -1 = the input; convs since)
    block: str = ""  # module scope the front-end recorded ("" if none)
    op: str = ""  # the op as written
    shortcut: str = ""  # add / scaled_add: the residual rule's shortcut kind
    scale: float | None = None  # scaled_add: p (None: not in the graph, folded); mean_join: the divisor n
    problems: tuple[str, ...] = ()

    @property
    def well_formed(self) -> bool:
        return not self.problems

    @property
    def inputs(self) -> int:
        return 2 if self.kind == "gated_add" else len(self.operands)

    def key(self) -> tuple:
        """What must agree between the ONNX graph and the reference (a folded scale is still a scaled add)."""
        convs = self.operand_convs if self.kind == "gated_add" else tuple(sorted(self.operand_convs))
        return (self.kind, self.inputs, convs, self.shortcut, self.position[1], self.well_formed)


def other_short_path_nodes(graph: DataGraph) -> frozenset[int]:
    """Node indices of gated adds and mean joins (their Adds and Muls): merges the residual rule must not take
    for residual adds. Empty for ResNets, so the skip-add check sees them exactly as before."""
    return frozenset(_analyse(graph)[1])


def analyse_short_paths(graph: DataGraph) -> list[ShortPath]:
    """Every short path of ``graph`` in topological order, per the rules in the module docstring."""
    return _analyse(graph)[0]


def _analyse(graph: DataGraph) -> tuple[list[ShortPath], set[int]]:
    nodes = graph.nodes
    n_in = len(graph.inputs)
    prod: dict[str, int] = {}
    anc: dict[str, int] = {t: 1 << k for k, t in enumerate(graph.inputs)}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        bits = 1 << (n_in + i)
        for t in n.inputs:
            bits |= anc.get(t, 0)
            consumers.setdefault(t, []).append(i)
        for o in n.outputs:
            anc[o] = bits
            prod[o] = i
    learned = 0
    for i, n in enumerate(nodes):
        if n.op in LEARNED and not n.selection and not n.channel_scale:
            learned |= 1 << (n_in + i)

    def node_of(t: str) -> DNode | None:
        return nodes[prod[t]] if t in prod else None

    def fork_of(operands: Sequence[str]) -> str:
        common = -1
        for t in operands:
            common &= anc.get(t, 0)
        if common <= 0:
            return ""
        top = common.bit_length() - 1
        if top < n_in:
            return graph.inputs[top]
        outs = nodes[top - n_in].outputs
        return next((o for o in outs if o in operands), outs[0])

    def convs_between(fork: str, t: str) -> int:
        return bin(anc.get(t, 0) & ~anc.get(fork, 0) & learned).count("1")

    def rank_ok(t: str) -> bool:
        s = graph.shapes.get(t)
        return s is None or len(s) >= 3

    def out_shape(t: str) -> tuple[object, ...] | None:
        s = graph.shapes.get(t)
        return tuple(s[1:]) if s is not None else None

    claimed: set[int] = set()
    found: dict[int, dict[str, Any]] = {}  # defining node index -> facts

    # Mean joins: a Mean node, or Div(n) / Mul(1/n) over a tree of two-operand Adds with n leaves.
    for i, n in enumerate(nodes):
        if n.op == "other" and n.raw_op == "Mean" and len(n.inputs) >= 2 and rank_ok(n.outputs[0]):
            found[i] = dict(kind="mean_join", operands=tuple(n.inputs), scale=float(len(n.inputs)), problems=())
            claimed.add(i)
            continue
        if n.op not in ("div", "mul") or len(n.inputs) != 1 or len(n.consts) != 1 or n.consts[0][0] != 1:
            continue
        top = node_of(n.inputs[0])
        if top is None or top.op != "add" or len(top.inputs) != 2:
            continue
        leaves: list[str] = []
        tree: list[int] = []

        def walk(t: str) -> None:
            p = node_of(t)
            if p is not None and p.op == "add" and len(p.inputs) == 2 and len(consumers.get(t, [])) == 1 \
                    and rank_ok(t):
                tree.append(prod[t])
                for u in p.inputs:
                    walk(u)
            else:
                leaves.append(t)

        walk(n.inputs[0])
        c = n.consts[0][1]
        divisor = c if n.op == "div" else (1.0 / c if c else float("inf"))
        problems: tuple[str, ...] = ()
        if abs(divisor - len(leaves)) > 1e-3 * len(leaves):
            problems = (f"divides the sum of {len(leaves)} inputs by {divisor:g}; a mean join divides by {len(leaves)}",)
        found[i] = dict(kind="mean_join", operands=tuple(leaves), scale=divisor, problems=problems)
        claimed.update([i, *tree])

    # Gated adds: Add(Mul(H, T), Mul(x, 1 - T)).
    def one_minus(t: str) -> tuple[str, float] | None:
        """(T, c) when ``t`` is ``c - T`` for a scalar c, else None."""
        p = node_of(t)
        if p is None or len(p.inputs) != 1 or len(p.consts) != 1:
            return None
        pos, c = p.consts[0]
        if (p.op == "sub" and pos == 0) or (p.raw_op == "rsub" and pos == 1):
            return p.inputs[0], c
        return None

    for i, n in enumerate(nodes):
        if i in claimed or n.op != "add" or len(n.inputs) != 2:
            continue
        muls = [node_of(t) for t in n.inputs]
        if any(m is None or m.op != "mul" or len(m.inputs) != 2 for m in muls):
            continue
        a, b = muls  # type: ignore[misc]
        match = None
        for first, second in ((a, b), (b, a)):
            for t in first.inputs:
                for u in second.inputs:
                    om = one_minus(u)
                    if om is not None and om[0] == t:
                        h = next(x for x in first.inputs if x != t) if first.inputs.count(t) == 1 else t
                        x = next(v for v in second.inputs if v != u)
                        problems = () if abs(om[1] - 1) < 1e-6 else (f"the carry gate is {om[1]:g} - T; expected 1 - T",)
                        match = (first, second, h, t, x, problems, prod[u])
                        break
                if match:
                    break
            if match:
                break
        if match is None:
            # ``1 - T`` replaced by ``T``: both Muls read the same gate. The carry is the operand with fewer convs.
            shared = [t for t in a.inputs if t in b.inputs]
            if len(shared) == 1:
                t = shared[0]
                oa, ob = (next(v for v in m.inputs if v != t) for m in (a, b))
                fork = fork_of([oa, ob, t])
                h, x = (oa, ob) if convs_between(fork, oa) >= convs_between(fork, ob) else (ob, oa)
                first, second = (a, b) if h == oa else (b, a)
                match = (first, second, h, t, x, ("the carry is multiplied by the gate T itself; a Highway layer "
                                                  "carries x * (1 - T)",), None)
        if match is None:
            continue
        first, second, h, t, x, problems, sub_idx = match
        found[i] = dict(kind="gated_add", operands=(h, t, x), scale=None, problems=problems)
        claimed.update([i, prod[first.outputs[0]], prod[second.outputs[0]]] + ([sub_idx] if sub_idx is not None else []))

    # Concats of an earlier tensor.
    for i, n in enumerate(nodes):
        if n.op != "concat" or len(n.inputs) < 2 or not rank_ok(n.outputs[0]):
            continue
        earlier = [t for t in n.inputs if any(u != t and anc.get(t, 0) and (anc[t] & anc.get(u, 0)) == anc[t]
                                               for u in n.inputs)]
        if earlier:
            found[i] = dict(kind="concat", operands=tuple(n.inputs), scale=None, problems=())
            claimed.add(i)

    other = set(claimed)  # gated adds and mean joins (concats are never residual merges)
    # Residual adds (and any other merge the residual rule finds) not claimed above.
    for m in analyse(graph, frozenset(claimed)):
        if m.index in claimed:
            continue
        problems = list(m.problems)
        kind, scale = "add", None
        bnode = node_of(m.branch)
        if bnode is not None and bnode.op in ("mul", "div") and len(bnode.inputs) == 1 and len(bnode.consts) == 1:
            c = bnode.consts[0][1]
            kind, scale = "scaled_add", (c if bnode.op == "mul" else (1.0 / c if c else float("inf")))
        if m.op != "add":
            kind = "other"
        found[m.index] = dict(kind=kind, operands=(m.branch, m.shortcut), scale=scale, problems=tuple(problems),
                              shortcut=m.kind, merge=m)

    order = sorted(found)
    defining = {i: k for k, i in enumerate(order)}
    path_mask = 0
    for i in order:
        path_mask |= 1 << (n_in + i)
    out: list[ShortPath] = []
    for i in order:
        f = found[i]
        n = nodes[i]
        operands = f["operands"]
        fork = fork_of(operands)
        fork_anc = anc.get(fork, 0)
        convs = tuple(convs_between(fork, t) for t in operands)
        problems = list(f["problems"])
        if f["kind"] == "concat" and fork not in operands:
            problems.append("no input of the Concat is an earlier tensor of another")
        if f["kind"] == "gated_add":
            hc, tc, xc = convs
            if xc != 0:
                problems.append(f"the carry operand is {xc} conv(s) past the fork; a Highway layer carries its input")
            if hc < 1 or tc < 1:
                problems.append("the transform H and the gate T each need a conv of their own")
        if f["kind"] == "mean_join" and len(operands) < 2:
            problems.append("a join of a single input")
        prior = fork_anc & path_mask
        if prior:
            top = prior.bit_length() - 1
            since = fork_anc & ~anc[nodes[top - n_in].outputs[0]]
            position = (defining[top - n_in], bin(since & learned).count("1"))
        else:
            position = (-1, bin(fork_anc & learned).count("1"))
        out.append(ShortPath(f["kind"], n.name, n.outputs[0], tuple(operands), fork, out_shape(n.outputs[0]), convs,
                             position, n.scope, n.raw_op or n.op, f.get("shortcut", ""), f["scale"], tuple(problems)))
    return out, other


# --------------------------------------------------------------------------------------------------- ONNX side
def find_short_paths(model: onnx.ModelProto | str | Path) -> list[ShortPath]:
    """The short paths of an ONNX graph in topological order."""
    proto = load_onnx(Path(model)) if isinstance(model, (str, Path)) else model
    dg, _ = onnx_graph.to_datagraph(proto)
    return analyse_short_paths(dg)


# ------------------------------------------------------------------------------------------------ PyTorch side
@dataclass(frozen=True)
class TorchShortPaths:
    paths: list[ShortPath]
    declared_problems: tuple[str, ...]
    program: Any  # torch.export.ExportedProgram
    relu_fed: frozenset[str] = frozenset()


def _declared(module: Any) -> list[Any] | None:
    fn = getattr(module, "short_paths", None)
    return fn() if callable(fn) else None


def trace_short_paths(module: Any, example: Any) -> TorchShortPaths:
    """The short paths ``module``'s forward performs on ``example`` (torch.export, eval mode), cross-checked
    against its declaration (``short_paths()``) when it has one."""
    from resdeploy.export.torch_structure import _capture, to_datagraph

    program = _capture(module, example)
    graph = to_datagraph(program)
    paths = analyse_short_paths(graph)
    problems: list[str] = []
    declared = _declared(module)
    if declared is not None:
        traced: dict[str, list[ShortPath]] = {}
        for p in paths:
            traced.setdefault(p.block, []).append(p)
        for d in declared:
            got = traced.get(d.path, [])
            if not got:
                problems.append(f"block {d.path} declares a {d.kind} short path, but its forward makes none; "
                                "fix the module's forward or its declaration")
            elif got[0].kind != d.kind:
                problems.append(f"block {d.path} declares a {d.kind} short path, but its forward makes a {got[0].kind} "
                                f"(node {got[0].node}); fix the module or its short_path_kind")
            elif got[0].inputs != d.inputs:
                problems.append(f"block {d.path} declares a {d.kind} of {d.inputs} inputs, but its forward merges "
                                f"{got[0].inputs}")
        names = {d.path for d in declared}
        for p in paths:
            if p.block not in names:
                problems.append(f"module {p.block or '<root>'} makes a {p.kind} short path (node {p.node}) that "
                                "short_paths() does not declare")
    return TorchShortPaths(paths, tuple(problems), program, frozenset(graph.relu_fed()))


# ------------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class ShortPathReport:
    """The skip-add report's shape (rows, defects, first_divergent, to_dict/to_json), for every short-path kind."""

    model: str
    rows: tuple[SkipAddRow, ...]  # ``kind`` holds the short-path kind
    defects: tuple[Defect, ...]
    paths: tuple[ShortPath, ...]  # found in the ONNX graph
    reference: bool
    numeric: bool
    first_divergent: str | None = None
    quantized: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return not self.defects

    @property
    def adds(self) -> tuple[ShortPath, ...]:
        """The residual adds among the short paths (what the skip-add report lists as ``adds``)."""
        return tuple(p for p in self.paths if p.kind in ("add", "scaled_add"))

    def to_dict(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for p in self.paths:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        return {
            "model": self.model, "passed": bool(self), "reference": self.reference, "numeric": self.numeric,
            "quantized": self.quantized, "residual_adds": len(self.adds), "short_paths": len(self.paths),
            "kinds": kinds, "first_divergent": self.first_divergent,
            "rows": [dict(r.__dict__) for r in self.rows],
            "defects": [{"block": d.block, "node": d.node, "message": d.message} for d in self.defects],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in self.to_dict()["kinds"].items()) or "none"
        head = (f"{'#':>3}  {'block':<34} {'ONNX node':<22} {'kind':<10} {'shape':<13} {'fork':<18} "
                f"{'status':<9} {'max abs':>9} {'rel':>9}")
        lines = [f"short-path check of {self.model}: {len(self.paths)} short paths ({kinds})"
                 + (" vs PyTorch reference" if self.reference else " (no reference: well-formedness only)")
                 + (" + numeric localisation" if self.numeric else ""), head]
        for i, r in enumerate(self.rows):
            err = (f"{r.max_abs_err:9.2e} {r.rel_err:9.2e}" if r.max_abs_err is not None and r.rel_err is not None
                   else f"{'-':>9} {'-':>9}")
            lines.append(f"{i:>3}  {r.block[-34:]:<34} {r.node[:22]:<22} {r.kind:<10} {r.shape:<13} {r.fork[:18]:<18} "
                         f"{r.status:<9} {err}")
        lines += [f"note: {n}" for n in self.notes]
        if self.first_divergent:
            lines.append(f"first block whose short-path output diverges numerically: {self.first_divergent}")
        lines.append("PASSED" if self else f"FAILED: {len(self.defects)} defect(s)")
        lines += [f"  - {d}" for d in self.defects]
        return "\n".join(lines)


def _only_residual(reference: Any | None, found: list[ShortPath]) -> bool:
    """A model whose short paths are all plain residual adds keeps the skip-add check exactly as it was."""
    if reference is not None:
        declared = _declared(reference)
        if declared is None:
            return True  # not a resdeploy model: the skip-add check's own rules apply
        return bool(declared) and all(d.kind == "add" for d in declared)
    return bool(found) and all(p.kind == "add" for p in found)


def _describe(p: ShortPath) -> str:
    if p.kind == "gated_add":
        return f"gated add (H {p.operand_convs[0]} conv, T {p.operand_convs[1]} conv) {_shape(p.shape)}"
    extra = f" x{p.scale:g}" if p.kind == "scaled_add" and p.scale is not None else ""
    return f"{p.kind}{extra} of {p.inputs} tensors {_shape(p.shape)}"


def _where(pos: tuple[int, int], names: list[str]) -> str:
    base = "the graph input" if pos[0] == -1 else (f"the output of {names[pos[0]]}" if 0 <= pos[0] < len(names)
                                                   else "an extra short path")
    return base + (f" + {pos[1]} conv(s)" if pos[1] else "")


def check_short_paths(
    model: onnx.ModelProto | str | Path,
    reference: Any | None = None,
    sample: np.ndarray | None = None,
    *,
    max_images: int = 4,
) -> SkipAddReport | ShortPathReport:
    """Check every short path of ``model`` (against ``reference``, an nn.Module, and numerically on ``sample``,
    (N,C,H,W) normalised, when given). A model with only residual adds gets :func:`check_skip_adds`' report,
    unchanged. Never raises for defects (``bool(report)`` is pass/fail); raises InputError for unreadable input."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    proto = load_onnx(path) if path is not None else model
    label = str(path) if path is not None else (proto.graph.name or "<ModelProto>")
    dg, _ = onnx_graph.to_datagraph(proto)
    paths = analyse_short_paths(dg)
    if _only_residual(reference, paths):
        return check_skip_adds(proto if path is None else path, reference, sample, max_images=max_images)
    quantized = _is_quantized(proto)
    defects: list[Defect] = []
    rows: list[SkipAddRow] = []
    notes: list[str] = []
    if reference is None:
        for p in paths:
            defects += [Defect(p.block, p.node, msg) for msg in p.problems]
            if p.kind == "other":
                defects.append(Defect(p.block, p.node, f"a {p.op} merges a branch with its skip; no short-path kind "
                                      "merges that way"))
            rows.append(SkipAddRow(p.block, p.node, p.kind, _shape(p.shape), p.fork,
                                   "ok" if p.well_formed and p.kind != "other" else "defect"))
        if not paths:
            notes.append("no short paths found (a plain network, or every path is missing)")
        return ShortPathReport(label, tuple(rows), tuple(defects), tuple(paths), False, False, None, quantized,
                               tuple(notes))

    import torch

    if sample is not None:
        sample = np.asarray(sample, np.float32)[:max_images]
        if sample.ndim != 4:
            raise InputError(f"sample has shape {sample.shape}; give (N, C, H, W) images normalised as the model expects")
        example = torch.from_numpy(sample[:1].copy())
    else:
        in_shape = _input_shape(proto)
        if in_shape is None:
            raise InputError("the ONNX input has no static (C, H, W); give sample images to trace the reference with")
        example = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *in_shape)).astype(np.float32))
    trace = trace_short_paths(reference, example)
    tpaths = trace.paths
    for msg in trace.declared_problems:
        defects.append(Defect(msg.split()[1] if msg.startswith("block ") else "", "", f"reference model: {msg}"))

    def okey(p: ShortPath) -> tuple:
        k = p.key()
        return k if p.kind != "add" else ("scaled_add?",) + k[1:]  # an add may be a scaled add with its scale folded

    def tkey(p: ShortPath) -> tuple:
        k = p.key()
        return k if p.kind != "scaled_add" else ("scaled_add?",) + k[1:]

    t_is_scaled = [p.kind == "scaled_add" for p in tpaths]
    o_keys = [okey(p) if any(t_is_scaled) else p.key() for p in paths]
    t_keys = [tkey(p) if any(t_is_scaled) else p.key() for p in tpaths]
    # An explicit scaled add in the ONNX graph is the same thing as the reference's: unify the tags.
    o_keys = [("scaled_add?",) + k[1:] if any(t_is_scaled) and k[0] == "scaled_add" else k for k in o_keys]
    def cost(i: int, j: int) -> int:
        a, b = paths[i], tpaths[j]
        if o_keys[i] != t_keys[j] or not _shape_matches(a.shape, b.shape):
            return 1
        # Blocks that differ only by their scale (stochastic depth's survival probabilities) pair by the scale.
        if a.kind == "scaled_add" and a.scale is not None and b.scale is not None and not quantized:
            return 0 if abs(a.scale - b.scale) <= SCALE_RTOL * max(abs(b.scale), 1e-12) else 1
        return 0

    pairs = align_by(cost, len(paths), len(tpaths))
    o2t = {i: j for i, j in pairs if i is not None and j is not None}
    tnames = [t.block or t.node for t in tpaths]
    tblocks = [t.block for t in tpaths]

    status: dict[int, str] = {}
    needs_numbers: dict[int, str] = {}  # pair index -> why only numbers can confirm it (a folded scale)
    for k, (i, j) in enumerate(pairs):
        if i is None:
            t = tpaths[j]
            prev, nxt = matched_neighbours(pairs, k, [p.node for p in paths])
            defects.append(Defect(t.block, "", f"no {t.kind} short path in the ONNX graph for this block: expected a "
                                  f"{_describe(t)} after {prev} and before {nxt}; found none (path dropped, an input "
                                  "lost, or the merge replaced by another op)"))
            status[k] = "missing"
            continue
        p = paths[i]
        if j is None:
            blk = block_near(pairs, k, tblocks)
            defects.append(Defect(blk, p.node, f"extra {p.op} ({_describe(p)}, fork {p.fork}) that the reference does "
                                  f"not have, in or next to block {blk or '?'}"))
            status[k] = "extra"
            continue
        t = tpaths[j]
        found: list[str] = []
        kind_ok = p.kind == t.kind or (p.kind == "add" and t.kind == "scaled_add")
        if not kind_ok:
            found.append(f"short path is a {p.kind} ({p.op}); expected a {t.kind}")
        if p.inputs != t.inputs:
            found.append(f"merges {p.inputs} tensors; expected {t.inputs}")
        if not _shape_matches(p.shape, t.shape):
            found.append(f"output shape is {_shape(p.shape)}; expected {_shape(t.shape)}")
        pc = p.operand_convs if p.kind == "gated_add" else tuple(sorted(p.operand_convs))
        tc = t.operand_convs if t.kind == "gated_add" else tuple(sorted(t.operand_convs))
        if kind_ok and pc != tc:
            found.append(f"convs on the paths from the fork are {pc}; expected {tc}")
        if p.shortcut != t.shortcut and kind_ok:
            found.append(f"shortcut kind is {p.shortcut or '-'}; expected {t.shortcut or '-'}")
        mapped = -1 if p.position[0] < 0 else o2t.get(p.position[0], -2)
        if mapped != t.position[0] or p.position[1] != t.position[1]:
            found.append(f"path taken from {p.fork} ({_where((mapped, p.position[1]), tnames)}); expected "
                         f"{_where(t.position, tnames)}")
        if t.kind == "scaled_add" and kind_ok:
            if p.kind == "add" or p.scale is None:
                needs_numbers[k] = f"the scale {t.scale:g} is not in the graph (folded into the branch's conv?)"
            elif t.scale is not None and abs(p.scale - t.scale) > SCALE_RTOL * max(abs(t.scale), 1e-12) and not quantized:
                found.append(f"scales the branch by {p.scale:g}; expected {t.scale:g}")
        if t.kind == "mean_join" and kind_ok and p.scale is not None and t.scale is not None \
                and abs(p.scale - t.scale) > 1e-3:
            found.append(f"divides by {p.scale:g}; expected {t.scale:g}")
        for msg in p.problems:
            if not any(msg.split(";")[0] in f for f in found):
                found.append(msg)
        defects += [Defect(t.block, p.node, f) for f in found]
        status[k] = "defect" if found else "ok"

    first_div: str | None = None
    errs: dict[int, tuple[float, float, float]] = {}
    if sample is not None:
        matched = [(k, i, j) for k, (i, j) in enumerate(pairs) if i is not None and j is not None]
        seen_as = {canonical: t for t, (canonical, op) in dg.aliases.items() if op == "DequantizeLinear"}
        exposed = {paths[i].output: seen_as.get(paths[i].output, paths[i].output) for _, i, _ in matched}
        onnx_relu_fed = dg.relu_fed()
        try:
            ovals = _onnx_values(proto, path, [v for v in exposed.values() if onnx_graph.FUSED_MARK not in v], sample)
        except InputError as exc:
            if not defects:
                raise
            # A structurally broken graph (a concat that lost an input changes every shape after it) may not
            # even load; the structural defects above already name the block.
            ovals = {}
            notes.append(f"numeric localisation skipped: {exc}")
        ovals = {a: ovals[v] for a, v in exposed.items() if v in ovals}
        from resdeploy.export.torch_structure import record_outputs

        tvals = record_outputs(trace.program, torch.from_numpy(sample.copy()), {tpaths[j].output for _, _, j in matched})
        for k, i, j in matched:
            o, t = ovals.get(paths[i].output), tvals.get(tpaths[j].output)
            if o is not None and paths[i].op in QLINEAR_OUTPUT_SCALE:
                o = _dequantize_qlinear_output(proto, paths[i].output, o)
            if t is not None and tpaths[j].output in trace.relu_fed and paths[i].output not in onnx_relu_fed:
                t = np.maximum(t, 0)  # the ReLU after the merge was folded into it (quantizers do)
            if o is None or t is None or o.shape != t.shape:
                continue
            errs[k] = _errors(o, t)
            diff, rel, cos = errs[k]
            bad = cos < QUANT_MIN_COSINE if quantized else rel > FLOAT_RTOL
            if not bad:
                needs_numbers.pop(k, None)
            if bad and status[k] == "ok" and first_div is not None:
                status[k] = "diverged"
            if bad and first_div is None:
                first_div = tpaths[j].block
                if status[k] == "ok":
                    status[k] = "diverged"
                    crit = f"cosine {cos:.4f} < {QUANT_MIN_COSINE}" if quantized else f"rel err {rel:.2e} > {FLOAT_RTOL:.0e}"
                    defects.append(Defect(tpaths[j].block, paths[i].node,
                                          f"{tpaths[j].kind} output differs from PyTorch on real input: max abs err "
                                          f"{diff:.3g}, {crit} (first diverging block; the structure matches, so look "
                                          "at this block's weights, gate or operands)"))
        if quantized:
            notes.append(f"Q/DQ graph: numeric divergence judged by cosine similarity >= {QUANT_MIN_COSINE}")
    for k, why in needs_numbers.items():
        j = pairs[k][1]
        if status.get(k) == "ok":
            if sample is None:
                defects.append(Defect(tpaths[j].block, paths[pairs[k][0]].node, f"{why}; give sample images so the "
                                      "check can confirm the scaled output numerically"))
                status[k] = "defect"
            elif k not in errs:
                # ORT fused the Add into a conv whose output it keeps in a blocked layout: the value cannot be
                # exposed. A wrong scale here would carry into every later short path, so a later one that
                # matches PyTorch confirms it (and any divergence was reported above).
                later = [q for q in errs if q > k]
                if later and first_div is None:
                    notes.append(f"{tpaths[j].block}: {why}; its fused output is not exposable, confirmed by the "
                                 f"matching output of {tpaths[pairs[later[0]][1]].block} downstream")
                elif first_div is None:
                    defects.append(Defect(tpaths[j].block, paths[pairs[k][0]].node, f"{why}, and its output could "
                                          "not be compared numerically"))
                    status[k] = "defect"
    if any(p.kind == "add" for p in paths) and any(t_is_scaled) and not needs_numbers:
        notes.append("scaled adds without a Mul in the graph were confirmed numerically (scale folded into a conv)")
    for k, (i, j) in enumerate(pairs):
        p = paths[i] if i is not None else None
        t = tpaths[j] if j is not None else None
        e = errs.get(k)
        rows.append(SkipAddRow(t.block if t else block_near(pairs, k, tblocks), p.node if p else "-", (t or p).kind,  # type: ignore[union-attr]
                               _shape(p.shape if p else t.shape), p.fork if p else "-", status[k],  # type: ignore[union-attr]
                               e[0] if e else None, e[1] if e else None, e[2] if e else None))
    order = {t.block: n for n, t in enumerate(tpaths)}
    defects.sort(key=lambda d: order.get(d.block, -1 if d.message.startswith("reference model") else len(order)))
    return ShortPathReport(label, tuple(rows), tuple(defects), tuple(paths), True, sample is not None, first_div,
                           quantized, tuple(notes))


def require_short_paths_pass(report: SkipAddReport | ShortPathReport) -> SkipAddReport | ShortPathReport:
    """Raise CheckFailed (exit 1) naming the first defect when the report failed."""
    if not report:
        what = "short-path" if isinstance(report, ShortPathReport) else "skip-add"
        raise CheckFailed(f"{what} check of {report.model} failed: {report.defects[0]}"
                          + (f" (+{len(report.defects) - 1} more)" if len(report.defects) > 1 else ""))
    return report
