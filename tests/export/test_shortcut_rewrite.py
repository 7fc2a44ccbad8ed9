"""The option-A shortcut rewrite (export stage) touches only the channel-padding Pads it can make exact 1x1 convs of
(its effect on the ONNX Runtime fusions is in tests/engines/test_onnxruntime_build.py)."""

from __future__ import annotations

import numpy as np
import onnx

from resdeploy.export.shortcut_rewrite import rewrite_option_a


def test_option_a_rewrite_leaves_other_pads_alone():
    from onnx import helper, numpy_helper

    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    g = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], name="spatial_pad")], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 6, 6])], [pads])
    out, rep = rewrite_option_a(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert rep.rewritten == () and "spatial_pad" in rep.skipped[0] and "other than channels" in rep.skipped[0]
    assert [n.op_type for n in out.graph.node] == ["Pad"]
