"""Step 3 of the short-path engine: the structural diff of aligned short paths, one defect per disagreement.

Residual adds are worded as the skip-add check always worded them (skip, branch, shortcut); the other kinds as
short paths. Every defect names the reference block it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from resdeploy.export.align import Pairs, block_near, matched_neighbours, scales_agree, shape_matches
from resdeploy.export.check_report import Defect, shape_text
from resdeploy.export.discover import ADD_KINDS, ShortPath


@dataclass
class Diff:
    defects: list[tuple[int, Defect]] = field(default_factory=list)  # (pair index, defect)
    status: dict[int, str] = field(default_factory=dict)  # pair index -> ok | defect | missing | extra
    needs_numbers: dict[int, str] = field(default_factory=dict)  # pair index -> why only numbers can confirm it


def describe(p: ShortPath) -> str:
    if p.kind == "gated_add":
        return f"gated add (H {p.operand_convs[0]} conv, T {p.operand_convs[1]} conv) {shape_text(p.shape)}"
    extra = f" x{p.scale:g}" if p.kind == "scaled_add" and p.scale is not None else ""
    return f"{p.kind}{extra} of {p.inputs} tensors {shape_text(p.shape)}"


def where(pos: tuple[int, int], tpaths: Sequence[ShortPath], onnx_anchor: str = "") -> str:
    """A fork position in words: the input, or the output of a reference block's short path, plus learned ops."""
    if pos[0] == -1:
        base = "the graph input"
    elif 0 <= pos[0] < len(tpaths):
        t = tpaths[pos[0]]
        base = f"the output of block {t.block or t.node}'s {'add' if t.kind in ADD_KINDS else t.kind}"
    else:
        base = f"an extra short path {onnx_anchor}".rstrip()
    return base + (f" + {pos[1]} conv(s)" if pos[1] else "")


def missing_message(t: ShortPath, prev: str, nxt: str) -> str:
    if t.kind == "add":
        return (f"no residual Add in the ONNX graph for this block: expected a {t.shortcut} skip adding "
                f"{shape_text(t.shape)} after {prev} and before {nxt}; found none (skip removed, or the Add replaced "
                "by another op)")
    return (f"no {t.kind} short path in the ONNX graph for this block: expected a {describe(t)} after {prev} and "
            f"before {nxt}; found none (path dropped, an input lost, or the merge replaced by another op)")


def extra_message(p: ShortPath, block: str) -> str:
    what = (f"fork {p.fork}, {p.shortcut} shortcut, {shape_text(p.shape)}" if p.kind in ADD_KINDS
            else f"{describe(p)}, fork {p.fork}")
    return f"extra {p.op} ({what}) that the reference does not have, in or next to block {block or '?'}"


def _pair_findings(p: ShortPath, t: ShortPath, mapped: int, tpaths: Sequence[ShortPath], quantized: bool) -> list[str]:
    found: list[str] = []
    adds = p.kind in ADD_KINDS and t.kind in ADD_KINDS
    kind_ok = adds or p.kind == t.kind
    if not kind_ok:
        found.append(f"short path is a {p.kind} ({p.op}); expected a {t.kind}")
    if kind_ok and not adds and p.inputs != t.inputs:
        found.append(f"merges {p.inputs} tensors; expected {t.inputs}")
    if not shape_matches(p.shape, t.shape):
        found.append(f"output shape is {shape_text(p.shape)}; expected {shape_text(t.shape)}")
    if adds:
        if p.shortcut != t.shortcut:
            found.append(f"shortcut kind is {p.shortcut}; expected {t.shortcut}")
        for role, k in (("branch", 0), ("shortcut", 1)):
            if p.operand_convs[k] != t.operand_convs[k]:
                found.append(f"{role} holds {p.operand_convs[k]} convs; expected {t.operand_convs[k]}")
    elif kind_ok:
        pc = p.operand_convs if p.kind == "gated_add" else tuple(sorted(p.operand_convs))
        tc = t.operand_convs if t.kind == "gated_add" else tuple(sorted(t.operand_convs))
        if pc != tc:
            found.append(f"convs on the paths from the fork are {pc}; expected {tc}")
    if mapped != t.position[0] or p.position[1] != t.position[1]:
        got = where((mapped, p.position[1]), tpaths, p.anchor)
        if t.kind == "add":
            found.append(f"skip taken from {p.fork} ({got}); expected the block input ({where(t.position, tpaths)})")
        else:
            found.append(f"path taken from {p.fork} ({got}); expected {where(t.position, tpaths)}")
    if adds and p.scale is not None and t.scale is not None and not quantized and not scales_agree(p.scale, t.scale):
        found.append(f"scales the branch by {p.scale:g}; expected {t.scale:g}")
    if kind_ok and t.kind == "mean_join" and p.scale is not None and t.scale is not None and abs(p.scale - t.scale) > 1e-3:
        found.append(f"divides by {p.scale:g}; expected {t.scale:g}")
    for msg in p.problems:
        if not any(msg.split(";")[0] in f for f in found):
            found.append(msg)
    return found


def diff(paths: Sequence[ShortPath], tpaths: Sequence[ShortPath], pairs: Pairs, *, quantized: bool = False) -> Diff:
    """Defects of the ONNX short paths ``paths`` against the reference's ``tpaths`` under the alignment ``pairs``."""
    out = Diff()
    o2t = {i: j for i, j in pairs if i is not None and j is not None}
    tblocks = [t.block for t in tpaths]
    for k, (i, j) in enumerate(pairs):
        if i is None:
            t = tpaths[j]
            prev, nxt = matched_neighbours(pairs, k, [p.node for p in paths])
            out.defects.append((k, Defect(t.block, "", missing_message(t, prev, nxt))))
            out.status[k] = "missing"
            continue
        p = paths[i]
        if j is None:
            blk = block_near(pairs, k, tblocks)
            out.defects.append((k, Defect(blk, p.node, extra_message(p, blk))))
            out.status[k] = "extra"
            continue
        t = tpaths[j]
        mapped = -1 if p.position[0] < 0 else o2t.get(p.position[0], -2)
        found = _pair_findings(p, t, mapped, tpaths, quantized)
        out.defects += [(k, Defect(t.block, p.node, f)) for f in found]
        out.status[k] = "defect" if found else "ok"
        if t.kind in ADD_KINDS and p.kind in ADD_KINDS and (t.scale is None) != (p.scale is None):
            shown = t.scale if t.scale is not None else p.scale
            out.needs_numbers[k] = (f"the scale {shown:g} is not in the graph (folded into the branch's conv?)"
                                    if t.scale is not None else f"the graph scales the branch by {shown:g}, which the "
                                    "reference does with a parameter or not at all")
    return out
