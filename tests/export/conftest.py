"""Fixtures for the export tests: ONNX graph surgery that builds each skip-add defect from a correct graph (the
trained resnet20's export and held-out images, r20_onnx and r20_images, are in tests/conftest.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


def _adds(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "Add" and not any(i in {t.name for t in m.graph.initializer} for i in n.input)]


def _producer(m: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if tensor in n.output)


def _rewire(m: onnx.ModelProto, old: str, new: str) -> None:
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


def _branch_and_shortcut(m: onnx.ModelProto, add: onnx.NodeProto) -> tuple[str, str]:
    """(branch operand, shortcut operand) of a residual Add: the branch comes out of a Conv."""
    a, b = add.input
    return (a, b) if _producer(m, a).op_type == "Conv" else (b, a)


def _fork(m: onnx.ModelProto, k: int) -> str:
    """Block k's input: the tensor its first conv reads (walk back two convs from the branch operand)."""
    add = _adds(m)[k]
    branch, _ = _branch_and_shortcut(m, add)
    node = _producer(m, branch)  # conv2
    relu = _producer(m, node.input[0])
    conv1 = _producer(m, relu.input[0])
    return conv1.input[0]


def remove_skip(m: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """The Add of block k replaced by its branch alone."""
    m = copy.deepcopy(m)
    add = _adds(m)[k]
    branch, _ = _branch_and_shortcut(m, add)
    _rewire(m, add.output[0], branch)
    m.graph.node.remove(add)
    return m


def set_shortcut(m: onnx.ModelProto, k: int, tensor: str) -> onnx.ModelProto:
    """Block k's Add takes ``tensor`` as its skip operand."""
    m = copy.deepcopy(m)
    add = _adds(m)[k]
    _, shortcut = _branch_and_shortcut(m, add)
    idx = list(add.input).index(shortcut)
    add.input[idx] = tensor
    return m


def change_op(m: onnx.ModelProto, k: int, op: str) -> onnx.ModelProto:
    m = copy.deepcopy(m)
    _adds(m)[k].op_type = op
    return m


def extra_add(m: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Inside block k's branch, add the block input to conv1's output: a residual Add the model does not have."""
    m = copy.deepcopy(m)
    fork = _fork(m, k)
    add = _adds(m)[k]
    branch, _ = _branch_and_shortcut(m, add)
    relu = _producer(m, _producer(m, branch).input[0])
    conv1_out = relu.input[0]
    new = helper.make_node("Add", [conv1_out, fork], ["extra_add_out"], name="extra_add")
    relu.input[0] = "extra_add_out"
    nodes = list(m.graph.node)
    nodes.insert(nodes.index(relu), new)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def bypass_two(m: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Block k-1 loses its Add; block k's skip comes from block k-1's input (it spans two blocks)."""
    prev_input = _fork(m, k - 1)
    return set_shortcut(remove_skip(m, k - 1), k - 1, prev_input)


def option_a_as_conv(m: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every option-A shortcut (Slice, Slice, Pad) as one exact strided 1x1 Conv with a 0/1 weight."""
    m = copy.deepcopy(m)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in
              onnx.shape_inference.infer_shapes(m).graph.value_info}
    for pad in [n for n in m.graph.node if n.op_type == "Pad"]:
        s2 = _producer(m, pad.input[0])
        s1 = _producer(m, s2.input[0])
        src = s1.input[0]
        cin, cout = shapes[src][1], shapes[pad.output[0]][1]
        front = (cout - cin) // 2
        w = np.zeros((cout, cin, 1, 1), np.float32)
        for c in range(cin):
            w[front + c, c] = 1.0
        wname = f"{pad.name}_select"
        m.graph.initializer.append(numpy_helper.from_array(w, wname))
        conv = helper.make_node("Conv", [src, wname], [pad.output[0]], name=f"{pad.name}_as_conv", strides=[2, 2],
                                kernel_shape=[1, 1])
        nodes = list(m.graph.node)
        at = nodes.index(s1)
        for n in (s1, s2, pad):
            nodes.remove(n)
        nodes.insert(at, conv)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    return m


@pytest.fixture(scope="session")
def surgery() -> SimpleNamespace:
    return SimpleNamespace(adds=_adds, remove_skip=remove_skip, set_shortcut=set_shortcut, change_op=change_op,
                           extra_add=extra_add, bypass_two=bypass_two, fork=_fork, producer=_producer,
                           branch_and_shortcut=_branch_and_shortcut, option_a_as_conv=option_a_as_conv)
