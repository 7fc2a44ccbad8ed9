"""Make a Triton model repository from an ONNX model: ``REPO/<model>/config.pbtxt`` + ``REPO/<model>/<version>/model.onnx``.

The config is built with Triton's own ``ModelConfig`` protobuf and written with ``text_format``, so the
repository runs unchanged on NVIDIA Triton as well as on ``resdeploy serve``. Inputs and outputs come from
the ONNX graph (dims without the batch axis when ``max_batch_size > 0``); the ``labels`` metadata_prop, when
present, becomes ``labels.txt`` beside config.pbtxt and the first output's ``label_filename`` (Triton's
convention for the classification extension).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resdeploy import atomic
from resdeploy.artifact import copy_onnx, open_artifact
from resdeploy.errors import InputError

_ONNX_TO_CONFIG = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                   13: "TYPE_UINT64", 16: "TYPE_BF16"}


@dataclass(frozen=True)
class RepositoryResult:
    """What ``make_model_repository`` wrote."""

    repo: Path
    model_dir: Path
    config_path: Path
    model_path: Path
    labels: int  # how many labels were written to labels.txt (0 = none)
    config_text: str

    def __str__(self) -> str:
        lab = f", {self.labels} labels in labels.txt" if self.labels else ", no labels"
        return f"model repository {self.repo}: {self.model_path.relative_to(self.repo)} + {self.config_path.relative_to(self.repo)}{lab}"


def make_model_repository(onnx_path: str | Path, repo_dir: str | Path, model_name: str = "resnet20",
                          max_batch_size: int = 32, preferred_batch_sizes: tuple[int, ...] = (),
                          max_queue_delay_us: int = 0, max_queue_size: int = 0, instances: int = 1,
                          dynamic_batching: bool = True, kind: str = "KIND_AUTO", version: int = 1,
                          labels: list[str] | None = None, overwrite: bool = False) -> RepositoryResult:
    """Write ``repo_dir/model_name/{config.pbtxt, labels.txt, <version>/model.onnx}`` from ``onnx_path``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    src = Path(onnx_path)
    if not src.is_file():
        raise InputError(f"ONNX model {src} does not exist; export one with `resdeploy export`")
    if max_batch_size < 0:
        raise InputError(f"max_batch_size is {max_batch_size}; expected 0 (no batching) or a positive limit")
    bad = [p for p in preferred_batch_sizes if p < 1 or (max_batch_size and p > max_batch_size)]
    if bad:
        raise InputError(f"preferred batch sizes {bad} are outside 1..{max_batch_size} (max_batch_size)")
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise InputError(f"model name {model_name!r} is not a folder name; use letters, digits, - and _")
    artifact = open_artifact(src)
    config = pb.ModelConfig(name=model_name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch_size)
    for kind_name, values, target in (("input", artifact.inputs, config.input), ("output", artifact.outputs, config.output)):
        for v in values:
            dims = [-1 if d is None else d for d in v.shape]
            if max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise InputError(f"{src}: {kind_name} '{v.name}' has shape {dims} without a dynamic batch axis; "
                                     "re-export with a dynamic batch axis or pass --max-batch-size 0")
                dims = dims[1:]
            io = target.add(name=v.name, data_type=pb.DataType.Value(_ONNX_TO_CONFIG.get(v.elem_type, "TYPE_INVALID")))
            io.dims.extend(dims)
    if labels is None:
        labels = list(artifact.metadata.labels) or None
    if labels:
        config.output[0].label_filename = "labels.txt"
    if dynamic_batching and max_batch_size > 0:
        db = config.dynamic_batching
        db.preferred_batch_size.extend(preferred_batch_sizes)
        db.max_queue_delay_microseconds = max_queue_delay_us
        if max_queue_size:
            db.default_queue_policy.max_queue_size = max_queue_size
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    repo = Path(repo_dir)
    model_dir = repo / model_name
    version_dir = model_dir / str(version)
    if (version_dir / "model.onnx").exists() and not overwrite:
        raise InputError(f"{version_dir / 'model.onnx'} already exists; pass --overwrite or another --version")
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    copy_onnx(src, target)  # with its external data, if any (checked to lie beside it)
    text = text_format.MessageToString(config)
    atomic.write_text(model_dir / "config.pbtxt", text)
    if labels:
        atomic.write_text(model_dir / "labels.txt", "".join(f"{x}\n" for x in labels))
    return RepositoryResult(repo, model_dir, model_dir / "config.pbtxt", target, len(labels or []), text)


__all__ = ["RepositoryResult", "make_model_repository"]
