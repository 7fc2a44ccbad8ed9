"""The short-path check on the seed's other families (DenseNet concat, Highway gated add, stochastic depth's scaled
add, FractalNet's mean join, and the plain LeNet-5 / VGG): found as declared, passing after export, ORT
optimisation and INT8 Q/DQ, and each family's broken variants (built by graph surgery) caught at the right block."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from resdeploy.export import ExportConfig, check_short_paths, export_onnx, find_short_paths, trace_short_paths
from resdeploy.models import create_model

SMALL = {  # random-weight models on 1x28x28 digits, sized so the whole file runs in well under a minute
    "densenet40": {},
    "highway": {"blocks": (2, 2, 2)},
    "sd_resnet20": {},
    "fractalnet": {},
    "lenet5": {},
    "vgg9": {},
}
KIND = {"densenet40": "concat", "highway": "gated_add", "sd_resnet20": "scaled_add", "fractalnet": "mean_join"}


def _images(mnist, model, n=4):
    from resdeploy.models import normalize

    spec = model.input_spec
    return normalize(mnist.test.images[:n], spec.mean, spec.std)


@pytest.fixture(scope="module")
def family(mnist, tmp_path_factory):
    """name -> (model, onnx path, proto, images); exported once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = create_model(name, in_channels=1, image_size=28, **SMALL[name]).eval()
            x = _images(mnist, model)
            out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            report = export_onnx(model, out, input_shape=(1, 28, 28), sample=x, config=ExportConfig(parity_images=4))
            assert report, str(report)
            cache[name] = (model, out, onnx.load(str(out)), x)
        return cache[name]

    return get


def _check(proto, model, x):
    return check_short_paths(proto, model, x[:2])


def _first(report):
    assert not report, str(report)
    return report.defects[0]


# -------------------------------------------------------------------------------------------------- surgery
def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _producer(m, tensor):
    return next(n for n in m.graph.node if tensor in n.output)


def _rewire(m, old, new):
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new
    for o in m.graph.output:
        if o.name == old:
            o.name = new


def _remove(m, node):
    m.graph.node.remove(node)


def _paths(m, kind):
    return [p for p in find_short_paths(m) if p.kind == kind]


# ------------------------------------------------------------------------------------------ found and passing
@pytest.mark.parametrize("name", list(SMALL))
def test_family_found_as_declared_and_passes(family, name):
    model, path, proto, x = family(name)
    declared = model.short_paths()
    found = find_short_paths(proto)
    assert [p.kind for p in found] == [d.kind for d in declared]
    assert [p.inputs for p in found] == [d.inputs for d in declared]
    assert all(p.well_formed for p in found), [p.problems for p in found]
    report = check_short_paths(path, model, x[:2])
    assert report, str(report)
    assert [r.block for r in report.rows] == [d.path for d in declared]
    assert all(r.rel_err is not None and r.rel_err < 1e-4 for r in report.rows), str(report)
    alone = check_short_paths(proto)
    assert alone and len(alone.rows) == len(declared)
    if not declared:
        assert "no short paths" in " ".join(alone.notes)


def test_traced_reference_matches_declaration(family):
    model, _, _, x = family("fractalnet")
    traced = trace_short_paths(model, torch.from_numpy(x[:1]))
    assert not traced.declared_problems
    assert [(p.block, p.kind, p.inputs) for p in traced.paths] == [
        ("blocks.0.joins.row2", "mean_join", 2), ("blocks.0.joins.row4", "mean_join", 3),
        ("blocks.1.joins.row2", "mean_join", 2), ("blocks.1.joins.row4", "mean_join", 3)]
    # The 3-column join merges column 1 (one conv from the block input) with columns 2 and 3, which read the first
    # join (3 convs behind it: one of column 2, two of column 3) and add one and two convs of their own.
    assert sorted(traced.paths[1].operand_convs) == [1, 4, 5]


def test_stochastic_depth_scales_and_random_ops(family):
    model, _, proto, _ = family("sd_resnet20")
    paths = find_short_paths(proto)
    assert [round(p.scale, 4) for p in paths] == [round(b.survival, 4) for b in model.modules() if hasattr(b, "survival")]
    assert not any(n.op_type.startswith("Random") or n.op_type == "Bernoulli" for n in proto.graph.node)
    # Training drops blocks at random; eval is deterministic.
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))


def test_highway_gate_shape(family):
    _, _, proto, _ = family("highway")
    for p in find_short_paths(proto):
        h, t, carry = p.operand_convs
        assert (h, t, carry) == (1, 1, 0) and p.fork == p.operands[2]


def test_a_forward_that_forgets_its_concat_is_named(family):
    import types

    import torch.nn.functional as F

    model, _, _, x = family("densenet40")
    broken = copy.deepcopy(model)
    layer = broken.get_submodule("features.denseblock2.denselayer3")

    def forward(self, inp):
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(inp))))))
        return torch.cat([new, new, inp[:, :-self.conv2.out_channels]], 1)  # same shape, no short path from inp

    layer.forward = types.MethodType(forward, layer)
    traced = trace_short_paths(broken, torch.from_numpy(x[:1]))
    assert any("features.denseblock2.denselayer3" in p for p in traced.declared_problems) or \
        any(p.block == "features.denseblock2.denselayer3" for p in traced.paths)


# ------------------------------------------------------------------------------------------- broken variants
DENSE = "features.denseblock{}.denselayer{}"


def test_densenet_concat_losing_an_input(family):
    model, _, proto, x = family("densenet40")
    broken = copy.deepcopy(proto)
    cat = _node(broken, _paths(proto, "concat")[8].node)  # denseblock2.denselayer3
    del cat.input[0]  # the earlier tensor x is gone: only the new features remain
    d = _first(_check(broken, model, x))
    assert d.block == DENSE.format(2, 3), str(d)


def test_densenet_path_dropped(family):
    model, _, proto, x = family("densenet40")
    broken = copy.deepcopy(proto)
    p = _paths(proto, "concat")[3]  # denseblock1.denselayer4
    cat = _node(broken, p.node)
    new = next(t for t in cat.input if t != p.fork)
    _rewire(broken, cat.output[0], new)
    _remove(broken, cat)
    report = _check(broken, model, x)
    d = _first(report)
    assert d.block == DENSE.format(1, 4) and "no concat" in d.message, str(report)


def test_densenet_path_from_the_wrong_tensor(family):
    model, _, proto, x = family("densenet40")
    broken = copy.deepcopy(proto)
    paths = _paths(proto, "concat")
    cat = _node(broken, paths[14].node)  # denseblock3.denselayer3 concatenates denselayer1's input instead
    cat.input[list(cat.input).index(paths[14].fork)] = paths[13].fork
    report = _check(broken, model, x)
    d = _first(report)
    assert d.block == DENSE.format(3, 3) and "path taken from" in " ".join(
        e.message for e in report.defects if e.block == d.block), str(report)


def test_densenet_wrong_tensor_of_the_same_shape_is_caught_numerically(family):
    model, _, proto, x = family("densenet40")
    broken = copy.deepcopy(proto)
    p = _paths(proto, "concat")[7]  # denseblock2.denselayer2
    cat = _node(broken, p.node)
    new = next(t for t in cat.input if t != p.fork)
    conv2 = _producer(broken, new)
    relu = _producer(broken, _producer(broken, _producer(broken, conv2.input[0]).input[0]).input[0])
    # relu(norm1(x)) has x's shape and starts from x, with no conv between: only the numbers can tell.
    pre = _producer(broken, relu.output[0])
    while pre.op_type != "Relu":
        pre = _producer(broken, pre.input[0])
    cat.input[list(cat.input).index(p.fork)] = pre.output[0]
    report = _check(broken, model, x)
    assert not report and report.first_divergent == DENSE.format(2, 2), str(report)


def test_highway_gate_one_minus_t_replaced_by_t(family):
    model, _, proto, x = family("highway")
    broken = copy.deepcopy(proto)
    p = _paths(proto, "gated_add")[3]
    _, t, carry = p.operands
    for n in broken.graph.node:
        if n.op_type == "Mul" and carry in n.input:
            other = next(i for i in n.input if i != carry)
            if _producer(broken, other).op_type == "Sub":
                n.input[list(n.input).index(other)] = t
    report = _check(broken, model, x)
    d = _first(report)
    assert d.block == model.short_paths()[3].path and "1 - T" in d.message, str(report)
    assert not check_short_paths(broken)  # ill-formed on its own, without a reference


def test_highway_path_dropped(family):
    model, _, proto, x = family("highway")
    broken = copy.deepcopy(proto)
    p = _paths(proto, "gated_add")[1]
    add = _node(broken, p.node)
    ht = next(i for i in add.input if _producer(broken, i).op_type == "Mul" and p.operands[2] not in _producer(broken, i).input)
    _rewire(broken, add.output[0], ht)
    _remove(broken, add)
    report = _check(broken, model, x)
    assert _first(report).block == model.short_paths()[1].path, str(report)


def test_highway_carry_from_the_wrong_tensor(family):
    model, _, proto, x = family("highway")
    broken = copy.deepcopy(proto)
    paths = _paths(proto, "gated_add")
    carry, earlier = paths[3].operands[2], paths[2].operands[2]  # stage 1's second block carries the first's input
    for n in broken.graph.node:
        if n.op_type == "Mul" and carry in n.input and any(_producer(broken, i).op_type == "Sub" for i in n.input if i != carry):
            n.input[list(n.input).index(carry)] = earlier
    report = _check(broken, model, x)
    assert _first(report).block == model.short_paths()[3].path, str(report)


def test_stochastic_depth_path_dropped_wrong_tensor_and_scale(family):
    model, _, proto, x = family("sd_resnet20")
    blocks = [d.path for d in model.short_paths()]
    paths = _paths(proto, "scaled_add")
    # Dropped: block layer1.2 returns its scaled branch alone.
    broken = copy.deepcopy(proto)
    add = _node(broken, paths[2].node)
    _rewire(broken, add.output[0], paths[2].operands[0])
    _remove(broken, add)
    d = _first(_check(broken, model, x))
    assert d.block == blocks[2] and "no scaled_add" in d.message
    # From the wrong tensor: layer2.2's skip is layer2.1's input.
    broken = copy.deepcopy(proto)
    add = _node(broken, paths[5].node)
    add.input[list(add.input).index(paths[5].operands[1])] = paths[4].fork
    report = _check(broken, model, x)
    assert _first(report).block == blocks[5] and any("path taken from" in e.message for e in report.defects)
    # The survival probability changed to 1 (training-time semantics leaked into the graph).
    broken = copy.deepcopy(proto)
    mul = _producer(broken, paths[6].operands[0])
    inits = {t.name for t in broken.graph.initializer}
    const = next(i for i in mul.input if i in inits)

    one = onnx.helper.make_tensor("survival_one", onnx.TensorProto.FLOAT, [], [1.0])
    broken.graph.initializer.append(one)
    mul.input[list(mul.input).index(const)] = "survival_one"
    report = _check(broken, model, x)
    d = _first(report)
    assert d.block == blocks[6] and "scales the branch by 1" in d.message, str(report)


def test_fractalnet_join_losing_an_input_and_wrong_tensor(family):
    model, _, proto, x = family("fractalnet")
    blocks = [d.path for d in model.short_paths()]
    paths = _paths(proto, "mean_join")
    # The 3-input join of block 1 loses its deepest column: Div reads the inner sum of two.
    broken = copy.deepcopy(proto)
    div = _node(broken, paths[3].node)
    outer = _producer(broken, div.input[0])
    inner = next(i for i in outer.input if _producer(broken, i).op_type == "Add")
    div.input[0] = inner
    _remove(broken, outer)
    report = _check(broken, model, x)
    assert _first(report).block == blocks[3], str(report)
    # Block 0's 2-input join reads column 2's first conv instead of column 1's conv.
    broken = copy.deepcopy(proto)
    add = _producer(broken, _node(broken, paths[0].node).input[0])
    deep = next(t for t in paths[0].operands if len(_producer(broken, t).input) and t in add.input
                and _producer(broken, _producer(broken, t).input[0]).op_type != "Identity")
    col2_first = _producer(broken, _producer(broken, deep).input[0]).input[0]
    shallow = next(t for t in add.input if t != deep)
    add.input[list(add.input).index(shallow)] = col2_first
    report = _check(broken, model, x)
    assert _first(report).block == blocks[0], str(report)


def test_plain_net_with_an_extra_short_path(family):
    model, _, proto, x = family("vgg9")
    broken = copy.deepcopy(proto)
    convs = [n for n in broken.graph.node if n.op_type == "Conv"]
    # An Add of the first conv's output into the second conv's output (same shape): a skip VGG does not have.
    a, b = convs[0].output[0], convs[1].output[0]
    new = onnx.helper.make_node("Add", [b, a], ["extra_skip"], name="extra_skip")
    _rewire(broken, b, "extra_skip")
    new.input[0] = b
    nodes = list(broken.graph.node)
    nodes.insert(nodes.index(convs[1]) + 1, new)
    del broken.graph.node[:]
    broken.graph.node.extend(nodes)
    report = _check(broken, model, x)
    assert not report and report.defects[0].node == "extra_skip" and "extra" in report.defects[0].message, str(report)


# --------------------------------------------------------------------------- ORT optimiser and INT8 Q/DQ
def _ort_optimize(src, dst, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


@pytest.mark.parametrize("name", list(KIND))
@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_no_false_alarm_after_ort_optimizer(family, tmp_path, name, level):
    model, path, _, x = family(name)
    opt = _ort_optimize(path, tmp_path / "opt.onnx", level)
    report = _check(opt, model, x)
    assert report, str(report)
    assert [r.block for r in report.rows] == [d.path for d in model.short_paths()]


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
@pytest.mark.parametrize("name", list(KIND))
def test_no_false_alarm_after_int8_qdq(family, mnist, tmp_path, name, fmt):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from resdeploy.models import normalize

    model, path, _, x = family(name)
    calib = normalize(mnist.val.images[:16], model.input_spec.mean, model.input_spec.std)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 8]} for i in range(0, 16, 8)])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "q.onnx"
    # QDQ is what resdeploy writes; QOperator (QLinearConv, QLinearAdd, QLinearConcat...) is what other tools write.
    quantize_static(str(path), str(out), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    report = check_short_paths(out, model, x[:2])
    assert report and report.quantized, str(report)
    assert [r.block for r in report.rows] == [d.path for d in model.short_paths()]
