"""The dataflow graph every short-path rule reads: the same for ONNX graphs and torch.export graphs.

Both front-ends (:mod:`resdeploy.export.onnx_graph`, :mod:`resdeploy.export.torch_graph`) reduce their graph to a
:class:`DataGraph`: nodes in topological order, each with a normalised op class and the *data* tensors it reads
(weights, constants and shape metadata are not data). Ops that do not change values (Identity, Cast,
Quantize/DequantizeLinear, Dropout, no-op Reshape/Transpose and Reshape/Transpose pairs that undo each other) are
seen through, so a Q/DQ-quantized or optimizer-rewritten graph reduces to the same DataGraph as its float source.

:class:`Ancestry` answers the questions the rules ask of a DataGraph: which nodes lie on the path from a fork to a
tensor, how many learned ops that path holds, and which tensor is the latest common ancestor of several.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONV = "conv"
LEARNED = (CONV, "linear")
# Elementwise two-operand ops: Add is the residual merge; the others are only ever defects in its place.
MERGE_OPS = ("add", "sub", "mul", "div", "max", "min")
GLOBAL_POOL = "gpool"  # a reduction over spatial (or any) axes that keeps a broadcastable 1: SE's squeeze
POOL = "pool"  # a windowed average/max pool: ResNet-D's shortcut subsample
EXPAND = "expand"  # an op that restores the axes a reduction removed (Expand, Resize, Tile, upsample)


@dataclass
class DNode:
    """One node of a DataGraph."""

    name: str  # ONNX node name, or FX node name
    op: str  # normalised class: conv, linear, add, sub, mul, ..., slice, pad, relu, pool, gpool, expand, other
    inputs: list[str]  # data tensors read (already seen through no-op nodes)
    outputs: list[str]
    selection: bool = False  # a conv whose weight is a fixed 0/1 selection (an exact subsample/pad)
    scope: str = ""  # module path the front-end knows for this node ("" if none)
    raw_op: str = ""  # the op as written (ONNX op_type or aten target), for messages
    # Scalar constant operands of an elementwise op: (operand position, value). The rules read them: the 1 of a
    # Highway gate's 1 - T, a stochastic-depth scale p, the n of a mean join's division.
    consts: tuple[tuple[int, float], ...] = ()
    # A conv that only scales each channel (a depthwise 1x1 conv: ORT's NCHWc pass rewrites a per-channel Mul,
    # e.g. a BatchNorm before a conv, that way). Not a learned conv for the rules.
    channel_scale: bool = False


@dataclass
class DataGraph:
    nodes: list[DNode]
    inputs: list[str]
    shapes: dict[str, tuple[object, ...] | None] = field(default_factory=dict)  # tensor -> shape (dims may be str)
    # tensors seen through -> (the data tensor they stand for, the op that made them), in topological order
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)
    # tensors whose values cannot be compared with the reference's: fused away, or in a blocked memory layout
    opaque: set[str] = field(default_factory=set)

    def relu_fed(self) -> set[str]:
        """Tensors whose every consumer is a ReLU (so a fused kernel may write the ReLU'd value instead)."""
        consumers: dict[str, list[str]] = {}
        for n in self.nodes:
            for t in n.inputs:
                consumers.setdefault(t, []).append(n.op)
        return {t for t, ops in consumers.items() if ops and all(op == "relu" for op in ops)}

    def readable_as(self, tensor: str) -> list[str]:
        """``tensor`` and the aliases that stand for it (a DequantizeLinear after it, a getitem of it), in order:
        the names under which a runtime can hand its value back."""
        return [tensor, *(t for t, (canonical, _) in self.aliases.items() if canonical == tensor)]


def same_shape(a: tuple[object, ...] | None, b: tuple[object, ...] | None) -> bool | None:
    """Whether two shapes agree: None when either is unknown. Unknown dims (None) match anything; named (dynamic)
    dims must carry the same name."""
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def bits(mask: int) -> list[int]:
    """The set bit positions of ``mask``, lowest first."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class Ancestry:
    """Ancestor sets of every tensor of a DataGraph as Python-int bitsets over (graph inputs + nodes): bit k is
    input k, bit ``n_in + i`` is node i. Built once per graph; every query is a few integer operations."""

    def __init__(self, graph: DataGraph) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.n_in = len(graph.inputs)
        self.anc: dict[str, int] = {t: 1 << k for k, t in enumerate(graph.inputs)}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.learned = 0  # learned ops: convs and linears that are neither a 0/1 selection nor a channel scale
        for i, n in enumerate(self.nodes):
            b = 1 << (self.n_in + i)
            for t in n.inputs:
                b |= self.anc.get(t, 0)
                self.consumers.setdefault(t, []).append(i)
            for o in n.outputs:
                self.anc[o] = b
                self.producer[o] = i
            if n.op in LEARNED and not n.selection and not n.channel_scale:
                self.learned |= 1 << (self.n_in + i)
        self.reduced = self._reduced()

    def node_of(self, tensor: str) -> DNode | None:
        """The node that makes ``tensor`` (None for a graph input)."""
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def bit_of(self, node_index: int) -> int:
        return 1 << (self.n_in + node_index)

    def node_at(self, bit: int) -> DNode | None:
        return self.nodes[bit - self.n_in] if bit >= self.n_in else None

    def fork_of(self, operands: Sequence[str]) -> str:
        """The latest tensor every operand starts from (one of the operands when it feeds the others); "" if none."""
        common = -1
        for t in operands:
            common &= self.anc.get(t, 0)
        if common <= 0:
            return ""
        top = common.bit_length() - 1
        if top < self.n_in:
            return self.graph.inputs[top]
        outs = self.nodes[top - self.n_in].outputs
        return next((o for o in outs if o in operands), outs[0])

    def path(self, fork: str, tensor: str) -> int:
        """The nodes that are ancestors of ``tensor`` but not of ``fork`` (the path from the fork)."""
        return self.anc.get(tensor, 0) & ~self.anc.get(fork, 0)

    def learned_in(self, mask: int) -> int:
        return bin(mask & self.learned).count("1")

    def ops_in(self, mask: int) -> list[DNode]:
        return [self.nodes[b - self.n_in] for b in bits(mask) if b >= self.n_in]

    def has_op(self, mask: int, ops: Iterable[str]) -> bool:
        wanted = set(ops)
        return any(n.op in wanted for n in self.ops_in(mask))

    def _reduced(self) -> set[str]:
        """Tensors that broadcast: made by a reduction (global pool, mean) and nothing since that restores the
        reduced axes. A merge with such an operand is a gate or a bias (squeeze-excitation), never a short path."""
        out: set[str] = set()
        for n in self.nodes:
            if n.op == GLOBAL_POOL or (n.op != EXPAND and n.inputs and all(t in out for t in n.inputs)):
                out.update(n.outputs)
        return out
