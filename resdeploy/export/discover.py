"""Step 1 of the short-path engine: find every short path of a DataGraph, one rule set per kind.

The rules read only the dataflow (never a declaration), so they hold for any network and give the same answer on
an ONNX graph and on the torch.export graph of the module it came from:

* ``add`` - a residual merge: an elementwise two-operand node whose operands are distinct feature maps (rank >= 3)
  of the same shape with a common ancestor. Its **fork** is their latest common ancestor; the operand whose path
  from the fork holds fewer learned ops (convs, linears) is the **shortcut**, the other the **branch**. The
  shortcut is ``identity`` (the fork itself), ``option_a`` (no learned op: subsample / pad / zeros), ``pooled``
  (one conv after an average/max pool: ResNet-D), ``projection`` (one conv, plus BN or per-channel affine ops),
  else ``unknown`` (a defect). Not merges: a node with a broadcast operand (made by a global pool or reduction:
  squeeze-excitation gates, ``x - mean(x)``), and a node whose paths hold no learned op at all (an activation
  written out: SiLU's ``x * sigmoid(x)``, GELU, hardswish). A merge is well formed when it is an Add, its
  shortcut kind is known, the branch holds more learned ops than the shortcut and no other residual merge.
* ``scaled_add`` - an ``add`` whose branch operand is a Mul/Div by a scalar ``p`` (stochastic depth at inference,
  ``x + p*f(x)``). ORT may fold ``p`` into the branch's last conv; only numbers can confirm it then.
* ``concat`` - a Concat of rank >= 3 tensors of which one is an *earlier* tensor, an ancestor of another input
  (DenseNet's ``cat([x, f(x)])``). Its fork is that earlier tensor.
* ``gated_add`` - ``Add(Mul(H, T), Mul(x, Sub(1, T)))`` (a Highway layer); the carry ``x`` is the fork. A ``T``
  where ``1 - T`` belongs, or another constant than 1, is a defect.
* ``mean_join`` - a ``Mean`` node, or a tree of Adds over ``n`` tensors followed by a Div by ``n`` (or a Mul by
  ``1/n``): FractalNet's join. The Adds inside belong to the join.

Each short path records its fork, the learned ops between the fork and each operand, its output shape and its
**position**: (index of the latest short path among the fork's ancestors, or -1 for the graph input; learned ops
since). Two graphs of one network give the same positions whatever their tensors are named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from resdeploy.export.graph import MERGE_OPS, POOL, Ancestry, DataGraph, same_shape

KINDS = ("add", "scaled_add", "concat", "gated_add", "mean_join")
ADD_KINDS = ("add", "scaled_add")
ADD_LIKE_OPS = ("Add", "Sum", "QLinearAdd", "add")


@dataclass(frozen=True)
class ShortPath:
    """One short path of a graph (ONNX or traced PyTorch)."""

    kind: str  # one of KINDS
    node: str  # DataGraph node that makes it (the Add, the Concat, the Div/Mean); ONNX or FX node name
    output: str  # its output tensor
    operands: tuple[str, ...]  # add/scaled_add: (branch, shortcut); gated_add: (H, T, carry x); else the inputs
    fork: str  # the latest tensor all operands start from
    shape: tuple[object, ...] | None  # (C, H, W) of the output
    operand_convs: tuple[int, ...]  # learned ops between the fork and each operand, in operand order
    position: tuple[int, int]  # (index of the short path the fork follows, -1 = the input; learned ops since)
    block: str = ""  # module scope the front-end recorded ("" if none)
    op: str = ""  # the op as written (Add, Sub, Concat...)
    shortcut: str = ""  # add/scaled_add: identity | projection | pooled | option_a | unknown
    scale: float | None = None  # scaled_add: p (None: folded away); mean_join: the divisor n
    problems: tuple[str, ...] = ()
    anchor: str = "input"  # node of the short path the fork follows, or "input"

    @property
    def well_formed(self) -> bool:
        return not self.problems

    @property
    def inputs(self) -> int:
        return 2 if self.kind == "gated_add" else len(self.operands)

    @property
    def is_add(self) -> bool:
        """A residual add (plain or scaled) written as an Add: what the skip-add counts count."""
        return self.kind in ADD_KINDS and self.op in ADD_LIKE_OPS

    def key(self) -> tuple:
        """What must agree between the ONNX graph and the reference for two short paths to pair. A plain and a
        scaled add share a key: a scale folded into a conv (or read from a parameter) is confirmed by numbers."""
        convs = self.operand_convs if self.kind == "gated_add" else tuple(sorted(self.operand_convs))
        kind = "add" if self.kind in ADD_KINDS else self.kind
        return (kind, self.inputs, convs, self.shortcut, self.position[1], self.well_formed)


@dataclass(frozen=True)
class ResidualAdd:
    """One residual merge (a plain or scaled add, or an op found in an add's place) in the skip-add check's terms."""

    node: str  # node name
    output: str  # the merge's output tensor
    branch_input: str  # operand coming through the conv branch
    shortcut_input: str  # operand coming through the shortcut
    fork: str  # the block input: latest tensor both operands start from
    kind: str  # identity | projection | pooled | option_a | unknown
    shape: tuple[object, ...] | None  # (C, H, W) of the output (batch left out); None if unknown
    block: str = ""  # module path the front-end recorded ("" if none)
    op: str = "Add"  # the op as written (a Sub/Mul in an add's place is reported, never accepted)
    branch_convs: int = 0
    shortcut_convs: int = 0
    fork_after: str = "input"  # node of the short path the fork follows, or "input"
    convs_before_fork: int = 0  # learned ops between that short path (or the input) and the fork
    problems: tuple[str, ...] = ()

    @property
    def well_formed(self) -> bool:
        return not self.problems

    @classmethod
    def of(cls, p: ShortPath) -> "ResidualAdd":
        """The view of an add (or scaled add) short path."""
        return cls(p.node, p.output, p.operands[0], p.operands[1], p.fork, p.shortcut, p.shape, p.block, p.op,
                   p.operand_convs[0], p.operand_convs[1], p.anchor, p.position[1], p.problems)

    def __str__(self) -> str:
        shape = "x".join("?" if d is None else str(d) for d in self.shape) if self.shape else "?"
        return f"{self.node}: {self.kind} {shape} fork {self.fork}" + (f" [{self.block}]" if self.block else "")


@dataclass
class _Found:
    kind: str
    operands: tuple[str, ...]
    problems: tuple[str, ...] = ()
    scale: float | None = None
    shortcut: str = ""


def discover(graph: DataGraph) -> list[ShortPath]:
    """Every short path of ``graph`` in topological order, per the rules in the module docstring."""
    a = Ancestry(graph)
    found: dict[int, _Found] = {}
    claimed: set[int] = set()
    _mean_joins(a, found, claimed)
    _gated_adds(a, found, claimed)
    _concats(a, found, claimed)
    _residual_merges(a, found, claimed)
    return _assemble(a, found)


# ------------------------------------------------------------------------------------------------- mean joins
def _mean_joins(a: Ancestry, found: dict[int, _Found], claimed: set[int]) -> None:
    """A Mean node, or Div(n) / Mul(1/n) over a tree of two-operand Adds with n leaves."""
    for i, n in enumerate(a.nodes):
        if n.op == "other" and n.raw_op == "Mean" and len(n.inputs) >= 2 and _rank_ok(a.graph, n.outputs[0]):
            found[i] = _Found("mean_join", tuple(n.inputs), scale=float(len(n.inputs)))
            claimed.add(i)
            continue
        if n.op not in ("div", "mul") or len(n.inputs) != 1 or len(n.consts) != 1 or n.consts[0][0] != 1:
            continue
        top = a.node_of(n.inputs[0])
        if top is None or top.op != "add" or len(top.inputs) != 2 or len(a.consumers.get(n.inputs[0], [])) != 1:
            continue  # a sum read elsewhere too (a residual add scaled on one of its uses) is no join
        leaves, tree = _add_tree(a, n.inputs[0])
        c = n.consts[0][1]
        divisor = c if n.op == "div" else (1.0 / c if c else float("inf"))
        problems: tuple[str, ...] = ()
        if abs(divisor - len(leaves)) > 1e-3 * len(leaves):
            problems = (f"divides the sum of {len(leaves)} inputs by {divisor:g}; a mean join divides by {len(leaves)}",)
        found[i] = _Found("mean_join", tuple(leaves), problems, divisor)
        claimed.update([i, *tree])


def _add_tree(a: Ancestry, tensor: str) -> tuple[list[str], list[int]]:
    """The leaves of the tree of two-operand Adds (each read only by the tree) that makes ``tensor``."""
    leaves: list[str] = []
    tree: list[int] = []
    stack = [tensor]
    while stack:
        t = stack.pop()
        p = a.node_of(t)
        if p is not None and p.op == "add" and len(p.inputs) == 2 and len(a.consumers.get(t, [])) == 1 \
                and _rank_ok(a.graph, t):
            tree.append(a.producer[t])
            stack.extend(reversed(p.inputs))
        else:
            leaves.append(t)
    return leaves, tree


# ------------------------------------------------------------------------------------------------- gated adds
def _one_minus(a: Ancestry, t: str) -> tuple[str, float] | None:
    """(T, c) when ``t`` is ``c - T`` for a scalar c, else None."""
    p = a.node_of(t)
    if p is None or len(p.inputs) != 1 or len(p.consts) != 1:
        return None
    pos, c = p.consts[0]
    if (p.op == "sub" and pos == 0) or (p.raw_op == "rsub" and pos == 1):
        return p.inputs[0], c
    return None


def _gate_match(a: Ancestry, m1, m2) -> tuple | None:  # noqa: ANN001 - two DNode Muls
    """(transform Mul, carry Mul, H, T, x, problems, index of the 1 - T node) for Add(Mul(H, T), Mul(x, 1 - T))."""
    for first, second in ((m1, m2), (m2, m1)):
        for t in first.inputs:
            for u in second.inputs:
                om = _one_minus(a, u)
                if om is not None and om[0] == t:
                    h = next(x for x in first.inputs if x != t) if first.inputs.count(t) == 1 else t
                    x = next(v for v in second.inputs if v != u)
                    problems = () if abs(om[1] - 1) < 1e-6 else (f"the carry gate is {om[1]:g} - T; expected 1 - T",)
                    return first, second, h, t, x, problems, a.producer[u]
    # ``1 - T`` replaced by ``T``: both Muls read the same gate. The carry is the operand with fewer learned ops.
    shared = [t for t in m1.inputs if t in m2.inputs]
    if len(shared) != 1:
        return None
    t = shared[0]
    o1, o2 = (next(v for v in m.inputs if v != t) for m in (m1, m2))
    fork = a.fork_of([o1, o2, t])
    h, x = (o1, o2) if a.learned_in(a.path(fork, o1)) >= a.learned_in(a.path(fork, o2)) else (o2, o1)
    first, second = (m1, m2) if h == o1 else (m2, m1)
    return first, second, h, t, x, ("the carry is multiplied by the gate T itself; a Highway layer carries "
                                    "x * (1 - T)",), None


def _gated_adds(a: Ancestry, found: dict[int, _Found], claimed: set[int]) -> None:
    for i, n in enumerate(a.nodes):
        if i in claimed or n.op != "add" or len(n.inputs) != 2:
            continue
        muls = [a.node_of(t) for t in n.inputs]
        if any(m is None or m.op != "mul" or len(m.inputs) != 2 for m in muls):
            continue
        match = _gate_match(a, *muls)
        if match is None:
            continue
        first, second, h, t, x, problems, sub_idx = match
        found[i] = _Found("gated_add", (h, t, x), problems)
        claimed.update([i, a.producer[first.outputs[0]], a.producer[second.outputs[0]]]
                       + ([sub_idx] if sub_idx is not None else []))


# ---------------------------------------------------------------------------------------------------- concats
def _concats(a: Ancestry, found: dict[int, _Found], claimed: set[int]) -> None:
    """Concats of which one input is an earlier tensor (an ancestor of another input)."""
    for i, n in enumerate(a.nodes):
        if n.op != "concat" or len(n.inputs) < 2 or not _rank_ok(a.graph, n.outputs[0]):
            continue
        earlier = [t for t in n.inputs if a.anc.get(t, 0) and any(
            u != t and (a.anc[t] & a.anc.get(u, 0)) == a.anc[t] for u in n.inputs)]
        if earlier:
            found[i] = _Found("concat", tuple(n.inputs))
            claimed.add(i)


# ------------------------------------------------------------------------------------------- residual merges
def _is_merge(a: Ancestry, i: int, claimed: set[int]) -> bool:
    n = a.nodes[i]
    if i in claimed or n.op not in MERGE_OPS or len(n.inputs) != 2 or n.inputs[0] == n.inputs[1]:
        return False
    x, y = n.inputs
    if not (_rank_ok(a.graph, x) and _rank_ok(a.graph, y)):
        return False
    if same_shape(a.graph.shapes.get(x), a.graph.shapes.get(y)) is False:
        return False
    if x in a.reduced or y in a.reduced:
        return False  # a broadcast gate or bias (squeeze-excitation), not a merge of two feature maps
    if not a.anc.get(x, 0) & a.anc.get(y, 0):
        return False  # two unrelated inputs: not a skip
    fork = a.fork_of([x, y])
    return bool(a.learned_in(a.path(fork, x) | a.path(fork, y)))  # else an activation written out


def _shortcut_kind(a: Ancestry, fork: str, shortcut: str) -> str:
    if shortcut == fork:
        return "identity"
    sp = a.path(fork, shortcut)
    learned = a.learned_in(sp)
    if learned == 0:
        return "option_a"
    ops = a.ops_in(sp)
    if learned == 1 and not any(n.op == "relu" or (n.op in MERGE_OPS and len(n.inputs) == 2) for n in ops):
        return "pooled" if any(n.op == POOL for n in ops) else "projection"
    return "unknown"


def _residual_merges(a: Ancestry, found: dict[int, _Found], claimed: set[int]) -> None:
    merges = [i for i in range(len(a.nodes)) if _is_merge(a, i, claimed)]
    merge_mask = 0
    for i in merges:
        merge_mask |= a.bit_of(i)
    for i in merges:
        n = a.nodes[i]
        x, y = n.inputs
        fork = a.fork_of([x, y])
        path = {t: a.path(fork, t) for t in (x, y)}
        size = {t: (a.learned_in(path[t]), bin(path[t]).count("1")) for t in (x, y)}
        shortcut = x if size[x] < size[y] else y
        branch = y if shortcut == x else x
        kind = _shortcut_kind(a, fork, shortcut)
        problems: list[str] = []
        if kind == "unknown":
            problems.append(f"the shortcut path from the fork holds {a.learned_in(path[shortcut])} learned ops and "
                            f"{bin(path[shortcut]).count('1')} ops; a shortcut is the fork itself, a parameter-free "
                            "subsample/pad, or one conv (+BN, after a pool)")
        if n.op != "add":
            problems.append(f"the residual merge is a {n.raw_op or n.op}; expected an Add")
        bc, sc = size[branch][0], size[shortcut][0]
        if bc <= sc:
            problems.append(f"the branch holds {bc} convs, not more than the shortcut's {sc}")
        inner = bin(path[branch] & merge_mask).count("1")
        if inner:
            problems.append(f"the branch holds {inner} other residual merge(s): the skip spans more than one block")
        scale = _branch_scale(a, branch)
        found[i] = _Found("scaled_add" if scale is not None else "add", (branch, shortcut), tuple(problems), scale, kind)


def _branch_scale(a: Ancestry, branch: str) -> float | None:
    """``p`` when the branch operand is a Mul (Div) of one tensor by (through) a scalar constant, else None."""
    node = a.node_of(branch)
    if node is None or node.op not in ("mul", "div") or len(node.inputs) != 1 or len(node.consts) != 1:
        return None
    c = node.consts[0][1]
    return c if node.op == "mul" else (1.0 / c if c else float("inf"))


# ------------------------------------------------------------------------------------------------- assembling
def _assemble(a: Ancestry, found: dict[int, _Found]) -> list[ShortPath]:
    order = sorted(found)
    index = {i: k for k, i in enumerate(order)}
    path_mask = 0
    for i in order:
        path_mask |= a.bit_of(i)
    out: list[ShortPath] = []
    for i in order:
        f, n = found[i], a.nodes[i]
        fork = a.fork_of(f.operands)
        convs = tuple(a.learned_in(a.path(fork, t)) for t in f.operands)
        problems = list(f.problems) + _shape_problems(f.kind, f.operands, fork, convs)
        fork_anc = a.anc.get(fork, 0)
        prior = fork_anc & path_mask
        if prior:
            top = prior.bit_length() - 1
            since = fork_anc & ~a.anc[a.nodes[top - a.n_in].outputs[0]]
            position, anchor = (index[top - a.n_in], a.learned_in(since)), a.nodes[top - a.n_in].name
        else:
            position, anchor = (-1, a.learned_in(fork_anc)), "input"
        s = a.graph.shapes.get(n.outputs[0])
        out.append(ShortPath(f.kind, n.name, n.outputs[0], f.operands, fork, tuple(s[1:]) if s is not None else None,
                             convs, position, n.scope, n.raw_op or n.op, f.shortcut, f.scale, tuple(problems), anchor))
    return out


def _shape_problems(kind: str, operands: Sequence[str], fork: str, convs: tuple[int, ...]) -> list[str]:
    """Problems of a short path that only its operands and fork reveal."""
    if kind == "concat" and fork not in operands:
        return ["no input of the Concat is an earlier tensor of another"]
    if kind == "gated_add":
        hc, tc, xc = convs
        out = [f"the carry operand is {xc} conv(s) past the fork; a Highway layer carries its input"] if xc else []
        return out + (["the transform H and the gate T each need a conv of their own"] if hc < 1 or tc < 1 else [])
    if kind == "mean_join" and len(operands) < 2:
        return ["a join of a single input"]
    return []


def _rank_ok(graph: DataGraph, tensor: str) -> bool:
    s = graph.shapes.get(tensor)
    return s is None or len(s) >= 3
