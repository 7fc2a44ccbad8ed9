"""Probe graphs: an ONNX variant whose every short path's output is also a graph output, named after its block.

Polygraphy compares graph outputs by name. :func:`build_probe` exposes each short path's output (a residual Add's,
for a ResNet) under the module path of the reference block it pairs with (``layer2.1``), so ``polygraphy run
probe.onnx --load-outputs reference-probe.json`` reports, block by block, where an engine departs from the
reference. A block with several short paths gets ``#2``, ``#3`` for the later ones; a short path the reference
names no block for is named after its node.

The pairing is the short-path engine's (:func:`resdeploy.export.align.align`), and the probe reads the tensor the
skip-add check's numeric localisation reads (a Q/DQ graph's DequantizeLinear output), through a node that makes it
float32 whatever it was: an Identity for float32, a DequantizeLinear for the integer output of a QLinear op, a Cast
otherwise (float16). Where the variant fused the ReLU after a merge into it (ONNX Runtime's quantizer drops a
ReLU whose output is quantized to uint8), the value read is after the ReLU: the probe is named ``<block>+relu``
and the reference's value is ReLU'd too.

A probe costs one graph output per block, not one per tensor (``--onnx-outputs mark all``), but an engine still
cannot fuse across a marked tensor: a probe engine is a diagnosis aid, not the deployed engine.

:class:`ProbeReference` is the other side: a PyTorch module (traced with ``torch.export``, its values read by
replaying the trace) or an FP32 ONNX graph (run by ONNX Runtime on the CPU, graph optimisation off).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from resdeploy.artifact import load_onnx
from resdeploy.errors import InputError
from resdeploy.export.align import align
from resdeploy.export.discover import ShortPath, discover
from resdeploy.export.engine import Trace, trace
from resdeploy.export.graph import DataGraph
from resdeploy.export.numeric import (
    FLOAT_RTOL, LOW_PRECISION_RTOL, QLINEAR_OUTPUT_SCALE, QUANT_MIN_COSINE, exposable, fused_relu, is_full_precision,
    is_quantized, onnx_values,
)
from resdeploy.export.onnx_graph import to_datagraph

RELU_SUFFIX = "+relu"  # a probe read after a ReLU the variant fused into the merge
REFERENCE_BATCH = 64  # images per PyTorch forward when computing the reference's outputs


@dataclass(frozen=True)
class Probe:
    """One probe output of a probe graph."""

    name: str  # the graph output's name, and the key of its reference value
    block: str  # the reference block ("" when the reference names none)
    kind: str  # the short-path kind (add, scaled_add, concat, gated_add, mean_join)
    tensor: str  # the variant's tensor the probe reads
    reference: int  # index of the paired short path in ProbeReference.paths
    relu: bool = False  # the variant fused the ReLU after the merge: compare after the ReLU


@dataclass(frozen=True)
class ProbeGraph:
    """A variant with its probes as extra graph outputs. They come first, in topological order, and the original
    outputs last: a tool that reports outputs in graph order (Polygraphy does) reports the first block that
    departs first."""

    model: onnx.ModelProto
    probes: tuple[Probe, ...]
    notes: tuple[str, ...]  # short paths left without a probe, and why
    # The skip-add check's numeric criterion for this graph: ("rel", r) - max |error| <= r x max |reference|
    # (float32, float16), or ("cosine", c) - cosine similarity >= c (quantized).
    criterion: tuple[str, float] = ("rel", FLOAT_RTOL)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.probes)


@dataclass(frozen=True)
class ProbeReference:
    """The reference side: its short paths, the probe name of each, and how to read its values on images."""

    paths: tuple[ShortPath, ...]
    names: tuple[str, ...]  # the probe name of each short path, in order
    graph: DataGraph
    relu_fed: frozenset[str]  # merge outputs whose every consumer is a ReLU
    module: Any = None  # the nn.Module (None for an ONNX reference)
    trace: Trace | None = None
    onnx_model: onnx.ModelProto | None = None  # the FP32 ONNX reference (None for a module)
    onnx_path: Path | None = None

    @property
    def label(self) -> str:
        if self.module is not None:
            return "PyTorch FP32"
        return "the FP32 ONNX graph in ONNX Runtime (CPU, no graph optimisation)"

    def outputs(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The reference's outputs on ``images`` under the ONNX output ``names`` (in the order it returns them)."""
        if self.onnx_model is not None:
            vals = onnx_values(self.onnx_model, self.onnx_path, list(names), images)
            missing = [n for n in names if n not in vals]
            if missing:
                raise InputError(f"the ONNX reference has no output named {missing[0]!r}; its outputs are "
                                 f"{[o.name for o in self.onnx_model.graph.output]}: give variants of that graph")
            return {n: vals[n].astype(np.float32) for n in names}
        return _module_outputs(self.module, images, names)

    def values(self, images: np.ndarray, probes: Iterable[Probe]) -> dict[str, np.ndarray]:
        """The reference's value at each probe (name -> float32 array over ``images``), ReLU'd where the probe is."""
        probes = list({p.name: p for p in probes}.values())
        wanted = {self.paths[p.reference].output for p in probes}
        if self.trace is not None:
            import torch

            from resdeploy.export.torch_graph import record_values

            raw = record_values(self.trace.program, self.trace.graph, torch.from_numpy(np.ascontiguousarray(images)),
                                wanted)
        else:
            assert self.onnx_model is not None
            names = exposable(self.graph, [self.paths[p.reference] for p in probes])
            got = onnx_values(self.onnx_model, self.onnx_path, sorted({names[t] for t in wanted if t in names}), images)
            raw = {t: got[names[t]] for t in wanted if t in names and names[t] in got}
        out: dict[str, np.ndarray] = {}
        for p in probes:
            v = raw.get(self.paths[p.reference].output)
            if v is None:
                raise InputError(f"no reference value for block {p.block or p.name}: its tensor could not be read "
                                 "from the reference")
            out[p.name] = np.maximum(v, 0).astype(np.float32) if p.relu else v.astype(np.float32)
        return out


def _module_outputs(module: Any, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``module``'s outputs on ``images`` in eval mode, batch by batch, under ``names``."""
    import torch

    module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    with torch.no_grad():
        for start in range(0, len(images), REFERENCE_BATCH):
            out = module(torch.from_numpy(np.ascontiguousarray(images[start:start + REFERENCE_BATCH])).to(device))
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if len(outs) != len(names):
                raise InputError(f"the PyTorch reference returns {len(outs)} output(s) but the ONNX graph has "
                                 f"{len(names)} ({list(names)}); export the module whose outputs the graph has")
            for k, o in enumerate(outs):
                parts[k].append(o.detach().float().cpu().numpy())
    return {n: np.concatenate(p) for n, p in zip(names, parts)}


def probe_names(paths: Sequence[ShortPath]) -> tuple[str, ...]:
    """A unique name per short path: its block's module path (``#2``... for a block's later ones), else its node."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for p in paths:
        base = (p.block or p.node).replace(":", "_")  # Polygraphy reads `name:value` in per-output options
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return tuple(names)


def probe_reference(reference: Any, example: np.ndarray) -> ProbeReference:
    """The reference side for probes: ``reference`` is an nn.Module (traced on ``example[:1]``, (N, C, H, W) float32
    normalised as the model expects) or an FP32 ONNX graph (a path or a ModelProto)."""
    if isinstance(reference, (str, Path, onnx.ModelProto)):
        path = Path(reference) if isinstance(reference, (str, Path)) else None
        proto = load_onnx(path, weights=True) if path is not None else reference
        dg, _ = to_datagraph(proto)
        paths = tuple(discover(dg))
        return ProbeReference(paths, probe_names(paths), dg, frozenset(dg.relu_fed()), onnx_model=proto,
                              onnx_path=path)
    import torch

    x = np.asarray(example, np.float32)
    if x.ndim != 4 or not len(x):
        raise InputError(f"images of shape {x.shape}; give (N, C, H, W) float32 images normalised as the model expects")
    tr = trace(reference, torch.from_numpy(x[:1].copy()))
    paths = tuple(tr.paths)
    return ProbeReference(paths, probe_names(paths), tr.graph, tr.relu_fed, module=reference, trace=tr)


def build_probe(model: onnx.ModelProto | str | Path, reference: ProbeReference) -> ProbeGraph:
    """``model`` (a variant: FP32, FP16 or Q/DQ INT8) with each short path paired with the reference's exposed as
    an extra float32 graph output named per the module docstring. Weights are loaded (external data included)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(load_onnx(Path(model), weights=True) if isinstance(model, (str, Path)) else model)
    dg, _ = to_datagraph(proto)
    paths = discover(dg)
    pairs = align(paths, reference.paths, quantized=is_quantized(proto))
    matched = [(paths[i], j) for i, j in pairs if i is not None and j is not None]
    readable = exposable(dg, [p for p, _ in matched])
    taken = _tensor_names(proto)
    notes = [f"block {reference.names[j]}: the variant has no short path paired with it (run `resdeploy check` on the "
             "variant)" for i, j in pairs if i is None and j is not None]
    notes += [f"ONNX node {paths[i].node}: a short path the reference does not have; no probe"
              for i, j in pairs if j is None and i is not None]
    probes: list[Probe] = []
    for p, j in matched:
        tensor = readable.get(p.output)
        if tensor is None:
            notes.append(f"block {reference.names[j]}: its output is fused away or in a blocked layout; no probe")
            continue
        relu = fused_relu(p.output, reference.paths[j].output, dg.relu_fed(), reference.relu_fed)
        name = _unique(reference.names[j] + (RELU_SUFFIX if relu else ""), taken)
        taken.add(name)
        probes.append(Probe(name, reference.paths[j].block, reference.paths[j].kind, tensor, j, relu))
    criterion = (("cosine", QUANT_MIN_COSINE) if is_quantized(proto) else
                 ("rel", FLOAT_RTOL if is_full_precision(proto) else LOW_PRECISION_RTOL))
    _add_outputs(proto, probes)
    return ProbeGraph(proto, tuple(probes), tuple(notes), criterion)


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return ({t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
            | {o for n in g.node for o in n.output})


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name.probe`` (repeated) when the graph already has a tensor of that name."""
    while name in taken:
        name += ".probe"
    return name


def _value_infos(model: onnx.ModelProto) -> Mapping[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - custom-domain ops or a >2 GiB proto stop inference: types stay unknown
        inferred = model
    g = inferred.graph
    return {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}


def _dim(d: Any) -> int | str | None:  # noqa: ANN401 - an onnx TensorShapeProto.Dimension
    """A dim for make_tensor_value_info: its value, its name, or None (inference's ``unk__N`` is unknown)."""
    if d.HasField("dim_value"):
        return d.dim_value
    return d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None


def _add_outputs(model: onnx.ModelProto, probes: Sequence[Probe]) -> None:
    """Append, per probe, a node that makes its tensor float32 under the probe's name; make the probes the first
    graph outputs."""
    infos = _value_infos(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = list(model.graph.output)
    del model.graph.output[:]
    for pr in probes:
        src = producers.get(pr.tensor)
        vi = infos.get(pr.tensor)
        elem = vi.type.tensor_type.elem_type if vi is not None else onnx.TensorProto.UNDEFINED
        k = QLINEAR_OUTPUT_SCALE.get(src.op_type) if src is not None else None
        if k is not None and elem != onnx.TensorProto.FLOAT:  # a QLinear op's integer output: dequantize it
            scale = list(src.input[k:k + 2])
            node = helper.make_node("DequantizeLinear", [pr.tensor, *scale], [pr.name], name=f"probe/{pr.name}")
        elif elem == onnx.TensorProto.FLOAT:
            node = helper.make_node("Identity", [pr.tensor], [pr.name], name=f"probe/{pr.name}")
        else:  # float16, or a type inference could not tell
            node = helper.make_node("Cast", [pr.tensor], [pr.name], name=f"probe/{pr.name}", to=onnx.TensorProto.FLOAT)
        model.graph.node.append(node)
        shape = vi.type.tensor_type.shape if vi is not None and vi.type.tensor_type.HasField("shape") else None
        dims = [_dim(d) for d in shape.dim] if shape else None
        model.graph.output.append(helper.make_tensor_value_info(pr.name, onnx.TensorProto.FLOAT, dims))
    model.graph.output.extend(outputs)
