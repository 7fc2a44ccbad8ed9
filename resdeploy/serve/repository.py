"""A Triton model repository: ``REPO/<model>/config.pbtxt`` + ``REPO/<model>/<version>/model.onnx|model.plan``.

``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
and ``google.protobuf.text_format``, so a repository that loads here loads on NVIDIA Triton and the other
way round. Like Triton, the config may leave out inputs/outputs; they are completed from the model, and
any that are given are checked against the model (names, datatypes, dims) with errors that say what to fix.

Labels for the classification extension come from an output's ``label_filename`` (a file beside
config.pbtxt, one label per line: Triton's convention) or else from the ONNX model's ``labels``
metadata_prop (a JSON list).

A repository is not trusted to stay inside itself. Every path it names (``label_filename``,
``default_model_filename``, ``cc_model_filenames``, version folders, the model folder and config.pbtxt)
must be a plain relative name without ``..`` that still lies inside its model's folder once symlinks are
resolved; one that leaves it is refused (that model version is not served, the reason is in the log and
its ready/metadata answers) unless ``follow_symlinks`` is set, and each one followed is logged. An ONNX
model's external-data locations are checked by :func:`check_artifact` (:func:`resdeploy.artifact.load_onnx`)
before any runtime opens the file. Whatever goes wrong with one model (unreadable, not UTF-8, invalid) becomes that
model's ``error``; the scan never raises for one model's files.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resdeploy.errors import InputError
from resdeploy.serve.protocol import IOSpec, config_dtype_to_triton, triton_dtype, triton_to_config_dtype

log = logging.getLogger("resdeploy.serve")

CONFIG_NAME = "config.pbtxt"
MAX_CONFIG_BYTES = 4 << 20  # a config.pbtxt is a few KiB; a bigger one is a mistake (or /dev/zero behind a symlink)
MAX_LABEL_BYTES = 64 << 20  # 1,000 ImageNet labels take 30 KiB
_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
# config.pbtxt ``parameters`` naming the engine resdeploy serve runs an ONNX model with, and that engine's settings
# as a JSON object (written by `resdeploy repo`/`run` from the engine configuration chosen by measurement); Triton
# passes them to its backend, which ignores keys it does not know.
BACKEND_PARAMETER = "resdeploy_backend"
OPTIONS_PARAMETER = "resdeploy_backend_options"
PARAMETER_BACKENDS = ("onnxruntime", "openvino")


def _on_gpu(config: Any) -> bool:
    return any(_pb().ModelInstanceGroup.Kind.Name(g.kind) == "KIND_GPU" for g in config.instance_group)


def backend_parameter(config: Any) -> str | None:
    """The CPU engine a config's ``parameters`` ask resdeploy serve to use; ``None`` when it names none or an instance
    group asks for a GPU (the engine was chosen among CPU engines)."""
    p = config.parameters.get(BACKEND_PARAMETER) if hasattr(config, "parameters") else None
    if p is None or not p.string_value:
        return None
    if _on_gpu(config):
        return None
    if p.string_value not in PARAMETER_BACKENDS:
        raise InputError(f"config parameter {BACKEND_PARAMETER} = {p.string_value!r}; use one of "
                         f"{', '.join(PARAMETER_BACKENDS)} (or remove it for the automatic choice)")
    return p.string_value


def backend_options(config: Any) -> dict[str, Any]:
    """The settings of the engine ``resdeploy_backend`` names, from ``resdeploy_backend_options`` (a JSON object),
    checked and completed with the runner's defaults ({} when the config names no engine). InputError names the
    parameter, what is wrong and the fix."""
    import json

    from resdeploy.engines import check_settings

    p = config.parameters.get(OPTIONS_PARAMETER) if hasattr(config, "parameters") else None
    backend = backend_parameter(config)
    if p is None or not p.string_value:
        return check_settings(backend, {}) if backend else {}
    if backend is None:
        if _on_gpu(config):
            return {}
        raise InputError(f"config parameter {OPTIONS_PARAMETER} is set but {BACKEND_PARAMETER} is not: name the engine "
                         f"they are for ({', '.join(PARAMETER_BACKENDS)}) or remove {OPTIONS_PARAMETER}")
    where = f"config parameter {OPTIONS_PARAMETER}"
    try:
        options = json.loads(p.string_value)
    except ValueError as exc:
        raise InputError(f"{where} is not JSON ({exc}); write an object such as "
                         '{"precision_hint": "f32", "performance_hint": "LATENCY"}, or remove it for the defaults') from None
    try:
        return check_settings(backend, options, where)
    except InputError as exc:
        raise InputError(f"{exc}; fix it or remove {OPTIONS_PARAMETER} for the {backend} runner's defaults") from None


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


def _read_small_text(path: Path, limit: int, what: str) -> str:
    """A regular file's text as UTF-8, refusing FIFOs/devices (a read would block or never end) and huge files."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is not a regular file; put a plain text file there")
        if st.st_size > limit:
            raise InputError(f"{what} {path} is {st.st_size} bytes; the limit is {limit}. Is it the right file?")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc}); check the file and its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text ({exc}); save it as UTF-8") from None


def read_config(path: str | Path) -> Any:
    """Parse a config.pbtxt into a ``ModelConfig`` message; a syntax error names the file and line."""
    from google.protobuf import text_format

    path = Path(path)
    text = _read_small_text(path, MAX_CONFIG_BYTES, "config")
    try:
        return text_format.Parse(text, _pb().ModelConfig())
    except (text_format.ParseError, RecursionError, ValueError) as exc:
        raise InputError(f"{path}: {str(exc)[:500]}; expected Triton ModelConfig text format "
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
    follow_symlinks: bool = False  # the scan's setting, which read_labels applies too


# -- paths the repository names ---------------------------------------------------------------------------
def _plain_name(name: str, what: str, where: str) -> Path:
    """A relative name without '..': the lexical half of the containment rule."""
    rel = Path(name)
    if not name or "\0" in name or rel.is_absolute() or ".." in rel.parts or rel == Path("."):
        raise InputError(f"{where}: {what} {name!r} must be a file name relative to the model's folder, without '..' "
                         "or an absolute path; refusing it. Put the file inside the model's folder")
    return rel


def contained(path: Path, folder: Path, what: str, where: str, follow_symlinks: bool) -> Path:
    """``path`` if it resolves inside ``folder``; else InputError, or (``follow_symlinks``) a logged warning."""
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InputError(f"{where}: {what} {path} cannot be resolved ({exc}); fix the symlink") from None
    if real == root or root in real.parents:
        return path
    if follow_symlinks:
        log.warning("%s: %s %s resolves to %s, outside %s; following it because of --follow-symlinks",
                    where, what, path, real, root)
        return path
    raise InputError(f"{where}: {what} {path} resolves to {real}, outside {root} (a symlink leaving it); refusing it. "
                     "Copy the file into the model's folder, or start the server with --follow-symlinks to allow it")


def _versions(model_dir: Path) -> list[int]:
    # ASCII digits only, and no leading zeros beyond '0' itself: '01' and '1' would be one version twice.
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if _VERSION.fullmatch(p.name) and not p.name.startswith("0") and p.is_dir())


def _selected_versions(config: Any, available: list[int]) -> list[int]:
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return available
    if policy == "specific":
        return [v for v in config.version_policy.specific.versions if v in available]
    n = config.version_policy.latest.num_versions if policy == "latest" else 1
    return available[-max(1, n):]


def scan_repository(repo: str | Path, *, follow_symlinks: bool = False) -> list[ModelEntry]:
    """Every servable (model, version) in ``repo``; a model that cannot be read is returned with ``error`` set.

    Only a missing repository raises; anything wrong inside one model folder is that model's ``error``.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(f"model repository {repo} is not a folder; expected REPO/<model>/config.pbtxt and "
                         "REPO/<model>/<version>/model.onnx (make one with `resdeploy repo MODEL.onnx --out REPO`)")
    entries: list[ModelEntry] = []
    try:
        model_dirs = sorted(p for p in repo.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as exc:
        raise InputError(f"cannot list model repository {repo}: {exc}; check its permissions") from None
    for model_dir in model_dirs:
        name = model_dir.name
        try:
            entries += _scan_model(repo, model_dir, follow_symlinks)
        except Exception as exc:  # one model's files must never take the server down: report, serve the rest
            reason = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            entries.append(ModelEntry(name, "1", model_dir, None, _pb().ModelConfig(name=name), error=reason[:2000],
                                      follow_symlinks=follow_symlinks))
    return entries


def scan_model(repo: str | Path, name: str, *, follow_symlinks: bool = False, config: Any = None) -> list[ModelEntry]:
    """The servable versions of one model (``load`` in explicit model control); ``config`` replaces its config.pbtxt.

    A name that is not a model folder of ``repo`` raises InputError; anything wrong inside the folder is the
    entries' ``error``, as in :func:`scan_repository`.
    """
    repo = Path(repo)
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name or name in ("..",) \
            or not (repo / name).is_dir():
        raise InputError(f"failed to load '{name[:200]}': no model folder of that name in the repository {repo}; "
                         "expected REPO/<model>/config.pbtxt (POST /v2/repository/index lists the models)")
    model_dir = repo / name
    try:
        return _scan_model(repo, model_dir, follow_symlinks, config)
    except Exception as exc:  # as in scan_repository: the model's error, never the server's
        reason = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        return [ModelEntry(name, "1", model_dir, None, _pb().ModelConfig(name=name), error=reason[:2000],
                           follow_symlinks=follow_symlinks)]


def repository_models(repo: str | Path) -> list[str]:
    """The model folder names in ``repo`` (what Triton's repository index lists in explicit model control)."""
    try:
        return sorted(p.name for p in Path(repo).iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as exc:
        raise InputError(f"cannot list model repository {repo}: {exc}; check its permissions") from None


def _scan_model(repo: Path, model_dir: Path, follow: bool, override: Any = None) -> list[ModelEntry]:
    name = model_dir.name
    where = f"model '{name}'"
    contained(model_dir, repo, "model folder", where, follow)
    cfg_path = model_dir / CONFIG_NAME
    if override is not None:  # a load request's "config" parameter replaces config.pbtxt, as on Triton
        config = override
    else:
        if not cfg_path.exists():  # a FIFO or device is not "missing": read_config says what it is
            raise InputError(f"{cfg_path} is missing; every model folder needs a config.pbtxt")
        contained(cfg_path, model_dir, CONFIG_NAME, where, follow)
        config = read_config(cfg_path)
    if config.name and config.name != name:
        return [ModelEntry(name, "1", model_dir, None, config, follow_symlinks=follow,
                           error=f"{cfg_path} says name '{config.name}' but the folder is '{name}'; "
                                 "Triton requires them to match")]
    config.name = name
    for out in config.output:  # checked now so a bad label path is reported before anything loads
        if out.label_filename:
            label = model_dir / _plain_name(out.label_filename, "label_filename", f"{where} output '{out.name}'")
            contained(label, model_dir, "label_filename", f"{where} output '{out.name}'", follow)
    if config.default_model_filename:
        _plain_name(config.default_model_filename, "default_model_filename", where)
    for cc, fname in config.cc_model_filenames.items():
        _plain_name(fname, f"cc_model_filenames[{cc!r}]", where)
    available = _versions(model_dir)
    if not available:
        raise InputError(f"{model_dir} has no numeric version folder; expected {model_dir}/1/model.onnx")
    chosen = _selected_versions(config, available)
    if not chosen:
        return [ModelEntry(name, str(available[-1]), model_dir, None, config, follow_symlinks=follow,
                           error=f"{cfg_path}: version_policy selects none of the versions {available}")]
    entries = []
    for v in chosen:
        try:
            version_dir = contained(model_dir / str(v), model_dir, "version folder", where, follow)
            artifact = _find_artifact(version_dir, config, where, follow)
            err = None
        except InputError as exc:
            artifact, err = None, str(exc)
        entries.append(ModelEntry(name, str(v), model_dir, artifact, config, follow_symlinks=follow,
                                  versions_available=[str(x) for x in chosen], error=err))
    return entries


def _find_artifact(version_dir: Path, config: Any, where: str = "model", follow: bool = False) -> Path:
    """The model file of one version, checked to lie inside the version folder (ONNX: external data too)."""
    for cc, fname in config.cc_model_filenames.items():  # not loaded by resdeploy, but never allowed to point out
        p = version_dir / fname
        if p.exists() or p.is_symlink():
            contained(p, version_dir, f"cc_model_filenames[{cc!r}]", where, follow)
    if config.default_model_filename:
        p = version_dir / _plain_name(config.default_model_filename, "default_model_filename", where)
        if not p.is_file():
            raise InputError(f"{p} is missing (default_model_filename in config.pbtxt)")
        return _checked_artifact(contained(p, version_dir, "default_model_filename", where, follow), version_dir, where, follow)
    wanted = [PLATFORMS[".onnx"][0], PLATFORMS[".plan"][0]]
    if config.platform == "tensorrt_plan" or config.backend == "tensorrt":
        wanted = [PLATFORMS[".plan"][0]]
    elif config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        wanted = [PLATFORMS[".onnx"][0]]
    for fname in wanted:
        p = version_dir / fname
        if p.is_file():
            return _checked_artifact(contained(p, version_dir, "model file", where, follow), version_dir, where, follow)
    raise InputError(f"{version_dir} has no {' or '.join(wanted)}; export one with `resdeploy export` / `resdeploy build`")


def _checked_artifact(path: Path, version_dir: Path, where: str, follow: bool) -> Path:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError(f"{where}: model file {path} is not a regular file")
    return path


def check_artifact(entry: ModelEntry) -> None:
    """Before a runtime opens ``entry``'s ONNX file: its external-data locations stay inside its folder.

    The server checks this itself rather than trusting whichever onnxruntime version is installed to refuse
    ``../../etc/shadow``, a symlink or an offset past the end (graph only: the weights are not read here).
    Plans are checked by their runtime against the sidecar written at build time (docs/security.md).
    """
    if entry.artifact is None or entry.artifact.suffix != ".onnx":
        return
    from resdeploy.artifact import load_onnx

    try:
        load_onnx(entry.artifact)
    except InputError as exc:
        raise InputError(f"could not load: {exc}") from None


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
            # The labels go back to any client, so the file must be the model's own: inside its folder.
            where = f"model '{entry.name}' output '{out.name}'"
            path = entry.dir / _plain_name(out.label_filename, "label_filename", where)
            contained(path, entry.dir, "label_filename", where, entry.follow_symlinks)
            try:
                text = _read_small_text(path, MAX_LABEL_BYTES, "label_filename")
            except InputError as exc:
                raise InputError(f"model '{entry.name}': {exc}; put the file beside config.pbtxt, one label per line") from None
            labels[out.name] = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if artifact_labels and entry.config.output and entry.config.output[0].name not in labels:
        labels[entry.config.output[0].name] = [str(x) for x in artifact_labels]
    return labels


# -- Triton's config rules: what it refuses and what it fills in -------------------------------------------
MAX_WARMUP_BYTES = 256 << 20  # one warm-up sample's input; a config cannot make the server allocate more


def check_config(config: Any, gpu_count: int) -> None:
    """Refuse what Triton refuses before loading (InputError naming the field and the fix), and give a config
    without instance groups Triton's default one (named after the model), and groups without a count Triton's
    default count (2 instances on the CPU, 1 per GPU)."""
    pb = _pb()
    where = f"model '{config.name}' (config.pbtxt)"
    mbs = config.max_batch_size
    if config.HasField("dynamic_batching"):
        over = [b for b in config.dynamic_batching.preferred_batch_size if b > mbs or b < 1]
        if over and mbs > 0:
            raise InputError(f"{where}: dynamic_batching preferred_batch_size {list(over)} must be 1..max_batch_size "
                             f"({mbs}); Triton refuses it too. Lower them or raise max_batch_size")
    if not len(config.instance_group):
        g = config.instance_group.add(name=config.name, count=1 if gpu_count else 2)
        g.kind = pb.ModelInstanceGroup.KIND_AUTO  # resolved once a runner says where it runs
    for i, g in enumerate(config.instance_group):
        label = g.name or f"{config.name}_{i}"
        if g.kind == pb.ModelInstanceGroup.KIND_GPU:
            if not gpu_count:
                raise InputError(f"{where}: instance group '{label}' is KIND_GPU but this machine has no CUDA GPU; "
                                 "Triton refuses it too. Use KIND_CPU or KIND_AUTO, or serve on a machine with a GPU")
            bad = [d for d in g.gpus if not 0 <= d < gpu_count]
            if bad:
                raise InputError(f"{where}: instance group '{label}' names GPUs {bad} but this machine has GPUs "
                                 f"0..{gpu_count - 1}; fix gpus in config.pbtxt")
        elif len(g.gpus) and g.kind == pb.ModelInstanceGroup.KIND_CPU:
            raise InputError(f"{where}: instance group '{label}' is KIND_CPU but names GPUs {list(g.gpus)}; "
                             "drop gpus or use KIND_GPU")
        if g.count < 0:
            raise InputError(f"{where}: instance group '{label}' has count {g.count}; expected at least 1")
        if g.count == 0:  # Triton's default count: 2 instances on the CPU, 1 per GPU
            on_cpu = g.kind == pb.ModelInstanceGroup.KIND_CPU or (g.kind == pb.ModelInstanceGroup.KIND_AUTO and not gpu_count)
            g.count = 2 if on_cpu else 1
    try:  # the engine and settings resdeploy serve runs it with (Triton ignores them): refused before any loading
        backend_options(config)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def normalize_config(config: Any, artifact: Path, on_gpu: bool, gpu_count: int) -> None:
    """Fill the defaults Triton's auto-complete fills, so ``/config`` reads as it does on Triton: platform and
    backend, runtime, version_policy, default_model_filename, pinned-memory optimization, preferred_batch_size,
    instance group names, kinds and counts. Idempotent (the versions of a model share one config)."""
    pb = _pb()
    fname, platform, backend = PLATFORMS.get(artifact.suffix, (artifact.name, "", ""))
    if not config.platform and config.backend in ("", backend):
        config.platform = platform
    if not config.backend:
        config.backend = backend
    if not config.runtime and config.backend:
        config.runtime = f"libtriton_{config.backend}.so"
    if config.version_policy.WhichOneof("policy_choice") is None:
        config.version_policy.latest.num_versions = 1
    if not config.default_model_filename:
        config.default_model_filename = fname
    opt = config.optimization
    if not opt.HasField("input_pinned_memory"):
        opt.input_pinned_memory.enable = True
    if not opt.HasField("output_pinned_memory"):
        opt.output_pinned_memory.enable = True
    if config.HasField("dynamic_batching") and config.max_batch_size > 0 and not len(config.dynamic_batching.preferred_batch_size):
        config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if not len(config.instance_group):
        config.instance_group.add(name=config.name, count=1 if on_gpu else 2)
    for i, g in enumerate(config.instance_group):
        g.count = max(1, g.count)
        if not g.name:
            g.name = f"{config.name}_{i}"
        if g.kind == pb.ModelInstanceGroup.KIND_AUTO:
            g.kind = pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU
        if g.kind == pb.ModelInstanceGroup.KIND_GPU and not len(g.gpus):
            g.gpus.extend(range(max(1, gpu_count)))


def warmup_samples(entry: ModelEntry, inputs: list[IOSpec]) -> list[tuple[str, dict[str, Any], int]]:
    """The config's ``model_warmup`` as (name, feed, times to run), each checked like a request against the
    model's inputs. A sample Triton would refuse (unknown or missing input, wrong datatype or dims, batch over
    max_batch_size, no data, a data file of the wrong size or outside ``<model>/warmup/``) raises InputError,
    and the model is not served, as on Triton."""
    import numpy as np

    from resdeploy.serve.protocol import DATATYPES, InferRequest, check_inputs

    config = entry.config
    pb = _pb()
    mbs = config.max_batch_size
    out = []
    for k, w in enumerate(config.model_warmup):
        where = f"model '{entry.name}' model_warmup '{w.name or k}'"
        batch = w.batch_size
        if batch < 1 or (mbs == 0 and batch != 1) or (mbs > 0 and batch > mbs):
            raise InputError(f"{where}: batch_size is {batch}; expected 1..{max(1, mbs)} (max_batch_size {mbs})")
        feed: dict[str, Any] = {}
        rng = np.random.default_rng(k)
        for name, inp in w.inputs.items():
            datatype = config_dtype_to_triton(pb.DataType.Name(inp.data_type))
            if datatype not in DATATYPES:
                raise InputError(f"{where}: input '{name}' has data_type {pb.DataType.Name(inp.data_type)}, which "
                                 "resdeploy cannot make data for; use one of the model's datatypes")
            dims = [int(d) for d in inp.dims]
            if any(d < 0 for d in dims):
                raise InputError(f"{where}: input '{name}' dims {dims} must all be given (no -1) for warm-up data")
            shape = ((batch,) if mbs > 0 else ()) + tuple(dims)
            count = int(np.prod(shape, dtype=np.int64))
            dtype = DATATYPES[datatype]
            size = count * (4 if datatype == "BYTES" else dtype.itemsize)
            if size > MAX_WARMUP_BYTES:
                raise InputError(f"{where}: input '{name}' of shape {list(shape)} needs {size} bytes; warm-up samples "
                                 f"are limited to {MAX_WARMUP_BYTES}")
            kind = inp.WhichOneof("input_data_type")
            if kind == "zero_data":
                arr = np.full(shape, b"", dtype=object) if datatype == "BYTES" else np.zeros(shape, dtype)
            elif kind == "random_data":
                if datatype == "BYTES":
                    arr = np.full(shape, b"", dtype=object)
                elif dtype.kind == "f":
                    arr = rng.standard_normal(shape).astype(dtype)
                elif dtype.kind == "b":
                    arr = rng.integers(0, 2, shape).astype(dtype)
                else:
                    info = np.iinfo(dtype)
                    arr = rng.integers(max(info.min, -128), min(info.max, 127), shape, endpoint=True).astype(dtype)
            elif kind == "input_data_file":
                arr = _warmup_file(entry, inp.input_data_file, dims, dtype, datatype, where, name)
                if mbs > 0:
                    arr = np.repeat(arr[None], batch, axis=0)  # Triton sends the sample batch_size times
            else:
                raise InputError(f"{where}: input '{name}' has no data; set zero_data, random_data or input_data_file")
            feed[name] = arr
        try:
            check_inputs(InferRequest(None, feed, None), inputs, entry.name, mbs)
        except InputError as exc:
            raise InputError(f"{where} is not a valid request for the model: {exc}; fix model_warmup in config.pbtxt "
                             "(Triton refuses the model too)") from None
        out.append((w.name or str(k), feed, max(1, w.count)))
    return out


def _warmup_file(entry: ModelEntry, fname: str, dims: list[int], dtype: Any, datatype: str, where: str, name: str) -> Any:
    import numpy as np

    from resdeploy.serve.protocol import decode_bytes_tensor

    folder = entry.dir / "warmup"
    path = folder / _plain_name(fname, "input_data_file", where)
    contained(path, folder, "input_data_file", where, entry.follow_symlinks)
    if not path.is_file():
        raise InputError(f"{where}: input '{name}' data file {path} is missing; put it in {folder}")
    count = int(np.prod(dims, dtype=np.int64))
    want = None if datatype == "BYTES" else count * dtype.itemsize
    limit = MAX_WARMUP_BYTES if want is None else want
    size = path.stat().st_size
    if size > limit or (want is not None and size != want):
        raise InputError(f"{where}: input '{name}' data file {path} has {size} bytes; expected "
                         f"{want if want is not None else f'at most {limit}'} for dims {dims} of {datatype}")
    data = path.read_bytes()
    if datatype == "BYTES":
        try:
            return decode_bytes_tensor(memoryview(data), count, name).reshape(dims)
        except InputError as exc:
            raise InputError(f"{where}: data file {path}: {exc}") from None
    return np.frombuffer(data, dtype).reshape(dims).copy()


__all__ = ["CONFIG_NAME", "ModelEntry", "PLATFORMS", "check_artifact", "complete_config", "config_to_json", "contained", "instance_count",
           "io_specs", "check_config", "normalize_config", "read_config", "read_labels", "repository_models", "scan_model",
           "scan_repository", "wants_cpu", "warmup_samples"]
