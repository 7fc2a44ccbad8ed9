"""Residual structure of a dataflow graph, the same rule for ONNX graphs and for torch.export/FX graphs.

Both sides are first reduced to a :class:`DataGraph`: nodes in topological order, each with a normalised op
class and the *data* tensors it reads (weights, constants and shape metadata are not data). Ops that do not
change values (Identity, Cast, Quantize/DequantizeLinear, Dropout, no-op Reshape/Transpose and
Reshape/Transpose pairs that undo each other) are seen through by the front-ends, so a Q/DQ-quantized or
optimizer-rewritten graph reduces to the same DataGraph as the float graph it came from.

The rule (documented here because the ONNX side and the torch side must agree on it):

* A **merge** is an elementwise binary node (Add; also Sub/Mul/Div/Max/Min, which are only ever defects when
  they sit where a residual add should be) whose two data operands are distinct feature maps (rank >= 3)
  of the same shape.
* Its **fork** is the latest (in topological order) tensor that is an ancestor of both operands, or one of
  the operands itself. For a residual block this is the block input; for the pre-activation net's
  projection blocks, whose shortcut conv reads ``relu(bn1(x))``, it is that tensor, which both paths reach.
* For each operand, its **path** is the set of nodes that are ancestors of the operand but not of the fork.
  The **shortcut** is the operand whose path has fewer convolutions (ties: fewer nodes; then the second
  operand); the other is the **branch**.
* The shortcut's **kind**: ``identity`` when the shortcut operand is the fork itself; ``option_a`` when its
  path has no learned op (subsample / pad / concat with zeros) or a single conv whose weight is a fixed 0/1
  selection (option A rewritten for engines); ``projection`` when its path holds exactly one learned conv
  (with whatever BN or per-channel affine ops remain); otherwise ``unknown`` (a defect).
* A merge is **well formed** when it is an Add, its kind is known, the branch holds at least one conv and
  more convs than the shortcut, and the branch holds no other merge (a skip that spans two blocks).
* The fork's **position** is (index of the latest merge among the fork's ancestors, or -1 for the graph
  input; number of convs between that merge and the fork). Two graphs of the same network give the same
  positions, whatever names their tensors have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

CONV = "conv"
MERGE_OPS = ("add", "sub", "mul", "div", "max", "min")
LEARNED = (CONV, "linear")


@dataclass
class DNode:
    """One node of a DataGraph."""

    name: str  # ONNX node name, or FX node name
    op: str  # normalised class: conv, linear, add, sub, mul, ..., slice, pad, relu, other
    inputs: list[str]  # data tensors read (already seen through no-op nodes)
    outputs: list[str]
    selection: bool = False  # a conv whose weight is a fixed 0/1 selection (an exact subsample/pad)
    scope: str = ""  # module path the front-end knows for this node ("" if none)
    raw_op: str = ""  # the op as written (ONNX op_type or aten target), for messages
    # Scalar constant operands of an elementwise op: (operand position, value). The residual rule ignores
    # them; the short-path rules read them (the 1 of a Highway gate's 1 - T, a stochastic-depth scale p, the
    # n of a mean join's division).
    consts: tuple[tuple[int, float], ...] = ()
    # A conv that only scales each channel (a depthwise 1x1 conv: ORT's NCHWc pass rewrites a per-channel Mul,
    # e.g. a BatchNorm before a conv, that way). The short-path rules do not count it as a learned conv.
    channel_scale: bool = False


@dataclass
class DataGraph:
    nodes: list[DNode]
    inputs: list[str]
    shapes: dict[str, tuple[object, ...] | None] = field(default_factory=dict)  # tensor -> shape (dims may be str)
    # tensors seen through -> (the data tensor they stand for, the op that made them), in topological order
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)

    def relu_fed(self) -> set[str]:
        """Tensors whose every consumer is a ReLU (so a fused kernel may write the ReLU'd value instead)."""
        consumers: dict[str, list[str]] = {}
        for n in self.nodes:
            for t in n.inputs:
                consumers.setdefault(t, []).append(n.op)
        return {t for t, ops in consumers.items() if ops and all(op == "relu" for op in ops)}

    def producer_index(self) -> dict[str, int]:
        idx = {t: -1 - i for i, t in enumerate(self.inputs)}
        for i, n in enumerate(self.nodes):
            for o in n.outputs:
                idx[o] = i
        return idx


@dataclass(frozen=True)
class Merge:
    """A merge node found in a DataGraph, with the facts the residual rule derives."""

    index: int  # node index in the DataGraph
    op: str
    operands: tuple[str, str]
    output: str
    fork: str
    shortcut: str
    branch: str
    kind: str  # identity | projection | option_a | unknown
    shape: tuple[object, ...] | None
    branch_convs: int
    shortcut_convs: int
    branch_merges: tuple[int, ...]  # merge indices (into the merge list) inside the branch path
    position: tuple[int, int]  # (merge list index the fork comes after, or -1; convs since then)
    problems: tuple[str, ...]

    @property
    def well_formed(self) -> bool:
        return not self.problems


def _same_shape(a: tuple[object, ...] | None, b: tuple[object, ...] | None) -> bool | None:
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return False
    # Unknown dims (None) match anything; named (dynamic) dims must carry the same name.
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def analyse(graph: DataGraph, exclude: frozenset[int] | set[int] = frozenset()) -> list[Merge]:
    """Find every merge and derive fork, shortcut, branch, kind and position per the module docstring.

    ``exclude``: node indices that belong to another kind of short path (a Highway gate's Muls and Add, a
    FractalNet join's Adds; see :mod:`resdeploy.export.shortpath`), which are not residual merges."""
    nodes = graph.nodes
    prod = graph.producer_index()
    n_in = len(graph.inputs)
    # Ancestor sets as Python int bitsets over (graph inputs + nodes): bit k for input k, bit n_in+i for node i.
    anc: dict[str, int] = {t: 1 << k for k, t in enumerate(graph.inputs)}
    for i, n in enumerate(nodes):
        bits = 1 << (n_in + i)
        for t in n.inputs:
            bits |= anc.get(t, 0)
        for o in n.outputs:
            anc[o] = bits
    conv_mask = 0
    learned_conv_mask = 0
    for i, n in enumerate(nodes):
        if n.op == CONV:
            conv_mask |= 1 << (n_in + i)
            if not n.selection:
                learned_conv_mask |= 1 << (n_in + i)

    candidates: list[tuple[int, DNode]] = []
    for i, n in enumerate(nodes):
        if n.op not in MERGE_OPS or len(n.inputs) != 2 or n.inputs[0] == n.inputs[1] or i in exclude:
            continue
        sa, sb = graph.shapes.get(n.inputs[0]), graph.shapes.get(n.inputs[1])
        if (sa is not None and len(sa) < 3) or (sb is not None and len(sb) < 3):
            continue
        if _same_shape(sa, sb) is False:
            continue
        if not (anc.get(n.inputs[0], 0) & anc.get(n.inputs[1], 0)):
            continue  # two unrelated inputs: not a skip
        candidates.append((i, n))
    merge_bit = {n_in + i: k for k, (i, _) in enumerate(candidates)}
    merge_mask = 0
    for b in merge_bit:
        merge_mask |= 1 << b

    def tensor_of(bit: int, a: str, b: str) -> str:
        if bit < n_in:
            return graph.inputs[bit]
        node = nodes[bit - n_in]
        for o in node.outputs:  # the output that feeds the operands (multi-output nodes are rare)
            if anc.get(a, 0) & anc.get(o, 0) and (anc.get(a, 0) | anc.get(o, 0)) == anc.get(a, 0):
                return o
        return node.outputs[0]

    merges: list[Merge] = []
    for k, (i, n) in enumerate(candidates):
        a, b = n.inputs
        common = anc[a] & anc[b]
        top = common.bit_length() - 1
        fork = tensor_of(top, a, b)
        fork_anc = anc.get(fork, 0)
        path = {t: anc[t] & ~fork_anc for t in (a, b)}
        # Selection convs (option A rewritten as a 0/1 conv) are exact data movement, not learned convs.
        convs = {t: bin(path[t] & learned_conv_mask).count("1") for t in (a, b)}
        size = {t: bin(path[t]).count("1") for t in (a, b)}
        shortcut = a if (convs[a], size[a]) < (convs[b], size[b]) else b
        branch = b if shortcut == a else a
        sp = path[shortcut]
        problems: list[str] = []
        if shortcut == fork:
            kind = "identity"
        elif not sp & learned_conv_mask and not _has_learned(sp, nodes, n_in):
            kind = "option_a"
        elif bin(sp & learned_conv_mask).count("1") == 1 and not _has(sp, nodes, n_in, {"relu", "add", *MERGE_OPS}):
            kind = "projection"
        else:
            kind = "unknown"
            problems.append(f"the shortcut path from the fork holds {bin(sp & conv_mask).count('1')} convs and "
                            f"{bin(sp).count('1')} ops; a shortcut is the fork itself, a parameter-free subsample/pad, "
                            "or one conv (+BN)")
        if n.op != "add":
            problems.append(f"the residual merge is a {n.raw_op or n.op}; expected an Add")
        bpath = path[branch]
        inner = tuple(sorted(merge_bit[j] for j in _bits(bpath & merge_mask)))
        if convs[branch] < 1:
            problems.append("the branch holds no conv: the Add adds a tensor to (a function of) itself")
        elif convs[branch] <= convs[shortcut]:
            problems.append(f"the branch holds {convs[branch]} convs, not more than the shortcut's {convs[shortcut]}")
        if inner:
            problems.append(f"the branch holds {len(inner)} other residual merge(s): the skip spans more than one block")
        # Position of the fork: the latest merge that is an ancestor of (or is) the fork's producer.
        prior = fork_anc & merge_mask
        if prior:
            top_merge = prior.bit_length() - 1
            since = fork_anc & ~anc[nodes[top_merge - n_in].outputs[0]]
            position = (merge_bit[top_merge], bin(since & learned_conv_mask).count("1"))
        else:
            position = (-1, bin(fork_anc & learned_conv_mask).count("1"))
        sa, sb = graph.shapes.get(a), graph.shapes.get(b)
        shape = sa if sa is not None else sb
        merges.append(Merge(i, n.op, (a, b), n.outputs[0], fork, shortcut, branch, kind,
                            tuple(shape[1:]) if shape is not None else None, convs[branch], convs[shortcut], inner,
                            position, tuple(problems)))
    return merges


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _has(mask: int, nodes: Sequence[DNode], n_in: int, ops: set[str]) -> bool:
    return any(b >= n_in and nodes[b - n_in].op in ops for b in _bits(mask))


def _has_learned(mask: int, nodes: Sequence[DNode], n_in: int) -> bool:
    return any(b >= n_in and nodes[b - n_in].op in LEARNED and not nodes[b - n_in].selection for b in _bits(mask))
