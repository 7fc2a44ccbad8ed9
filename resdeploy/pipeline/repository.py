"""Make a Triton model repository: ``REPO/<model>/config.pbtxt`` + ``REPO/<model>/<version>/model.onnx|model.plan``.

The config is built with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
and written with ``text_format``, so the repository runs unchanged on NVIDIA Triton as well as on
``resdeploy serve`` (the conformance suite in tests/conformance loads every variant on real Triton).

What a config holds, per model:

* **I/O** from the ONNX graph (read through :mod:`resdeploy.artifact`): dims without the batch axis when
  ``max_batch_size > 0``. The ``labels`` metadata becomes ``labels.txt`` and the first output's
  ``label_filename`` (Triton's classification extension).
* **max_batch_size**: given, else the TensorRT plans' profile maximum (the smallest over plans and
  inputs), else 32. With plans, non-batch dims come from the profile too (``-1`` where min != max).
* **dynamic_batching** (preferred sizes, queue delay, a default queue policy: size limit and timeout),
  **instance_group** (count, kind, GPUs), **version_policy** (``latest:N``, ``all``, ``specific:1,3``)
  and **model_warmup**: per batch size (1 and max_batch_size), one sample per input, zero or random data,
  with the config's own dims and data types (Triton runs it at load and refuses the model if it fails).
* **TensorRT plans** (``plans=``): each copied with its sidecar (``<plan>.json``, checked: sha256 and the
  ONNX it was built from) into the version folder; ``cc_model_filenames`` maps each compute capability to
  its plan, ``default_model_filename`` is the first plan's.
* **ONNX with TensorRT acceleration** (``trt_accelerator``; on by default for ``KIND_GPU``): Triton's
  onnxruntime backend then runs the model through ONNX Runtime's TensorRT execution provider on GPU
  instances (``optimization { execution_accelerators { gpu_execution_accelerator { name: "tensorrt" }}}``),
  with the precision mode of the ONNX variant.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resdeploy import atomic
from resdeploy.artifact import copy_onnx, open_artifact
from resdeploy.errors import InputError

_ONNX_TO_CONFIG = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                   13: "TYPE_UINT64", 16: "TYPE_BF16"}
KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
WARMUPS = ("none", "zero", "random")
DEFAULT_MAX_BATCH = 32
# ONNX Runtime's TensorRT execution provider precision per resdeploy precision variant.
_TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}


@dataclass(frozen=True)
class RepositoryResult:
    """What ``make_model_repository`` wrote."""

    repo: Path
    model_dir: Path
    config_path: Path
    model_path: Path  # the model file Triton loads by default (model.onnx, model.plan or the first plan)
    labels: int  # how many labels were written to labels.txt (0 = none)
    config_text: str
    files: tuple[Path, ...] = ()  # every file written into the version folder (plans with their sidecars)
    notes: tuple[str, ...] = field(default=())  # choices made for the user (e.g. why no TensorRT accelerator)

    def __str__(self) -> str:
        lab = f", {self.labels} labels in labels.txt" if self.labels else ", no labels"
        files = " + ".join(str(p.relative_to(self.repo)) for p in (self.files or (self.model_path,)))
        text = f"model repository {self.repo}: {files} + {self.config_path.relative_to(self.repo)}{lab}"
        return text + "".join(f"\n  note: {n}" for n in self.notes)


def parse_version_policy(text: str) -> tuple[str, list[int]]:
    """``latest:N`` | ``all`` | ``specific:1,3`` -> (kind, numbers); an InputError says the accepted forms."""
    hint = "expected latest:N (N >= 1), all, or specific:V1,V2 (version numbers >= 1)"
    kind, _, rest = text.strip().partition(":")
    try:
        nums = [int(x) for x in rest.split(",") if x.strip()] if rest else []
    except ValueError:
        raise InputError(f"version policy {text!r} has a non-numeric part; {hint}") from None
    if kind == "all" and not rest:
        return "all", []
    if kind == "latest" and len(nums) == 1 and nums[0] >= 1:
        return "latest", nums
    if kind == "specific" and nums and all(n >= 1 for n in nums):
        return "specific", sorted(set(nums))
    raise InputError(f"version policy {text!r} is not understood; {hint}")


@dataclass(frozen=True)
class _Plan:
    path: Path
    sidecar: Any  # resdeploy.device.Sidecar
    filename: str  # in the version folder


def _read_plans(plans: Sequence[str | Path], onnx_sha: str) -> list[_Plan]:
    from resdeploy.device import Sidecar, sidecar_path, verify_plan

    out: list[_Plan] = []
    seen: dict[str, Path] = {}
    for p in map(Path, plans):
        side_file = sidecar_path(p)
        if not p.is_file():
            raise InputError(f"TensorRT plan {p} does not exist; build one with `resdeploy build MODEL.onnx --backend tensorrt --out {p}`")
        sidecar = verify_plan(p, Sidecar.load(side_file) if side_file.is_file() else None)
        if sidecar.onnx_sha256 and sidecar.onnx_sha256 != onnx_sha:
            raise InputError(f"TensorRT plan {p} was built from another ONNX (sha256 {sidecar.onnx_sha256[:12]}..., this "
                             f"one is {onnx_sha[:12]}...; sidecar says {sidecar.onnx_path or '?'}); pass the ONNX the plan "
                             "was built from, or rebuild the plan from this one")
        cc = str(sidecar.compute_capability)
        if cc in seen:
            raise InputError(f"TensorRT plans {seen[cc]} and {p} are both for compute capability {cc}; "
                             "give one plan per compute capability")
        seen[cc] = p
        out.append(_Plan(p, sidecar, ""))
    if len(out) == 1:
        return [_Plan(out[0].path, out[0].sidecar, "model.plan")]
    return [_Plan(x.path, x.sidecar, f"model_sm{x.sidecar.compute_capability.replace('.', '')}.plan") for x in out]


def _plan_dims(plans: list[_Plan], name: str, onnx_dims: list[int]) -> tuple[int, list[int]]:
    """(largest batch every plan accepts, dims from the profiles) for input ``name``."""
    max_batch, dims = None, None
    for plan in plans:
        prof = plan.sidecar.profile.get(name)
        if prof is None:
            raise InputError(f"TensorRT plan {plan.path}'s profile has no input '{name}' (it has "
                             f"{', '.join(plan.sidecar.profile) or 'none'}); rebuild the plan from this ONNX")
        mn, mx = list(prof["min"]), list(prof["max"])
        if len(mx) != len(onnx_dims) + 1:
            raise InputError(f"TensorRT plan {plan.path}: profile of '{name}' has rank {len(mx)} but the ONNX input "
                             f"has rank {len(onnx_dims) + 1}; rebuild the plan from this ONNX")
        max_batch = mx[0] if max_batch is None else min(max_batch, mx[0])
        these = [a if a == b else -1 for a, b in zip(mn[1:], mx[1:])]
        dims = these if dims is None else [a if a == b else -1 for a, b in zip(dims, these)]
    assert max_batch is not None and dims is not None
    return int(max_batch), dims


def make_model_repository(onnx_path: str | Path, repo_dir: str | Path, model_name: str = "resnet20",
                          max_batch_size: int | None = None, preferred_batch_sizes: tuple[int, ...] = (),
                          max_queue_delay_us: int = 0, max_queue_size: int = 0, instances: int = 1,
                          dynamic_batching: bool = True, kind: str = "KIND_AUTO", version: int = 1,
                          labels: list[str] | None = None, overwrite: bool = False, *,
                          queue_timeout_us: int = 0, gpus: Sequence[int] = (), version_policy: str | None = "latest:1",
                          warmup: str = "zero", plans: Sequence[str | Path] = (), trt_accelerator: bool | None = None,
                          trt_workspace_mib: int = 1024, engine_choice: Mapping[str, Any] | None = None) -> RepositoryResult:
    """Write ``repo_dir/model_name/{config.pbtxt, labels.txt, <version>/model.onnx}`` from ``onnx_path``
    (or ``<version>/model.plan`` + sidecar, or one plan per compute capability, when ``plans`` are given).

    ``engine_choice`` (an ``engine-choice.json`` from :mod:`resdeploy.pipeline.engine_choice`): the CPU engine chosen
    by measurement goes into ``parameters { key: "resdeploy_backend" }`` (what resdeploy serve runs the ONNX with),
    and a comment at the top of config.pbtxt says so and which engine Triton would use."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    src = Path(onnx_path)
    _check_options(src, model_name, max_batch_size, kind, instances, version, warmup, gpus)
    if min((*preferred_batch_sizes, 1)) < 1 or max_queue_delay_us < 0 or max_queue_size < 0 or queue_timeout_us < 0:
        raise InputError("preferred batch sizes must be >= 1 and queue delay, size and timeout >= 0")
    artifact = open_artifact(src)
    notes: list[str] = []
    plan_list = _read_plans(plans, artifact.sha256()) if plans else []
    max_batch_size, plan_dims = _batch_limit(artifact, plan_list, max_batch_size, preferred_batch_sizes, notes)

    config = pb.ModelConfig(name=model_name, max_batch_size=max_batch_size)
    if plan_list:
        config.platform, config.backend = "tensorrt_plan", "tensorrt"
    else:
        config.platform, config.backend = "onnxruntime_onnx", "onnxruntime"
    _add_io(config, src, artifact, plan_dims)
    if labels is None:
        labels = list(artifact.metadata.labels) or None
    if labels:
        config.output[0].label_filename = "labels.txt"
    _add_scheduling(config, dynamic_batching, preferred_batch_sizes, max_queue_delay_us, max_queue_size, queue_timeout_us)
    _add_instances_and_versions(config, instances, kind, gpus, version_policy, version)
    if plan_list:
        _add_plans(config, plan_list, trt_accelerator)
    else:
        _add_trt_accelerator(config, src, artifact, kind, trt_accelerator, trt_workspace_mib, notes)
    if warmup != "none":
        _add_warmup(config, warmup)

    header = _engine_choice_header(config, engine_choice, notes) if engine_choice and not plan_list else ""
    model_dir = Path(repo_dir) / model_name
    model_path, written = _write_version(model_dir / str(version), src, artifact, plan_list, overwrite)
    text = header + text_format.MessageToString(config)
    atomic.write_text(model_dir / "config.pbtxt", text)
    if labels:
        atomic.write_text(model_dir / "labels.txt", "".join(f"{x}\n" for x in labels))
    return RepositoryResult(Path(repo_dir), model_dir, model_dir / "config.pbtxt", model_path, len(labels or []), text,
                            tuple(written), tuple(notes))


# -- the steps, in the order make_model_repository takes them -------------------------------------------------------
def _check_options(src: Path, model_name: str, max_batch_size: int | None, kind: str, instances: int, version: int,
                   warmup: str, gpus: Sequence[int]) -> None:
    """Refuse bad options before anything is read or written."""
    if not src.is_file():
        raise InputError(f"ONNX model {src} does not exist; export one with `resdeploy export`")
    if max_batch_size is not None and max_batch_size < 0:
        raise InputError(f"max_batch_size is {max_batch_size}; expected 0 (no batching) or a positive limit")
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise InputError(f"model name {model_name!r} is not a folder name; use letters, digits, - and _")
    if kind not in KINDS:
        raise InputError(f"instance kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    if instances < 1:
        raise InputError(f"instances is {instances}; expected at least 1 model instance")
    if version < 1:
        raise InputError(f"version is {version}; Triton's version folders are numbers >= 1")
    if warmup not in WARMUPS:
        raise InputError(f"warmup {warmup!r} is unknown; expected one of {', '.join(WARMUPS)}")
    if gpus and kind != "KIND_GPU":
        raise InputError(f"GPUs {list(gpus)} are given for instance kind {kind}; pass --kind KIND_GPU with --gpus")


def _batch_limit(artifact: Any, plan_list: list[_Plan], max_batch_size: int | None,
                 preferred_batch_sizes: tuple[int, ...], notes: list[str]) -> tuple[int, dict[str, list[int]]]:
    """(max_batch_size, per input the non-batch dims the plans' profiles fix): given, else the plans' profile
    maximum, else 32 with a dynamic batch axis and 0 without one."""
    batch_in_model = all(v.shape and v.shape[0] is None for v in artifact.inputs)
    profile_max = None
    plan_dims: dict[str, list[int]] = {}
    if plan_list:
        for v in artifact.inputs:
            mb, d = _plan_dims(plan_list, v.name, [-1 if x is None else x for x in v.shape[1:]])
            profile_max = mb if profile_max is None else min(profile_max, mb)
            plan_dims[v.name] = d
        if max_batch_size is None:
            max_batch_size = profile_max
        elif profile_max is not None and max_batch_size > profile_max:
            raise InputError(f"max_batch_size {max_batch_size} exceeds the TensorRT profile's maximum batch {profile_max}; "
                             f"pass --max-batch-size <= {profile_max} or rebuild the plan with a larger --max-batch")
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH if batch_in_model else 0
        if not batch_in_model:
            notes.append("the model has no dynamic batch axis, so max_batch_size is 0 (no batching)")
    bad = [p for p in preferred_batch_sizes if max_batch_size and p > max_batch_size]
    if bad:
        raise InputError(f"preferred batch sizes {bad} are outside 1..{max_batch_size} (max_batch_size)")
    if preferred_batch_sizes and not max_batch_size:
        raise InputError("preferred batch sizes need batching; max_batch_size is 0")
    return max_batch_size, plan_dims


def _add_io(config: Any, src: Path, artifact: Any, plan_dims: dict[str, list[int]]) -> None:
    """Inputs and outputs from the graph: dims without the batch axis when batching, a plan's fixed dims filled in."""
    from tritonclient.grpc import model_config_pb2 as pb

    for kind_name, values, target in (("input", artifact.inputs, config.input), ("output", artifact.outputs, config.output)):
        for v in values:
            dims = [-1 if d is None else d for d in v.shape]
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise InputError(f"{src}: {kind_name} '{v.name}' has shape {dims} without a dynamic batch axis; "
                                     "re-export with a dynamic batch axis or pass --max-batch-size 0")
                dims = dims[1:]
            if kind_name == "input" and v.name in plan_dims and config.max_batch_size > 0:
                dims = [p if o == -1 else o for o, p in zip(dims, plan_dims[v.name])]
            dtype = _ONNX_TO_CONFIG.get(v.elem_type)
            if dtype is None:
                raise InputError(f"{src}: {kind_name} '{v.name}' has ONNX element type {v.elem_type}, which Triton "
                                 "cannot serve; export the model with float/int I/O")
            io = target.add(name=v.name, data_type=pb.DataType.Value(dtype))
            io.dims.extend(dims)


def _add_scheduling(config: Any, dynamic_batching: bool, preferred_batch_sizes: tuple[int, ...],
                    max_queue_delay_us: int, max_queue_size: int, queue_timeout_us: int) -> None:
    """The dynamic batcher and its default queue policy; queue options without it are refused."""
    from tritonclient.grpc import model_config_pb2 as pb

    if dynamic_batching and config.max_batch_size > 0:
        db = config.dynamic_batching
        db.preferred_batch_size.extend(preferred_batch_sizes)
        db.max_queue_delay_microseconds = max_queue_delay_us
        if max_queue_size:
            db.default_queue_policy.max_queue_size = max_queue_size
        if queue_timeout_us:
            db.default_queue_policy.default_timeout_microseconds = queue_timeout_us
            db.default_queue_policy.timeout_action = pb.ModelQueuePolicy.REJECT
    elif max_queue_size or queue_timeout_us or preferred_batch_sizes or max_queue_delay_us:
        raise InputError("queue and batching options (--preferred, --max-queue-delay-us, --max-queue-size, "
                         "--queue-timeout-us) need the dynamic batcher; drop --no-dynamic-batching or those options")


def _add_instances_and_versions(config: Any, instances: int, kind: str, gpus: Sequence[int],
                                version_policy: str | None, version: int) -> None:
    """The instance group (count, kind, GPUs) and the version policy, which must serve the version being written."""
    from tritonclient.grpc import model_config_pb2 as pb

    group = config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    group.gpus.extend(int(g) for g in gpus)
    if not version_policy:
        return
    vkind, nums = parse_version_policy(version_policy)
    if vkind == "latest":
        config.version_policy.latest.num_versions = nums[0]
    elif vkind == "all":
        config.version_policy.all.SetInParent()
    else:
        if version not in nums:
            raise InputError(f"version policy {version_policy!r} does not serve version {version}, the one being "
                             f"written; add {version} to it or write another --version")
        config.version_policy.specific.versions.extend(nums)


def _add_plans(config: Any, plan_list: list[_Plan], trt_accelerator: bool | None) -> None:
    """TensorRT plans: the first is the default model file, each compute capability names its own."""
    if trt_accelerator:
        raise InputError("the TensorRT accelerator option is for ONNX models; TensorRT plans already are engines")
    config.default_model_filename = plan_list[0].filename
    for plan in plan_list:
        config.cc_model_filenames[str(plan.sidecar.compute_capability)] = plan.filename


def _add_trt_accelerator(config: Any, src: Path, artifact: Any, kind: str, trt_accelerator: bool | None,
                         trt_workspace_mib: int, notes: list[str]) -> None:
    """ONNX Runtime's TensorRT execution provider for an ONNX model (on by default for GPU instances), at the
    variant's precision; never for a u8s8 INT8 variant, which is ONNX Runtime's CPU flavour."""
    use_trt = (kind == "KIND_GPU") if trt_accelerator is None else trt_accelerator
    precision = artifact.precision
    if use_trt and precision == "int8" and artifact.metadata.int8_flavour == "u8s8":
        if trt_accelerator:
            raise InputError(f"{src} is a u8s8 INT8 variant (for ONNX Runtime on the CPU); TensorRT takes s8s8: "
                             "quantize with `resdeploy quantize --precision int8 --backend tensorrt`, or drop --trt-accelerator")
        use_trt = False
        notes.append("no TensorRT accelerator: this u8s8 INT8 variant is for ONNX Runtime's CPU path "
                     "(TensorRT takes the s8s8 variant from `resdeploy quantize --backend tensorrt`)")
    if use_trt:
        acc = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = _TRT_PRECISION.get(precision, "FP32")
        acc.parameters["max_workspace_size_bytes"] = str(int(trt_workspace_mib) << 20)


def _add_warmup(config: Any, warmup: str) -> None:
    """One warmup sample per batch size (1 and max_batch_size) with the config's own dims and types; Triton runs
    them at load and refuses the model if one fails."""
    from tritonclient.grpc import model_config_pb2 as pb

    max_batch_size = config.max_batch_size

    def sample_dims(inp: Any) -> list[int]:  # without batching, a dynamic leading (batch) axis warms up at 1
        dims = list(inp.dims)
        return [1, *dims[1:]] if not max_batch_size and dims and dims[0] == -1 else dims

    for inp in config.input:
        if any(d < 0 for d in sample_dims(inp)) or inp.data_type == pb.TYPE_STRING:
            raise InputError(f"input '{inp.name}' has dims {list(inp.dims)} / {pb.DataType.Name(inp.data_type)}: a "
                             "warmup sample needs fixed dims and a numeric type; pass --warmup none")
    for batch in sorted({1, max_batch_size}) if max_batch_size else [1]:
        sample = config.model_warmup.add(name=f"{warmup}_batch{batch}", batch_size=batch)
        for inp in config.input:
            data = sample.inputs[inp.name]
            data.data_type = inp.data_type
            data.dims.extend(sample_dims(inp))
            if warmup == "zero":
                data.zero_data = True
            else:
                data.random_data = True


def _write_version(version_dir: Path, src: Path, artifact: Any, plan_list: list[_Plan],
                   overwrite: bool) -> tuple[Path, list[Path]]:
    """The version folder's files (the ONNX with its external data, or each plan with its sidecar), atomically;
    returns (the default model file, every file written)."""
    from resdeploy.device import sidecar_path

    names = [p.filename for p in plan_list] or ["model.onnx"]
    existing = [version_dir / n for n in names if (version_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists; pass --overwrite or another --version")
    version_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not plan_list:
        model_path = version_dir / "model.onnx"
        copy_onnx(src, model_path)  # with its external data, if any (checked to lie beside it)
        return model_path, [model_path, *(version_dir / f.name for f in artifact.data_files)]
    for plan in plan_list:
        target = version_dir / plan.filename
        with atomic.atomic_path(target) as tmp:
            shutil.copyfile(plan.path, tmp)
        atomic.write_bytes(sidecar_path(target), sidecar_path(plan.path).read_bytes())  # sha256 still matches
        written += [target, sidecar_path(target)]
    return version_dir / plan_list[0].filename, written


def _engine_choice_header(config: Any, engine_choice: Mapping[str, Any], notes: list[str]) -> str:
    """The measured CPU engine configuration into ``parameters { key: "resdeploy_backend" }`` and its settings into
    ``parameters { key: "resdeploy_backend_options" }`` (a JSON object); returns config.pbtxt's comment that says so,
    and what Triton would run instead."""
    import json

    from resdeploy.engines import check_settings
    from resdeploy.serve.repository import BACKEND_PARAMETER, OPTIONS_PARAMETER, PARAMETER_BACKENDS

    chosen = str(engine_choice.get("backend", ""))
    if chosen not in PARAMETER_BACKENDS:
        raise InputError(f"engine choice names backend {chosen!r}; a repository serves one of {', '.join(PARAMETER_BACKENDS)}")
    settings = check_settings(chosen, dict(engine_choice.get("settings") or {}), "engine choice settings")
    config.parameters[BACKEND_PARAMETER].string_value = chosen
    config.parameters[OPTIONS_PARAMETER].string_value = json.dumps(settings, sort_keys=True)
    from resdeploy.pipeline.engine_choice import config_name

    name = config_name(chosen, str(engine_choice.get("precision", "")), settings)
    cpu = (engine_choice.get("machine") or {}).get("cpu_model") or "this machine"
    reason = engine_choice.get("reason", "")
    notes.append(f"engine chosen by measurement: {name} ({reason})")
    triton = {"openvino": " (add optimization { execution_accelerators { cpu_execution_accelerator { name: \"openvino\" "
                          "} } } where Triton's build has the OpenVINO execution provider; its hints are that "
                          "provider's own)",
              "onnxruntime": " (Triton's onnxruntime backend has no spinning parameter: ONNX Runtime's default, on)"
              if settings.get("spinning") is False else ""}[chosen]
    return (f"# resdeploy engine choice (measured on {cpu}): {name}; {reason}\n"
            f"# resdeploy serve runs this model with {chosen}, settings {json.dumps(settings, sort_keys=True)} "
            f"(parameters {BACKEND_PARAMETER}, {OPTIONS_PARAMETER}); Triton's onnxruntime backend runs it with ONNX "
            f"Runtime{triton}\n")


__all__ = ["KINDS", "RepositoryResult", "WARMUPS", "make_model_repository", "parse_version_policy"]
