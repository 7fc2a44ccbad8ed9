"""Where a model comes from, checked before anything is written.

    src = resolve_source(cfg.model, data=cfg.train.data, train=cfg.train, precisions=cfg.variants.precisions)
    ref = src.reference()          # what every engine is judged against (workbench.Reference)

Four sources (``[model]`` in the run config; the same flags on every command):

    registry    a registered architecture, trained here on the data                    model.arch
    checkpoint  a checkpoint folder (model.json + model.safetensors)                    model.checkpoint
    factory     the user's network: factory + kwargs, with weights or trained here      model.factory (--model)
    onnx        the user's FP32 ONNX file: the reference is that graph, run by ONNX     model.onnx (--onnx)
                Runtime with graph optimisations off

:func:`resolve_source` imports the factory (running the user's code, which they asked for), builds the module,
loads the weights strictly and runs a batch through it; or reads the ONNX file through the artifact contract
(external data checked), checks it has one float image input with a dynamic batch axis and runs a batch through
ONNX Runtime. Every problem is an InputError (one line, exit 2) raised before a run folder is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import resdeploy
from resdeploy import atomic
from resdeploy.artifact import ArtifactMetadata, InputSpec, check_external_data, load_onnx, open_artifact
from resdeploy.errors import InputError
from resdeploy.pipeline.workbench import Reference

NO_DATA_INT8 = ("INT8 needs your data: calibration images from its val split and an accuracy gate on its test split; "
                "set --data (an image folder with one subfolder per class, or an .npz) or drop int8 "
                "(--set variants.precisions='[\"fp16\"]' --set repository.precision=fp16)")


@dataclass
class ModelSource:
    """A resolved model source; ``reference()`` loads the model once (the checks already ran)."""

    kind: str  # registry | checkpoint | factory | onnx
    data: str  # the data: training, calibration, parity ("" = none given: digits exercise the model, no INT8)
    factory: Any = None  # models.user.FactoryRef of a factory source
    weights: Path | None = None  # the factory's weights as given (None: trained here)
    onnx: Path | None = None  # the user's ONNX file
    spec: InputSpec | None = None  # the input spec when known before training
    labels: tuple[str, ...] = ()
    identity: dict[str, Any] = field(default_factory=dict)  # what names the model in cache keys (code, sha256s)
    checkpoint: Path | None = None  # a checkpoint folder: given, or written by the train stage
    given: str = ""  # what came trained, in one line ("" = trained here): the train stage's skip line
    _ref: Reference | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The model's default name (repository, report): architecture, the factory's callable, the ONNX stem."""
        if self.factory is not None:
            return self.factory.name
        if self.onnx is not None:
            return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.onnx.stem) or "model"
        return str(self.identity.get("arch", "model"))

    def reference(self) -> Reference:
        """The reference model (loaded once): a PyTorch module, or the ONNX graph run by ONNX Runtime."""
        if self._ref is None:
            self._ref = self._load()
        return self._ref

    def _load(self) -> Reference:
        if self.kind == "onnx":
            sha = self.identity["onnx_sha256"][:12]
            return Reference(None, f"{self.onnx} (ONNX, sha256 {sha})", True, self.data, onnx=self.onnx, spec=self.spec,
                             onnx_labels=self.labels)
        if self.kind == "factory":
            from resdeploy.models.user import load_factory_checkpoint, load_user_model

            if self.weights is not None:
                model = load_user_model(self.factory, self.weights, self.spec, self.labels)
                return Reference(model, f"{self.factory.describe()} (weights {self.weights})", True, self.data)
            if self.checkpoint is None:
                raise InputError(f"{self.factory.spec} has no weights yet; the train stage makes them")
            model, _ = load_factory_checkpoint(self.checkpoint, self.factory)
            return Reference(model, f"{self.factory.describe()} (trained: {self.checkpoint})", True, self.data)
        from resdeploy.models import load_checkpoint

        if self.checkpoint is None:
            raise InputError(f"{self.name} has no checkpoint yet; the train stage makes it")
        model, info = load_checkpoint(self.checkpoint)
        return Reference(model.eval(), f"{info.arch} ({self.checkpoint})", True, self.data)

    def metadata(self, exporter: str) -> ArtifactMetadata:
        """The FP32 artifact's metadata for a factory's export or an imported ONNX (variants inherit it)."""
        ref = self.reference()
        spec = ref.input_spec
        base = ArtifactMetadata(architecture=self.name, input_spec=spec, labels=tuple(ref.labels), precision="fp32",
                                resdeploy_version=resdeploy.__version__, exporter=exporter)
        if self.kind == "onnx":
            return dataclasses.replace(base, imported_sha256=self.identity["onnx_sha256"])
        weights = self.weights or (self.checkpoint / "model.safetensors" if self.checkpoint else None)
        return dataclasses.replace(base, factory=self.factory.spec, factory_kwargs=dict(self.factory.kwargs),
                                   checkpoint_sha256=atomic.sha256_file(weights) if weights else "")

    def card(self) -> dict[str, Any]:
        """The model card's fields beyond architecture and accuracy: where the model came from, with sha256s."""
        out: dict[str, Any] = {"source": self.kind, "reference": self.reference().kind}
        if self.factory is not None:
            out.update(self.factory.to_dict())
        if self.weights is not None:
            out["weights"], out["weights_sha256"] = str(self.weights), self.identity["weights_sha256"]
        elif self.factory is not None and self.checkpoint is not None:  # trained here
            trained = self.checkpoint / "model.safetensors"
            out["weights"], out["weights_sha256"] = str(trained), atomic.sha256_file(trained)
        if self.onnx is not None:
            out["onnx"], out["onnx_sha256"] = str(self.onnx), self.identity["onnx_sha256"]
        return out


def _spec(shape: tuple[int, int, int], mean: list[float], std: list[float]) -> InputSpec:
    """An input spec; no mean/std means the model takes pixels in [0, 1] as they are."""
    c = shape[0]
    return InputSpec(*shape, mean=tuple(mean) or (0.0,) * c, std=tuple(std) or (1.0,) * c)


def resolve_source(model: Any, *, data: str = "", train: Any = None, precisions: Any = ()) -> ModelSource:
    """Check the ``[model]`` section (a config.ModelSection) and return its source; InputError on any problem.

    ``data``: ``[train] data`` ("" = none given); ``train``: the TrainSection (a factory trained here is sized by
    its image_size/channels); ``precisions``: the variants wanted (INT8 without data is refused)."""
    kind = model.source
    if kind == "registry":
        src = ModelSource("registry", data or "mnist", identity={"arch": model.arch})
    elif kind == "checkpoint":
        src = _checkpoint_source(Path(model.checkpoint))
    elif kind == "factory":
        src = _factory_source(model, data, train)
    else:
        src = _onnx_source(model, data)
    if "int8" in precisions and not src.data:
        raise InputError(f"{src.name}: {NO_DATA_INT8}")
    return src


def _checkpoint_source(path: Path) -> ModelSource:
    from resdeploy.models import load_checkpoint

    _, info = load_checkpoint(path)  # refuses a missing/corrupt/unsafe checkpoint before anything else runs
    acc = info.metrics.get("test_accuracy")
    given = f"given checkpoint {path} ({info.arch}" + (f", test accuracy {acc:.2%})" if isinstance(acc, float) else ")")
    return ModelSource("checkpoint", str(info.metrics.get("data", "mnist")), identity={"arch": info.arch},
                       checkpoint=path, given=given)


def _factory_source(model: Any, data: str, train: Any) -> ModelSource:
    """With weights (or outside ``run``, where nothing trains: the factory's initial weights) the network is built
    and loaded now; without weights in ``run`` (``train`` given) it is built and checked against the data here and
    trained by the train stage."""
    from resdeploy.models.user import FactoryRef, build_checked, factory_fingerprint, load_user_model

    ref = FactoryRef(model.factory, dict(model.factory_kwargs))
    if model.weights or train is None:
        weights = Path(model.weights) if model.weights else None
        if not model.input_shape:
            raise InputError(f"--model {ref.spec}: say which input the network takes with --input-shape C,H,W "
                             "(model.input_shape)")
        spec = _spec(tuple(model.input_shape), model.mean, model.std)
        net = load_user_model(ref, weights, spec, tuple(model.labels))
        identity = {**factory_fingerprint(ref.spec), "kwargs": dict(ref.kwargs),
                    "weights_sha256": atomic.sha256_file(weights) if weights else "initial weights"}
        what = f"weights {weights}" if weights else "its initial weights: no --weights"
        src = ModelSource("factory", data, ref, weights, spec=spec, labels=tuple(net.labels), identity=identity,
                          given=f"given {what} for {ref.spec}")
        src._ref = Reference(net, f"{ref.describe()} ({what})", weights is not None, data)
        return src
    from resdeploy.models import load_data

    bundle = load_data(data or "mnist")
    c, h, w = bundle.shape
    channels, size = getattr(train, "channels", 0), getattr(train, "image_size", 0)
    shape = tuple(model.input_shape) or (channels or c, size or h, size or w)
    _, classes = build_checked(ref, shape, len(bundle.classes), bundle.name)  # fails here, not after a run began
    if model.labels and len(model.labels) != classes:
        raise InputError(f"model.labels has {len(model.labels)} names for {classes} classes; give one per class")
    return ModelSource("factory", data or "mnist", ref, None,
                       identity={**factory_fingerprint(ref.spec), "kwargs": dict(ref.kwargs)})


def onnx_fingerprint(path: Path) -> str:
    """sha256 over an ONNX file and the external-data files it names (checked to lie beside it)."""
    files = check_external_data(load_onnx(path), path.parent, str(path))
    h = hashlib.sha256(atomic.sha256_file(path).encode())
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + atomic.sha256_file(f).encode())
    return h.hexdigest()


def _onnx_input(path: Path, given: list[int]) -> tuple[int, int, int]:
    """C, H, W of the ONNX file's one float image input, which must have a dynamic batch axis."""
    art = open_artifact(path)
    if len(art.inputs) != 1:
        names = ", ".join(i.name for i in art.inputs) or "none"
        raise InputError(f"{path} has {len(art.inputs)} inputs ({names}); resdeploy deploys single-input image models: "
                         "export it with one image input")
    x = art.inputs[0]
    if len(x.shape) != 4:
        raise InputError(f"{path}: input {x} has no batch axis (resdeploy serves NCHW images: batch, C, H, W); "
                         "re-export it with a 4-D input whose axis 0 is the batch")
    if x.dtype != "float32":
        raise InputError(f"{path}: input {x} takes {x.dtype}; resdeploy feeds float32 images: re-export it with a float32 "
                         "input (and the cast inside the graph)")
    if x.shape[0] is not None:
        raise InputError(f"{path}: input {x} has a fixed batch of {x.shape[0]} (no batch axis to batch requests on); "
                         "re-export with a dynamic batch axis, e.g. torch.onnx.export(..., dynamo=True, "
                         "dynamic_shapes=({0: Dim('batch')},))")
    dims = tuple(x.shape[1:])
    if given and any(d is not None and d != g for d, g in zip(dims, given)):
        raise InputError(f"{path}: input {x} does not take --input-shape {','.join(map(str, given))}; drop it or "
                         "give the graph's own C,H,W")
    shape = tuple(given) if given else dims
    if any(d is None for d in shape):
        raise InputError(f"{path}: input {x} has dynamic C/H/W; say which to serve with --input-shape C,H,W")
    return shape  # type: ignore[return-value]


def _onnx_source(model: Any, data: str) -> ModelSource:
    from resdeploy.artifact import precision_of
    from resdeploy.engines import open_runner

    path = Path(model.onnx)
    shape = _onnx_input(path, list(model.input_shape))
    precision = precision_of(load_onnx(path))
    if precision != "fp32":
        raise InputError(f"{path} is a {precision} model; give the FP32 ONNX (resdeploy makes the FP16/INT8 variants)")
    try:
        with open_runner(str(path), backend="onnxruntime", provider="cpu", optimization="disable") as r:
            out = np.asarray(next(iter(r.infer({r.inputs[0].name: np.zeros((2, *shape), np.float32)}).values())))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime reports shape errors in several types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} rejects input shape {','.join(map(str, shape))} ({first}); give --input-shape "
                         "C,H,W that it takes") from None
    if out.ndim != 2 or out.shape[0] != 2:
        raise InputError(f"{path}: its first output is shaped {out.shape} for a batch of 2; resdeploy deploys "
                         "classifiers whose first output is (batch, classes) logits")
    labels = tuple(model.labels) or tuple(str(i) for i in range(out.shape[1]))
    if len(labels) != out.shape[1]:
        raise InputError(f"model.labels has {len(labels)} names for {out.shape[1]} logits; give one per class")
    return ModelSource("onnx", data, onnx=path, spec=_spec(shape, model.mean, model.std), labels=labels,
                       identity={"onnx_sha256": onnx_fingerprint(path)}, given=f"given ONNX {path}")


def import_onnx(src: ModelSource, out: Path) -> dict[str, Any]:
    """Copy the user's ONNX file to ``out`` (atomically, external data re-laid out as save_onnx decides) with
    resdeploy's metadata (input spec, labels, the source's sha256); the user's other metadata keys are kept."""
    from resdeploy.artifact import read_metadata, save_onnx, write_metadata

    proto = load_onnx(src.onnx, weights=True)
    try:
        extra = dict(read_metadata(proto, str(src.onnx)).extra)
    except InputError:  # keys resdeploy knows, written by something else: replaced below
        extra = {}
    write_metadata(proto, dataclasses.replace(src.metadata("imported"), extra=extra))
    save_onnx(proto, out)
    art = open_artifact(out)
    params = int(sum(int(np.prod(t.dims)) for t in load_onnx(out).graph.initializer))
    return {"sha256": art.sha256(), "opset": art.opset, "exporter": "imported", "source": str(src.onnx),
            "source_sha256": src.identity["onnx_sha256"], "external_data": art.external_data, "parameters": params,
            "input": str(art.inputs[0]), "output": str(art.outputs[0])}


def imported_fp32(src: ModelSource, workdir: Path, given: str | None) -> str | None:
    """The FP32 model the variants are made from: ``given``, or for an ONNX source its copy in ``workdir`` with
    resdeploy's metadata (the input spec the FP16/INT8 stages read)."""
    if given and Path(given).resolve() != (src.onnx.resolve() if src.onnx else None):
        return given
    if src.kind != "onnx":
        return given
    out = Path(workdir) / "fp32.onnx"
    import_onnx(src, out)
    return str(out)


def key_of(src: ModelSource) -> str:
    """The source's identity as one string (a cache-key input)."""
    return json.dumps(src.identity, sort_keys=True, default=str)


__all__ = ["ModelSource", "NO_DATA_INT8", "import_onnx", "imported_fp32", "key_of", "onnx_fingerprint", "resolve_source"]
