"""Every graph-reading command refuses a graph that is not a DAG: cycles, dangling inputs, doubly produced tensors.

The graphs are small residual blocks built with onnx.helper, so the valid one passes `resdeploy check` and each
corruption is one edit away from it: the refusal is caused by the corruption, not by anything else.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resdeploy.errors import InputError
from resdeploy.export import find_residual_adds
from resdeploy.export.onnx_graph import topo_nodes, validate_graph
from resdeploy.pipeline.cli import main


def residual_block(edit=None) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(., x) -> Relu: one well-formed identity residual block."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu2"),
    ]
    if edit:
        edit(nodes)
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cycle(nodes):  # conv1 reads the block's own output: conv1 -> ... -> relu2 -> conv1
    nodes[0].input[0] = "y"


def _dangling(nodes):  # conv2 reads a tensor nothing produces
    nodes[2].input[0] = "r1_typo"


def _twice(nodes):  # two producers for one tensor
    nodes[1].output[0] = "c1"


def _self_loop(nodes):  # a node that reads its own output
    nodes[1].input[0] = "r1"


CORRUPTIONS = [("cycle", _cycle, "a cycle through"), ("dangling input", _dangling, "reads tensor 'r1_typo'.*dangling"),
               ("produced twice", _twice, "tensor 'c1' is produced by both"), ("self loop", _self_loop, "a cycle through")]


def test_the_valid_block_passes(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(residual_block(), str(path))
    validate_graph(residual_block().graph)
    assert [a.node for a in find_residual_adds(residual_block())] == ["add"]
    assert main(["check", str(path)]) == 0


@pytest.mark.parametrize("what,edit,match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_graph_readers_refuse_invalid_graphs(tmp_path, capsys, what, edit, match):
    model = residual_block(edit)
    with pytest.raises(InputError, match=match):
        topo_nodes(model.graph)
    with pytest.raises(InputError, match=match):
        find_residual_adds(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    assert main(["check", str(path)]) in (1, 2)
    err = capsys.readouterr().err
    assert "invalid ONNX graph" in err and "re-export" in err


def test_unsorted_but_valid_graph_is_sorted_not_refused():
    model = residual_block(lambda nodes: nodes.reverse())
    assert [n.name for n in topo_nodes(model.graph)] == ["conv1", "relu1", "conv2", "add", "relu2"]
