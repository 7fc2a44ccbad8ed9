"""The ONNX artifact contract: the one place that reads, writes and describes an ONNX file.

Every stage hands the next one an ONNX artifact. This module (the ground floor: every layer may import it,
it imports no layer) owns:

* **Loading** with one external-data policy (:func:`load_onnx`). External data is untrusted input: each
  location must be a plain relative path to a regular file inside the model's folder (no ``..``, no absolute
  path, no symlink, no second hard link), and each tensor's offset + length must lie inside that file. ONNX
  Runtime, TensorRT and the onnx package would otherwise read whatever file the model names.
* **Saving** atomically (:func:`save_onnx`, :func:`staged_onnx`): model and external data are written in a
  temp folder beside the target and moved into place data first, model last, so a crash never leaves a
  model that points at half-written weights. Models over the protobuf limit keep their weights in
  ``<name>.data`` beside them; :func:`copy_onnx` copies a model with every data file it names.
* **Metadata** as a typed frozen dataclass (:class:`ArtifactMetadata`, ``read``/``write``): architecture,
  input spec, labels, precision, INT8 flavour, calibration, source and checkpoint sha256, resdeploy version, and
  for a user's network its factory and kwargs (or the sha256 of the ONNX file it was imported from).
  No other module spells a metadata_props key.
* **Tensor names** (:class:`OnnxArtifact` ``.inputs``/``.outputs``): read from the graph, never assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resdeploy import atomic
from resdeploy.errors import InputError

if TYPE_CHECKING:  # onnx is imported inside the functions: `import resdeploy.artifact` stays light
    import onnx

PROTOBUF_LIMIT = 2 * 1024**3  # one serialised protobuf message must stay under 2 GiB
EXTERNAL_DATA_THRESHOLD = 1800 * 1024**2  # weights above this go to <name>.data (headroom under the 2 GiB limit)
PRECISIONS = ("fp32", "fp16", "int8")
FLAVOURS = ("u8s8", "s8s8")

# ONNX TensorProto element type -> numpy dtype name
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "object",
              9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


# -- the input spec ----------------------------------------------------------------------------------------
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class InputSpec:
    """The one input tensor of a model: NCHW float32, already normalised with ``mean``/``std``."""

    channels: int = 3
    height: int = 32
    width: int = 32
    mean: tuple[float, ...] = CIFAR_MEAN  # per channel, applied to [0, 1] pixels before the model
    std: tuple[float, ...] = CIFAR_STD
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            # A 1-channel model given RGB statistics (or the reverse) is a config slip; broadcast a single value.
            if len(self.mean) == 1 and len(self.std) == 1:
                object.__setattr__(self, "mean", tuple(self.mean) * self.channels)
                object.__setattr__(self, "std", tuple(self.std) * self.channels)
            else:
                raise InputError(f"InputSpec: mean/std have {len(self.mean)}/{len(self.std)} values but "
                                 f"channels={self.channels}; give one value per channel")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        try:
            return cls(channels=int(d["channels"]), height=int(d["height"]), width=int(d["width"]),
                       mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                       layout=str(d.get("layout", "NCHW")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"input spec {dict(d)!r} is incomplete or malformed ({type(exc).__name__}: {exc}); "
                             "expected channels, height, width, mean, std") from None


# -- metadata ----------------------------------------------------------------------------------------------
# metadata_props key of each field; the keys are the on-disk format (older files and Triton users read them).
_KEYS = {"architecture": "architecture", "arch_kwargs": "arch_kwargs", "input_spec": "input_spec", "labels": "labels",
         "precision": "precision", "int8_flavour": "int8_flavour", "calibration": "calibration",
         "source_sha256": "source_onnx_sha256", "checkpoint_sha256": "checkpoint_sha256",
         "resdeploy_version": "resdeploy_version", "exporter": "exporter", "shortcut_rewrite": "shortcut_rewrite",
         "mixed_precision": "mixed_precision", "factory": "factory", "factory_kwargs": "factory_kwargs",
         "imported_sha256": "imported_onnx_sha256"}
_JSON_FIELDS = ("arch_kwargs", "input_spec", "labels", "calibration", "mixed_precision", "factory_kwargs")


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an ONNX artifact says about itself (its ``metadata_props``), typed."""

    architecture: str = ""  # resdeploy architecture, the user's factory's callable, or the imported ONNX file's stem
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # builder arguments
    input_spec: InputSpec | None = None  # shape and normalisation; None = unknown
    labels: tuple[str, ...] = ()  # class names, index order
    precision: str = ""  # fp32 | fp16 | int8 ("" = not recorded: see precision_of)
    int8_flavour: str = ""  # u8s8 | s8s8 for int8 variants
    calibration: Mapping[str, Any] | None = None  # where INT8 scales came from (data, split, images, method)
    source_sha256: str = ""  # the FP32 ONNX a variant was made from
    checkpoint_sha256: str = ""  # the weights the FP32 export was made from
    resdeploy_version: str = ""
    exporter: str = ""  # dynamo | torchscript
    shortcut_rewrite: str = ""  # e.g. option_a_conv:2 when option-A shortcuts were rewritten as 1x1 convs
    mixed_precision: Mapping[str, Any] | None = None  # nodes kept out of INT8 and why (accuracy-driven search)
    factory: str = ""  # the user's factory (module:callable or file.py:callable) the network was built by
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)  # the keyword arguments it was called with
    imported_sha256: str = ""  # the user's own FP32 ONNX file this artifact was imported from (run --onnx)
    extra: Mapping[str, str] = field(default_factory=dict)  # keys resdeploy does not know, kept verbatim

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> "ArtifactMetadata":
        """Parse metadata_props; a malformed known key is an InputError naming the key and the file."""
        values: dict[str, Any] = {}
        by_key = {v: k for k, v in _KEYS.items()}
        extra = {}
        for key, raw in props.items():
            name = by_key.get(key)
            if name is None:
                extra[key] = raw
                continue
            if name in _JSON_FIELDS:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    raise InputError(f"{source}: metadata {key!r} is not JSON ({raw[:60]!r}); re-export the model") from None
                if name == "input_spec":
                    if not isinstance(parsed, dict):
                        raise InputError(f"{source}: metadata 'input_spec' is not an object; re-export the model")
                    parsed = InputSpec.from_dict(parsed)
                elif name == "labels":
                    if not isinstance(parsed, list):
                        raise InputError(f"{source}: metadata 'labels' is not a list; re-export the model")
                    parsed = tuple(str(x) for x in parsed)
                elif not isinstance(parsed, dict):
                    raise InputError(f"{source}: metadata {key!r} is not an object; re-export the model")
                values[name] = parsed
            else:
                values[name] = raw
        if values.get("precision") not in (None, "", *PRECISIONS):
            raise InputError(f"{source}: metadata 'precision' is {values['precision']!r}; expected one of {', '.join(PRECISIONS)}")
        return cls(**values, extra=extra)

    def to_props(self) -> dict[str, str]:
        """metadata_props, in field order; empty fields are left out."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v in (None, "", (), {}):
                continue
            if f.name == "input_spec":
                out[_KEYS[f.name]] = json.dumps(v.to_dict(), sort_keys=True)
            elif f.name == "labels":
                out[_KEYS[f.name]] = json.dumps(list(v))
            elif f.name in _JSON_FIELDS:
                out[_KEYS[f.name]] = json.dumps(dict(v), sort_keys=True)
            else:
                out[_KEYS[f.name]] = str(v)
        out.update(self.extra)
        return out

    def variant(self, precision: str, *, flavour: str = "", calibration: Mapping[str, Any] | None = None,
                source_sha256: str = "", **changes: Any) -> "ArtifactMetadata":
        """This (source) metadata as a precision variant's: what makes the variant a variant replaced."""
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        return replace(self, precision=precision, int8_flavour=flavour, calibration=calibration,
                       source_sha256=source_sha256, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_spec"] = self.input_spec.to_dict() if self.input_spec else None
        d["labels"] = list(self.labels)
        return d


def read_metadata(model: "onnx.ModelProto", source: str = "model") -> ArtifactMetadata:
    return ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props}, source)


def precision_of(model: "onnx.ModelProto") -> str:
    """The precision recorded in metadata, else read from the graph (Q/DQ -> int8, float16 weights -> fp16)."""
    recorded = read_metadata(model).precision
    if recorded:
        return recorded
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}:
        return "int8"
    if any(ELEM_TYPES.get(t.data_type) == "float16" for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def write_metadata(model: "onnx.ModelProto", meta: ArtifactMetadata) -> None:
    """Replace ``model.metadata_props`` with ``meta``."""
    del model.metadata_props[:]
    for k, v in meta.to_props().items():
        model.metadata_props.add(key=k, value=v)


# -- tensors -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, numpy dtype name, dims (None = dynamic, e.g. the batch axis)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    elem_type: int = 1  # the ONNX TensorProto element type

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join('?' if d is None else str(d) for d in self.shape)}]"


def _tensor_infos(values: Any, skip: set[str]) -> tuple[TensorInfo, ...]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out.append(TensorInfo(v.name, ELEM_TYPES.get(tt.elem_type, f"onnx type {tt.elem_type}"), dims, tt.elem_type))
    return tuple(out)


def graph_inputs(model: "onnx.ModelProto") -> tuple[TensorInfo, ...]:
    """The data inputs (initializers listed as inputs by old IR versions are left out)."""
    return _tensor_infos(model.graph.input, {t.name for t in model.graph.initializer})


def graph_outputs(model: "onnx.ModelProto") -> tuple[TensorInfo, ...]:
    return _tensor_infos(model.graph.output, set())


# -- external data -----------------------------------------------------------------------------------------
def _tensors(model: "onnx.ModelProto") -> Iterator[Any]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""
    import onnx

    def walk(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def external_tensors(model: "onnx.ModelProto") -> list[Any]:
    import onnx

    return [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def external_files(model: "onnx.ModelProto") -> list[str]:
    """The external-data locations the model names, in first-use order (relative to the model's folder)."""
    seen: dict[str, None] = {}
    for t in external_tensors(model):
        seen.setdefault(next((e.value for e in t.external_data if e.key == "location"), ""), None)
    return list(seen)


def check_external_data(model: "onnx.ModelProto", folder: str | os.PathLike[str], source: str = "model") -> list[Path]:
    """Refuse external data that leaves ``folder`` or does not fit its file; return the data files it names.

    Checked per tensor: location is a non-empty relative path without ``..``; the file is a regular file (not a
    symlink, no other hard link) whose resolved path is inside ``folder``; offset and length are non-negative
    integers and offset + length is within the file.
    """
    root = Path(folder).resolve()
    fix = "re-export the model with its .data file beside it (`resdeploy export`)"
    files: dict[Path, int] = {}
    for t in external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        rel = Path(loc)
        if not loc or rel.is_absolute() or ".." in rel.parts or "\0" in loc:
            raise InputError(f"{source}: initializer {t.name!r} points at external data {loc!r} outside the model's folder "
                             f"{root}; refusing to read it. Fix: {fix}")
        path = root / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise InputError(f"{source}: initializer {t.name!r} needs external data file {path}, which does not exist; "
                             "copy the .data file beside the model") from None
        except OSError as exc:
            raise InputError(f"{source}: external data {path} cannot be read ({exc}); {fix}") from None
        import stat

        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise InputError(f"{source}: external data {path} is a symlink or not a regular file; refusing to follow it. "
                             f"Fix: {fix}")
        if st.st_nlink > 1:
            raise InputError(f"{source}: external data {path} has {st.st_nlink} hard links, so it may be a file from "
                             f"elsewhere; refusing to read it. Fix: copy it (`cp`, not `ln`) beside the model")
        if root not in path.resolve().parents:
            raise InputError(f"{source}: external data {loc!r} resolves outside {root} (a symlinked folder?); {fix}")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else st.st_size - offset
        except ValueError:
            raise InputError(f"{source}: initializer {t.name!r} has a non-integer external-data offset/length "
                             f"({info.get('offset')!r}/{info.get('length')!r}); {fix}") from None
        if offset < 0 or length < 0 or offset + length > st.st_size:
            raise InputError(f"{source}: initializer {t.name!r} reads bytes {offset}..{offset + length} of {path}, which "
                             f"has {st.st_size} bytes (truncated or tampered data file); {fix}")
        files[path] = 1
    return list(files)


# -- loading -----------------------------------------------------------------------------------------------
def parse_onnx(data: bytes, source: str = "ONNX bytes") -> "onnx.ModelProto":
    """A ModelProto from serialised bytes (an exporter's in-memory output); weights stay where they are."""
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for corrupt bytes
        raise InputError(f"{source} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def load_onnx(path: str | os.PathLike[str], *, weights: bool = False) -> "onnx.ModelProto":
    """Read an ONNX file and check its external data (see :func:`check_external_data`).

    ``weights=False`` reads the graph only (external tensors stay references); ``weights=True`` also loads
    external data into the proto, after the check.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX model {p} does not exist; export one with `resdeploy export`")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise InputError(f"{p} is not a readable ONNX model ({type(exc).__name__}: {exc}); re-export it") from None
    check_external_data(proto, p.parent, str(p))
    if weights and external_tensors(proto):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(p.parent))
    return proto


@dataclass(frozen=True)
class OnnxArtifact:
    """An ONNX file on disk with what it says about itself. ``open_artifact`` makes one (graph only)."""

    path: Path
    metadata: ArtifactMetadata
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    data_files: tuple[Path, ...]  # external-data files, checked to lie inside the model's folder
    opset: int

    @property
    def input_name(self) -> str:
        """The single data input's name (image models have one)."""
        if len(self.inputs) != 1:
            raise InputError(f"{self.path} has {len(self.inputs)} inputs ({', '.join(i.name for i in self.inputs)}); "
                             "resdeploy's image pipeline takes single-input models")
        return self.inputs[0].name

    @property
    def output_name(self) -> str:
        """The first output (the logits of a classifier)."""
        if not self.outputs:
            raise InputError(f"{self.path} has no outputs")
        return self.outputs[0].name

    @property
    def precision(self) -> str:
        return self.metadata.precision or "fp32"

    @property
    def external_data(self) -> bool:
        return bool(self.data_files)

    def sha256(self) -> str:
        """sha256 of the model file (the external data is named by it and checked on load)."""
        return atomic.sha256_file(self.path)

    def size_bytes(self) -> int:
        return self.path.stat().st_size + sum(f.stat().st_size for f in self.data_files)

    def load(self, *, weights: bool = False) -> "onnx.ModelProto":
        return load_onnx(self.path, weights=weights)


def open_artifact(path: str | os.PathLike[str]) -> OnnxArtifact:
    """Read an ONNX file's graph (not its weights), check its external data, and describe it."""
    p = Path(path)
    proto = load_onnx(p)
    files = tuple(check_external_data(proto, p.parent, str(p)))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxArtifact(p, read_metadata(proto, str(p)), graph_inputs(proto), graph_outputs(proto), files, opset)


# -- saving ------------------------------------------------------------------------------------------------
def _externalise(model: "onnx.ModelProto", data_name: str, data_path: Path, min_bytes: int = 1024) -> None:
    """Move every tensor of >= ``min_bytes`` raw bytes into ``data_path`` (page-aligned so ORT can mmap it)."""
    import onnx

    with open(data_path, "wb") as f:
        for t in _tensors(model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if not t.HasField("raw_data"):  # typed fields (float_data, ...) -> raw bytes, so they can move out
                from onnx import numpy_helper

                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            if len(t.raw_data) < min_bytes:
                continue
            offset = f.tell()
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(t.raw_data)
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_onnx(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a path with ``path``'s file name in a temp folder beside it; on success move it into place.

    Write the model (and its ``<name>.data``) there, check it, and leave the block: data files are moved
    first, the model last (``os.replace``, same file system). On error nothing at ``path`` changes.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        staged = tmp / target.name
        yield staged
        if not staged.is_file():
            raise InputError(f"nothing was written to {staged}; the stage must write the model it promised")
        for f in sorted(tmp.rglob("*")):
            if f == staged or not f.is_file():
                continue
            dest = target.parent / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, dest)
        with open(staged, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_onnx(model: "onnx.ModelProto", path: str | os.PathLike[str], *, external_data: bool | None = None,
              threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``model`` atomically. Weights go to ``<name>.data`` beside it when ``external_data`` is True, or
    (None) when the serialised model would be ``threshold`` bytes or more. The proto must hold its weights (not external references)."""
    import onnx

    p = Path(path)
    if external_tensors(model):
        raise InputError(f"cannot save {p}: the model still references external data; load it with weights=True first")
    use_external = external_data if external_data is not None else model.ByteSize() >= threshold
    out = onnx.ModelProto()
    out.CopyFrom(model)
    with staged_onnx(p) as staged:
        if use_external:
            _externalise(out, f"{p.name}.data", staged.with_name(f"{p.name}.data"))
        data = out.SerializeToString()
        if len(data) >= PROTOBUF_LIMIT:
            raise InputError(f"{p}: the graph alone is {len(data) / 1024**3:.2f} GiB, over protobuf's 2 GiB limit")
        staged.write_bytes(data)
    return p


def copy_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy an ONNX file and every external-data file it names (checked first) to ``dst``'s folder, atomically.

    The data files keep their names (the model refers to them by name), so two models copied into one folder
    must not share a data-file name; that is refused rather than overwritten.
    """
    s, d = Path(src), Path(dst)
    proto = load_onnx(s)
    files = check_external_data(proto, s.parent, str(s))
    with staged_onnx(d) as staged:
        for f in files:
            rel = f.relative_to(s.parent.resolve()) if f.is_absolute() else f
            target = staged.parent / rel
            if (d.parent / rel).exists() and (d.parent / rel).resolve() != (s.parent / rel).resolve():
                existing = d.parent / rel
                if atomic.sha256_file(existing) != atomic.sha256_file(f):
                    raise InputError(f"{existing} already exists with other contents; {d} needs its own data file name "
                                     "(re-export the model under another file name)")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        shutil.copyfile(s, staged)
    return d


__all__ = ["ArtifactMetadata", "EXTERNAL_DATA_THRESHOLD", "FLAVOURS", "InputSpec", "OnnxArtifact", "PRECISIONS",
           "TensorInfo", "check_external_data", "copy_onnx", "external_files", "external_tensors", "graph_inputs",
           "graph_outputs", "load_onnx", "open_artifact", "parse_onnx", "read_metadata", "save_onnx", "staged_onnx",
           "write_metadata"]
