"""A Triton model repository: ``REPO/<model>/config.pbtxt`` + ``REPO/<model>/<version>/model.onnx|model.plan``.

``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
and ``google.protobuf.text_format``, so a repository that loads here loads on NVIDIA Triton and the other
way round. Like Triton, the config may leave out inputs/outputs; they are completed from the model, and
any that are given are checked against the model (names, datatypes, dims) with errors that say what to fix.

Labels for the classification extension come from an output's ``label_filename`` (a file beside
config.pbtxt, one label per line: Triton's convention) or else from the ONNX model's ``labels``
metadata_prop (a JSON list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from resdeploy.errors import InputError
from resdeploy.serve.protocol import IOSpec, config_dtype_to_triton, triton_dtype, triton_to_config_dtype

CONFIG_NAME = "config.pbtxt"
# config.pbtxt ``parameters`` key naming the engine resdeploy serve runs an ONNX model with (written by
# `resdeploy repo`/`run` from the engine chosen by measurement); Triton ignores it.
BACKEND_PARAMETER = "resdeploy_backend"
PARAMETER_BACKENDS = ("onnxruntime", "openvino")


def backend_parameter(config: Any) -> str | None:
    """The CPU engine a config's ``parameters`` ask resdeploy serve to use; ``None`` when it names none or an instance
    group asks for a GPU (the engine was chosen among CPU engines)."""
    p = config.parameters.get(BACKEND_PARAMETER) if hasattr(config, "parameters") else None
    if p is None or not p.string_value:
        return None
    if any(_pb().ModelInstanceGroup.Kind.Name(g.kind) == "KIND_GPU" for g in config.instance_group):
        return None
    if p.string_value not in PARAMETER_BACKENDS:
        raise InputError(f"config parameter {BACKEND_PARAMETER} = {p.string_value!r}; use one of "
                         f"{', '.join(PARAMETER_BACKENDS)} (or remove it for the automatic choice)")
    return p.string_value
# Triton's default file name and platform per backend.
PLATFORMS = {".onnx": ("model.onnx", "onnxruntime_onnx", "onnxruntime"),
             ".plan": ("model.plan", "tensorrt_plan", "tensorrt")}


def _pb():  # noqa: ANN202 - protobuf module
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # the grpc extra brings it
        raise InputError(f"reading config.pbtxt needs Triton's ModelConfig schema: {exc}; "
                         "install `pip install 'tritonclient[grpc]'`") from None
    return model_config_pb2


def read_config(path: str | Path) -> Any:
    """Parse a config.pbtxt into a ``ModelConfig`` message; a syntax error names the file and line."""
    from google.protobuf import text_format

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    try:
        return text_format.Parse(text, _pb().ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(f"{path}: {exc}; expected Triton ModelConfig text format "
                         "(https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto)") from None


def config_to_json(config: Any) -> dict[str, Any]:
    """Triton's JSON form of a ModelConfig (``GET /v2/models/<m>/config``): proto field names, every field printed,
    and 64-bit integers as JSON numbers rather than protobuf's strings (Triton's ModelConfigToJson fix-up)."""
    from google.protobuf import json_format

    d = json_format.MessageToDict(config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _fix_int64(config.DESCRIPTOR, d)
    return d


def _fix_int64(descriptor: Any, obj: dict[str, Any]) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    int64 = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64}
    for fd in descriptor.fields:
        if fd.name not in obj:
            continue
        v = obj[fd.name]
        if fd.type in int64:
            obj[fd.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
        elif fd.type == F.TYPE_MESSAGE:
            msg = fd.message_type
            if msg.GetOptions().map_entry:
                val_fd = msg.fields_by_name["value"]
                for k in list(v):
                    if val_fd.type in int64:
                        v[k] = int(v[k])
                    elif val_fd.type == F.TYPE_MESSAGE:
                        _fix_int64(val_fd.message_type, v[k])
            elif isinstance(v, list):
                for x in v:
                    _fix_int64(msg, x)
            elif isinstance(v, dict):
                _fix_int64(msg, v)


@dataclass
class ModelEntry:
    """One model version found in the repository, before or after loading."""

    name: str
    version: str
    dir: Path
    artifact: Path | None
    config: Any  # ModelConfig
    versions_available: list[str] = field(default_factory=list)
    error: str | None = None  # why it cannot be served (reported by /ready and in the log)


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def _selected_versions(config: Any, available: list[int]) -> list[int]:
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return available
    if policy == "specific":
        return [v for v in config.version_policy.specific.versions if v in available]
    n = config.version_policy.latest.num_versions if policy == "latest" else 1
    return available[-max(1, n):]


def scan_repository(repo: str | Path) -> list[ModelEntry]:
    """Every servable (model, version) in ``repo``; a model that cannot be read is returned with ``error`` set."""
    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(f"model repository {repo} is not a folder; expected REPO/<model>/config.pbtxt and "
                         "REPO/<model>/<version>/model.onnx (make one with `resdeploy repo MODEL.onnx --out REPO`)")
    entries: list[ModelEntry] = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = model_dir.name
        cfg_path = model_dir / CONFIG_NAME
        if not cfg_path.is_file():
            entries.append(ModelEntry(name, "1", model_dir, None, _pb().ModelConfig(name=name),
                                      error=f"{cfg_path} is missing; every model folder needs a config.pbtxt"))
            continue
        try:
            config = read_config(cfg_path)
        except InputError as exc:
            entries.append(ModelEntry(name, "1", model_dir, None, _pb().ModelConfig(name=name), error=str(exc)))
            continue
        if config.name and config.name != name:
            entries.append(ModelEntry(name, "1", model_dir, None, config,
                                      error=f"{cfg_path} says name '{config.name}' but the folder is '{name}'; "
                                            "Triton requires them to match"))
            continue
        config.name = name
        available = _versions(model_dir)
        if not available:
            entries.append(ModelEntry(name, "1", model_dir, None, config,
                                      error=f"{model_dir} has no numeric version folder; expected {model_dir}/1/model.onnx"))
            continue
        chosen = _selected_versions(config, available)
        if not chosen:
            entries.append(ModelEntry(name, str(available[-1]), model_dir, None, config,
                                      error=f"{cfg_path}: version_policy selects none of the versions {available}"))
            continue
        for v in chosen:
            artifact, err = _find_artifact(model_dir / str(v), config)
            entries.append(ModelEntry(name, str(v), model_dir, artifact, config,
                                      versions_available=[str(x) for x in chosen], error=err))
    return entries


def _find_artifact(version_dir: Path, config: Any) -> tuple[Path | None, str | None]:
    if config.default_model_filename:
        p = version_dir / config.default_model_filename
        return (p, None) if p.is_file() else (None, f"{p} is missing (default_model_filename in config.pbtxt)")
    wanted = [PLATFORMS[".onnx"][0], PLATFORMS[".plan"][0]]
    if config.platform == "tensorrt_plan" or config.backend == "tensorrt":
        wanted = [PLATFORMS[".plan"][0]]
    elif config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        wanted = [PLATFORMS[".onnx"][0]]
    for fname in wanted:
        if (version_dir / fname).is_file():
            return version_dir / fname, None
    return None, f"{version_dir} has no {' or '.join(wanted)}; export one with `resdeploy export` / `resdeploy engine`"


# -- config vs model ------------------------------------------------------------------------------------
def complete_config(config: Any, runner_inputs: list[Any], runner_outputs: list[Any], runner_max_batch: int | None,
                    artifact: Path) -> list[str]:
    """Fill platform/backend/inputs/outputs from the runner's metadata (Triton's auto-complete) and check what the
    config states against it. Returns nothing; raises InputError naming the field, what came and what was expected."""
    where = f"model '{config.name}' (config.pbtxt)"
    fname, platform, backend = PLATFORMS.get(artifact.suffix, (artifact.name, "", ""))
    if not config.platform and not config.backend:
        config.platform, config.backend = platform, backend
    elif not config.backend:
        config.backend = backend
    mbs = config.max_batch_size
    if mbs < 0:
        raise InputError(f"{where}: max_batch_size is {mbs}; expected 0 (no batching) or a positive batch limit")
    if mbs > 0:
        for s in runner_inputs:
            if not s.shape or s.shape[0] is not None:
                raise InputError(f"{where}: max_batch_size is {mbs} but the model's input {s} has no dynamic batch axis; "
                                 "set max_batch_size: 0 or re-export with a dynamic batch axis")
        if runner_max_batch and mbs > runner_max_batch:
            raise InputError(f"{where}: max_batch_size {mbs} exceeds the engine's maximum batch {runner_max_batch}; "
                             f"set max_batch_size <= {runner_max_batch} or rebuild the engine with a larger profile")
    _complete_ios(config.input, runner_inputs, mbs, "input", where)
    _complete_ios(config.output, runner_outputs, mbs, "output", where)
    return []


def _model_dims(spec: Any, mbs: int) -> list[int]:
    dims = [-1 if d is None else int(d) for d in spec.shape]
    return dims[1:] if mbs > 0 else dims


def _complete_ios(ios: Any, specs: list[Any], mbs: int, kind: str, where: str) -> None:
    by_name = {s.name: s for s in specs}
    if len(ios) == 0:
        for s in specs:
            io = ios.add()
            io.name = s.name
            io.data_type = _pb().DataType.Value(triton_to_config_dtype(triton_dtype(s.dtype)))
            io.dims.extend(_model_dims(s, mbs))
        return
    for io in ios:
        if io.name not in by_name:
            raise InputError(f"{where}: {kind} '{io.name}' is not in the model, whose {kind}s are "
                             f"{', '.join(str(s) for s in specs)}; fix the name in config.pbtxt")
        s = by_name[io.name]
        got = config_dtype_to_triton(_pb().DataType.Name(io.data_type))
        want = triton_dtype(s.dtype)
        if got != want:
            raise InputError(f"{where}: {kind} '{io.name}' has data_type {_pb().DataType.Name(io.data_type)} but the model "
                             f"has {triton_to_config_dtype(want)}; fix data_type in config.pbtxt")
        dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
        model = _model_dims(s, mbs)
        if len(dims) != len(model) or any(a != -1 and b != -1 and a != b for a, b in zip(dims, model)):
            hint = " (with max_batch_size > 0, dims leave out the batch axis)" if mbs > 0 else ""
            raise InputError(f"{where}: {kind} '{io.name}' has dims {dims} but the model has {model}{hint}; fix dims in config.pbtxt")
    if kind == "input":
        missing = sorted(set(by_name) - {io.name for io in ios})
        if missing:
            raise InputError(f"{where}: the model's inputs {missing} are not in config.pbtxt; list every input or none")


def io_specs(ios: Any, mbs: int) -> list[IOSpec]:
    """Published I/O (model metadata): the batch axis is -1 when the model batches."""
    out = []
    for io in ios:
        dims = tuple(int(d) for d in (io.reshape.shape if io.HasField("reshape") else io.dims))
        out.append(IOSpec(io.name, config_dtype_to_triton(_pb().DataType.Name(io.data_type)), ((-1,) if mbs > 0 else ()) + dims))
    return out


def instance_count(config: Any) -> int:
    return max(1, sum(max(1, g.count) for g in config.instance_group)) if len(config.instance_group) else 1


def wants_cpu(config: Any) -> bool:
    """True when every instance group asks for KIND_CPU (then ONNX Runtime runs on the CPU even with a GPU)."""
    kinds = {_pb().ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
    return bool(kinds) and kinds <= {"KIND_CPU"}


def read_labels(entry: ModelEntry, artifact_labels: Sequence[str] = ()) -> dict[str, list[str]]:
    """Labels per output name: ``label_filename`` files first, else the labels the artifact carries (the runner's
    ``labels``, from the ONNX metadata) for the first output."""
    labels: dict[str, list[str]] = {}
    for out in entry.config.output:
        if out.label_filename:
            path = entry.dir / out.label_filename
            try:
                labels[out.name] = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except OSError as exc:
                raise InputError(f"model '{entry.name}': label_filename {path} cannot be read ({exc}); "
                                 "put the file beside config.pbtxt, one label per line") from None
    if artifact_labels and entry.config.output and entry.config.output[0].name not in labels:
        labels[entry.config.output[0].name] = [str(x) for x in artifact_labels]
    return labels


__all__ = ["CONFIG_NAME", "ModelEntry", "PLATFORMS", "complete_config", "config_to_json", "instance_count", "io_specs",
           "read_config", "read_labels", "scan_repository", "wants_cpu"]
