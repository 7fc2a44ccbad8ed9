"""ONNX front-end of the short-path engine: reduce a ModelProto to a :class:`~resdeploy.export.graph.DataGraph`.

Seen through (a node whose output is treated as its data input): Identity, Cast, CastLike, Dropout,
QuantizeLinear, DequantizeLinear, a Reshape or Transpose that changes nothing, and a Reshape/Transpose that
undoes the Reshape/Transpose before it. Weights, constants and shape metadata (Shape/Size and anything
computed only from constants) are not data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from resdeploy.export.graph import DataGraph, DNode

SEE_THROUGH = {"Identity", "Cast", "CastLike", "Dropout", "QuantizeLinear", "DequantizeLinear",
               "ReorderInput", "ReorderOutput"}  # the last two: ORT's NCHWc layout changes (ORT_ENABLE_ALL)
# Synthetic tensors for an Add fused into a conv (ORT FusedConv "Z" / NCHWc Conv "Sum" input) carry this mark;
# they do not exist in the file, so they are never exposed as outputs.
FUSED_MARK = "#fused"
CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "NhwcFusedConv"}
OP_CLASS = {
    "Add": "add", "Sum": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "max", "Min": "min",
    "Slice": "slice", "Pad": "pad", "Concat": "concat", "Relu": "relu", "BatchNormalization": "bn",
    "QLinearAdd": "add", "QLinearMul": "mul", "QLinearConcat": "concat",  # QOperator-format graphs (com.microsoft)
    "Gemm": "linear", "MatMul": "linear", "MatMulInteger": "linear", "QLinearMatMul": "linear",
    "AveragePool": "pool", "MaxPool": "pool", "LpPool": "pool", "QLinearAveragePool": "pool",
    "GlobalAveragePool": "gpool", "GlobalMaxPool": "gpool", "GlobalLpPool": "gpool", "QLinearGlobalAveragePool": "gpool",
    "ReduceMean": "gpool", "ReduceMax": "gpool", "ReduceMin": "gpool", "ReduceSum": "gpool", "ReduceL1": "gpool",
    "ReduceL2": "gpool", "ReduceProd": "gpool", "ReduceSumSquare": "gpool", "ReduceLogSumExp": "gpool",
    "Expand": "expand", "Resize": "expand", "Upsample": "expand", "Tile": "expand",
}
BLOCKED_LAYOUT_DOMAIN = "com.microsoft.nchwc"  # ORT's NCHWc ops: their outputs are not in NCHW order
METADATA_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "Range", "EyeLike"}
SCALAR_OPERAND_OPS = {"Add", "Sub", "Mul", "Div"}  # elementwise ops whose scalar constants the short-path rules read


def _dims(vi: onnx.ValueInfoProto) -> tuple[object, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[object] = []
    for d in t.shape.dim:
        # onnx names the dims it cannot infer "unk__N": those are unknown, not a named dynamic axis.
        param = d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None
        out.append(d.dim_value if d.HasField("dim_value") else param)
    return tuple(out)


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[object, ...] | None]:
    """Tensor shapes from (non-strict) shape inference; tensors it cannot type are left out."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - custom-domain ops (ORT's FusedConv) may stop inference; use what the file has
        inferred = model
    g = inferred.graph
    shapes: dict[str, tuple[object, ...] | None] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        s = _dims(vi)
        if s is not None:
            shapes[vi.name] = s
    return shapes


def _node_label(n: onnx.NodeProto) -> str:
    return f"{n.op_type} node {n.name!r}" if n.name else f"unnamed {n.op_type} node (outputs {list(n.output)})"


def validate_graph(graph: onnx.GraphProto) -> None:
    """Refuse a graph that is not a DAG over its inputs: a tensor produced twice, a node input nothing produces
    (dangling), a cycle, or a graph output nothing produces. Raises InputError naming the node and tensor.

    Analysing such a graph would report on a network that cannot run: a cycle fed the residual check nodes in
    file order and it passed. ONNX Runtime refuses these graphs too, but only when something runs them.
    """
    from resdeploy.errors import InputError

    fix = "re-export the model (`resdeploy export`); the file is corrupt or was edited by hand"
    sources = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer: dict[str, onnx.NodeProto] = {}
    for n in graph.node:
        for o in n.output:
            if not o:
                continue
            if o in producer or o in sources - {""}:
                first = _node_label(producer[o]) if o in producer else "a graph input or initializer"
                raise InputError(f"invalid ONNX graph: tensor {o!r} is produced by both {first} and {_node_label(n)}; "
                                 f"every tensor must have one producer. {fix}")
            producer[o] = n
    for n in graph.node:
        for i in n.input:
            if i not in sources and i not in producer:
                raise InputError(f"invalid ONNX graph: {_node_label(n)} reads tensor {i!r}, which no node, graph input "
                                 f"or initializer produces (a dangling input). {fix}")
    for o in graph.output:
        if o.name not in sources and o.name not in producer:
            raise InputError(f"invalid ONNX graph: graph output {o.name!r} is produced by no node. {fix}")
    # Every input has a producer, so nodes left over by Kahn's algorithm lie on (or after) a cycle.
    order = _kahn(graph.node, sources)
    if len(order) != len(graph.node):
        done = {id(n) for n in order}
        stuck = [n for n in graph.node if id(n) not in done]
        raise InputError(f"invalid ONNX graph: a cycle through {', '.join(_node_label(n) for n in stuck[:4])}"
                         f"{f' and {len(stuck) - 4} more' if len(stuck) > 4 else ''}; an ONNX graph must be acyclic. {fix}")


def _kahn(nodes: "list[onnx.NodeProto] | Any", sources: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order, file order among the ready ones; nodes on a cycle are left out."""
    producer_of = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer_of[i] for i in n.input if i not in sources and i in producer_of}
        waiting[k] = len(deps)
        for d in deps:
            consumers.setdefault(d, []).append(k)
    import heapq

    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for c in consumers.get(k, ()):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    return out


def topo_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in a topological order (file order where the file is already sorted).

    Raises InputError for a graph that has none (a cycle, a dangling input): see :func:`validate_graph`.
    """
    validate_graph(graph)
    return _kahn(graph.node, {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""})


def _const_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    vals = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    vals[n.output[0]] = a.t
    return vals


def _array(t: onnx.TensorProto) -> np.ndarray | None:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None  # never follow external data here: shape/0-1 tests do not need it
    try:
        return numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - unusual dtypes: treat as unknown
        return None


def _weight(name: str, consts: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of a conv weight: an initializer, or a DequantizeLinear of one."""
    if name in consts:
        return _array(consts[name])
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in consts:
        q = _array(consts[node.input[0]])
        scale = _array(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] in consts else None
        zp = _array(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in consts else None
        if q is None or scale is None:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = scale.size
        zp_arr = 0 if zp is None else zp.astype(np.float32).reshape(shape if zp.size > 1 else [1] * q.ndim)
        return (q.astype(np.float32) - zp_arr) * scale.astype(np.float32).reshape(shape if scale.size > 1 else [1] * q.ndim)
    return None


def _scalar(name: str, consts: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> float | None:
    """The value of a one-element constant (an initializer, a Constant, or a DequantizeLinear of one), else None."""
    v = _weight(name, consts, producers)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _is_channel_scale(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto],
                      producers: dict[str, onnx.NodeProto]) -> bool:
    """A depthwise 1x1 conv (weight C x 1 x 1 x 1, group C): a per-channel multiply, not a learned conv."""
    if len(node.input) < 2:
        return False
    w = _weight(node.input[1], consts, producers)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return w is not None and w.ndim == 4 and w.shape[1:] == (1, 1, 1) and group == w.shape[0] > 1


def is_selection_conv(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto],
                      producers: dict[str, onnx.NodeProto]) -> bool:
    """A 1x1 Conv whose weight is 0/1 with at most one 1 per output channel and no bias: an exact subsample/pad."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    w = _weight(node.input[1], consts, producers)
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1):
        return False
    # At least one 1: an all-zero weight (a zero-initialised last conv of an untrained block) is a conv, not a move.
    if not np.all((w == 0) | (w == 1)) or np.any(w.reshape(w.shape[0], -1).sum(axis=1) > 1) or not w.any():
        return False
    if len(node.input) > 2 and node.input[2]:
        b = _weight(node.input[2], consts, producers)
        if b is None or np.any(b != 0):
            return False
    return True


def _namespace(node: onnx.NodeProto) -> str:
    """The module path the dynamo exporter recorded for a node (``pkg.torch.onnx.name_scopes``), if any."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                scopes = ast.literal_eval(p.value)
                return str(scopes[-2]) if len(scopes) >= 2 else ""
            except (ValueError, SyntaxError):
                return ""
    return ""


def to_datagraph(model: onnx.ModelProto) -> tuple[DataGraph, dict[str, onnx.NodeProto]]:
    """Reduce ``model`` to a DataGraph; also return ONNX nodes by DataGraph node name."""
    g = model.graph
    consts = _const_values(model)
    shapes = shapes_of(model)
    nodes = topo_nodes(g)
    producers = {o: n for n in nodes for o in n.output}
    const_like = set(consts) | {""}
    alias: dict[str, str] = {}

    def resolve(t: str) -> str:
        while t in alias:
            t = alias[t]
        return t

    def static(t: str) -> tuple[object, ...] | None:
        s = shapes.get(t)
        return s if s is not None and all(isinstance(d, int) for d in s) else None

    dnodes: list[DNode] = []
    by_name: dict[str, onnx.NodeProto] = {}
    opaque: set[str] = set()
    for i, n in enumerate(nodes):
        if n.domain == BLOCKED_LAYOUT_DOMAIN:
            opaque.update(n.output)
        data_in = [x for x in n.input if x not in const_like]
        if n.op_type in METADATA_OPS or not data_in:
            const_like.update(n.output)
            continue
        seen = _seen_through(n, const_like, producers, static)
        if seen is not None:
            alias[n.output[0]] = resolve(seen)
            continue
        name = n.name or f"{n.op_type}_{i}"
        is_conv = n.op_type in CONV_OPS or (n.domain == "com.microsoft.nchwc" and n.op_type == "Conv")
        if is_conv and n.op_type in ("Conv", "FusedConv") and len(n.input) > 3 and n.input[3] \
                and n.input[3] not in const_like:
            dnodes += _split_fused_conv(n, name, resolve(n.input[0]), resolve(n.input[3]),
                                        is_selection_conv(n, consts, producers))
            by_name[name] = n
            continue
        op = "conv" if is_conv else OP_CLASS.get(n.op_type, "other")
        channel_scale = is_conv and _is_channel_scale(n, consts, producers)
        ins = [resolve(x) for x in data_in]
        if n.op_type in ("QLinearConv", "QLinearMatMul"):
            ins = [resolve(n.input[0])]
        if n.op_type == "Sum" and len(ins) != 2:
            op = "other"
        scalars: tuple[tuple[int, float], ...] = ()
        if n.op_type in SCALAR_OPERAND_OPS:
            scalars = tuple((k, v) for k, x in enumerate(n.input[:2]) if x in const_like
                            and (v := _scalar(x, consts, producers)) is not None)
        dnodes.append(DNode(name, op, ins, [o for o in n.output if o], is_selection_conv(n, consts, producers),
                            _namespace(n), n.op_type, scalars, channel_scale))
        by_name[name] = n
    inputs = [i.name for i in g.input if i.name not in consts]
    kinds = {n.output[0]: n.op_type for n in nodes if n.output}
    aliases = {t: (resolve(t), kinds.get(t, "")) for t in alias}
    opaque.update(o for n in dnodes for o in n.outputs if FUSED_MARK in o)
    return DataGraph(dnodes, inputs, shapes, aliases, opaque), by_name


def _seen_through(n: onnx.NodeProto, const_like: set[str], producers: dict[str, onnx.NodeProto],
                  static: Any) -> str | None:
    """The tensor ``n``'s output stands for when ``n`` changes no value (see the module docstring), else None."""
    if not n.input or n.input[0] in const_like:
        return None
    if n.op_type in SEE_THROUGH:
        return n.input[0]
    if n.op_type not in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"):
        return None
    out_shape = static(n.output[0])
    if out_shape is not None and out_shape == static(n.input[0]) and _keeps_order(n):
        return n.input[0]
    before = producers.get(n.input[0])
    if before is not None and before.op_type == n.op_type and before.input \
            and _undoes(before, n, static(before.input[0]), out_shape):
        return before.input[0]
    return None


def _split_fused_conv(n: onnx.NodeProto, name: str, x: str, skip: str, selection: bool) -> list[DNode]:
    """ORT fused the residual Add (and maybe the activation) into the conv: activation(conv(x) + sum). Split it
    back so the rules see conv -> Add(conv, skip) -> activation; the split-off tensors carry FUSED_MARK."""
    conv_out, sum_out = f"{n.output[0]}{FUSED_MARK}conv", f"{n.output[0]}{FUSED_MARK}sum"
    act = next((a.s.decode() for a in n.attribute if a.name == "activation"), "")
    out = [DNode(f"{name}{FUSED_MARK}conv", "conv", [x], [conv_out], selection, _namespace(n), n.op_type),
           DNode(name, "add", [conv_out, skip], [sum_out if act else n.output[0]], False, _namespace(n), "Add")]
    if act:
        out.append(DNode(f"{name}{FUSED_MARK}act", act.lower(), [sum_out], [n.output[0]], False, _namespace(n), act))
    return out


def _keeps_order(n: onnx.NodeProto) -> bool:
    if n.op_type != "Transpose":
        return True
    perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
    return perm is not None and perm == sorted(perm)


def _undoes(first: onnx.NodeProto, second: onnx.NodeProto, first_in: tuple[object, ...] | None,
            second_out: tuple[object, ...] | None) -> bool:
    if second.op_type == "Transpose":
        p1 = next((list(a.ints) for a in first.attribute if a.name == "perm"), None)
        p2 = next((list(a.ints) for a in second.attribute if a.name == "perm"), None)
        return p1 is not None and p2 is not None and [p1[k] for k in p2] == list(range(len(p1)))
    return first_in is not None and first_in == second_out


def expose_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``tensors`` (typed by the runtime), so a session run
    returns their values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def replace_repeated(field, items: list) -> None:  # noqa: ANN001 - a protobuf repeated message field
    """Make a repeated protobuf field (``graph.node``, ``graph.initializer``) hold exactly ``items``.

    The items are copied first: they may be elements of ``field`` itself, which ``del field[:]`` invalidates.
    """
    copies = [type(item)() for item in items]
    for copy, item in zip(copies, items):
        copy.CopyFrom(item)
    del field[:]
    field.extend(copies)
