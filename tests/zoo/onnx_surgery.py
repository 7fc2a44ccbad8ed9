"""Graph surgery on exported ONNX files: each edit breaks one short path of one block, the way a faulty graph
optimiser or a hand edit would, and leaves a valid graph ONNX Runtime can run (where the edit allows).

Blocks are found by the module scope the dynamo exporter records on each node (``pkg.torch.onnx.name_scopes``),
and operands by counting convs behind them: independently of the check under test.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Sequence

import onnx
from onnx import helper, numpy_helper

import numpy as np

MERGES = ("Add", "Concat")


class Blocks:
    """Index of an ONNX graph by module scope."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.producer = {o: n for n in g.node for o in n.output}
        self.order = {id(n): k for k, n in enumerate(g.node)}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {vi.name: tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                      for d in vi.type.tensor_type.shape.dim)
                       for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}

    @staticmethod
    def scope(node: onnx.NodeProto) -> str:
        for p in node.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                scopes = ast.literal_eval(p.value)
                return str(scopes[-2]) if len(scopes) >= 2 else ""
        return ""

    def data(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.consts]

    def merge(self, block: str) -> onnx.NodeProto:
        """The block's short-path node: its last Add/Concat of two or more data tensors, in the block's own scope."""
        found = [n for n in self.model.graph.node if n.op_type in MERGES and self.scope(n) == block
                 and len(self.data(n)) >= 2]
        if not found:
            raise LookupError(f"no Add/Concat of two data tensors in block {block}")
        return found[-1]

    def within(self, tensor: str, scope: str) -> bool:
        node = self.producer.get(tensor)
        return node is not None and (self.scope(node) == scope or self.scope(node).startswith(scope + "."))

    def ancestors(self, tensor: str, scope: str) -> list[str]:
        """Tensors made inside ``scope`` that ``tensor`` is computed from (itself included), in graph order."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t in seen or not self.within(t, scope):
                continue
            seen.add(t)
            stack.extend(self.data(self.producer[t]))
        return sorted(seen, key=lambda t: self.order[id(self.producer[t])])

    def convs_behind(self, tensor: str, scope: str) -> int:
        return sum(self.producer[t].op_type == "Conv" for t in self.ancestors(tensor, scope))

    def operands(self, block: str) -> tuple[str, str]:
        """(branch, shortcut) of the block's Add: the shortcut has fewer convs inside the block behind it."""
        a, b = self.data(self.merge(block))
        return (a, b) if self.convs_behind(a, block) > self.convs_behind(b, block) else (b, a)

    def block_input(self, block: str) -> str:
        """The first tensor a node of the block reads that is made outside the block (or is a graph input)."""
        for n in self.model.graph.node:
            if self.scope(n) == block or self.scope(n).startswith(block + "."):
                for t in self.data(n):
                    if not self.within(t, block):
                        return t
        raise LookupError(f"block {block} reads no tensor from outside itself")


def _copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Blocks]:
    m = copy.deepcopy(model)
    return m, Blocks(m)


def _set_input(node: onnx.NodeProto, old: str, new: str) -> None:
    node.input[list(node.input).index(old)] = new


def _insert_before(m: onnx.ModelProto, anchor: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> None:
    nodes = list(m.graph.node)
    at = next(k for k, n in enumerate(nodes) if n is anchor or n == anchor)
    nodes[at:at] = list(new)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def _skip_operand(b: Blocks, block: str) -> str:
    """The operand the surgeries move: an Add's shortcut, a Concat's earliest input (the tensor it carries over)."""
    merge = b.merge(block)
    return b.operands(block)[1] if merge.op_type == "Add" else b.data(merge)[0]


def removed(model: onnx.ModelProto, block: str) -> onnx.ModelProto:
    """An Add replaced by its branch alone; a Concat that lost the tensor it carries over."""
    m, b = _copy(model)
    merge = b.merge(block)
    if merge.op_type == "Concat":
        del merge.input[list(merge.input).index(_skip_operand(b, block))]
        return m
    branch, _ = b.operands(block)
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == merge.output[0]:
                n.input[k] = branch
    for o in m.graph.output:
        if o.name == merge.output[0]:
            raise LookupError(f"block {block}'s Add makes the graph output")
    m.graph.node.remove(merge)
    return m


def rewired(model: onnx.ModelProto, block: str, earlier: Sequence[str]) -> onnx.ModelProto:
    """The skip reads another block's tensor of the same shape: the nearest of ``earlier`` whose input (its fork),
    else whose skip operand, fits. A Concat's second input (a layer's new features) is replaced by its third
    (another layer's, of the same shape)."""
    m, b = _copy(model)
    merge = b.merge(block)
    if merge.op_type == "Concat":
        first, second = b.data(merge)[1:3]
        if b.shapes.get(first) != b.shapes.get(second):
            raise LookupError(f"block {block}'s Concat inputs 1 and 2 differ in shape")
        _set_input(merge, first, second)
        return m
    _, shortcut = b.operands(block)
    for candidates in ([b.block_input(o) for o in reversed(earlier)], [b.operands(o)[1] for o in reversed(earlier)]):
        for t in candidates:
            if t != shortcut and b.shapes.get(t) == b.shapes.get(shortcut):
                _set_input(merge, shortcut, t)
                return m
    raise LookupError(f"no earlier block's input or skip has the shape of block {block}'s skip")


def inside_branch(model: onnx.ModelProto, block: str) -> onnx.ModelProto:
    """The skip reads the earliest tensor inside the branch that has its shape (a pre-activation net: relu(bn(x))
    instead of x). For a Concat, inside the path from the carried tensor to the next input."""
    m, b = _copy(model)
    merge = b.merge(block)
    skip = _skip_operand(b, block)
    if merge.op_type == "Concat":
        source, scope = b.data(merge)[1], block.rsplit(".", 1)[0]
    else:
        source, scope = b.operands(block)[0], block
    for t in b.ancestors(source, scope):
        if t not in (source, skip) and b.shapes.get(t) == b.shapes.get(skip):
            _set_input(merge, skip, t)
            return m
    raise LookupError(f"no tensor inside block {block}'s branch has the skip's shape")


def scaled_to_zero(model: onnx.ModelProto, block: str) -> onnx.ModelProto:
    """The skip multiplied by 0 before the merge."""
    m, b = _copy(model)
    merge = b.merge(block)
    skip = _skip_operand(b, block)
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "surgery_zero"))
    mul = helper.make_node("Mul", [skip, "surgery_zero"], ["surgery_zeroed"], name="surgery_zero_skip")
    _set_input(merge, skip, "surgery_zeroed")
    _insert_before(m, merge, [mul])
    return m


def add_to_sub(model: onnx.ModelProto, block: str) -> onnx.ModelProto:
    m, b = _copy(model)
    b.merge(block).op_type = "Sub"
    return m


def swapped(model: onnx.ModelProto, block: str) -> onnx.ModelProto:
    """The Add's operands in the other order: the same sum, so the check must pass."""
    m, b = _copy(model)
    merge = b.merge(block)
    ops = list(merge.input)
    del merge.input[:]
    merge.input.extend(reversed(ops))
    return m


def target_block(blocks: Sequence[str], model: onnx.ModelProto) -> tuple[str, list[str]]:
    """The block the surgeries break: from the middle of ``blocks`` on, the first whose skip can be rewired to an
    earlier block's tensor of the same shape; and the blocks before it."""
    for k in range(len(blocks) // 2, len(blocks)):
        try:
            rewired(model, blocks[k], blocks[:k])
        except LookupError:
            continue
        return blocks[k], list(blocks[:k])
    raise LookupError("no block whose skip can be rewired to an earlier block's input")


def apply(name: str, model: onnx.ModelProto, block: str, earlier: Sequence[str]) -> onnx.ModelProto:
    """Surgery ``name`` (one of tests.zoo.networks.SURGERIES) on ``block``."""
    if name == "rewired":
        return rewired(model, block, earlier)
    return {"removed": removed, "inside_branch": inside_branch, "scaled_to_zero": scaled_to_zero,
            "add_to_sub": add_to_sub, "swapped": swapped}[name](model, block)
