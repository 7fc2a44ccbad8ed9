"""A KServe ``InferenceService`` that runs a resdeploy model repository on NVIDIA Triton, scaled by concurrency.

    manifest = inference_service("resnet20", "s3://bucket/model_repository", gpus_per_replica=1, max_replicas=4)
    write_inference_service(result, "resnet20-inferenceservice.yaml", storage_uri="s3://bucket/model_repository")

The manifest (``serving.kserve.io/v1beta1``) uses KServe's Triton serving runtime (``kserve-tritonserver``,
model format ``triton``, protocol v2): the storage initializer copies ``storageUri`` (the repository folder:
``<model>/config.pbtxt`` + ``<model>/<version>/...``) into the pod and Triton serves every model in it. Each
replica gets ``gpus_per_replica`` × ``nvidia.com/gpu`` (requests = limits, as the device plugin requires);
the autoscaler (Knative's KPA in KServe's default serverless mode) adds replicas between ``min_replicas`` and
``max_replicas`` to keep about ``target_concurrency`` requests in flight per replica. The default target is twice
the model's ``max_batch_size``: enough queued requests for the dynamic batcher to fill its batches.

The fields are checked against KServe's published CRD schema in the tests (tests/data/kserve).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from resdeploy import atomic
from resdeploy.errors import InputError

API_VERSION = "serving.kserve.io/v1beta1"
# The Triton release the conformance suite runs (tritonserver 2.51.0 = NGC 24.10); the runtime image's tag.
TRITON_RUNTIME_VERSION = "24.10-py3"
TRITON_RUNTIME = "kserve-tritonserver"
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_STORAGE = ("s3://", "gs://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://", "oci://", "hf://")


def service_name(model_name: str) -> str:
    """A Kubernetes name (DNS-1035 label, <= 63 chars) from a model name: lower case, ``_``/``.`` -> ``-``."""
    name = re.sub(r"[^a-z0-9-]", "-", model_name.lower()).strip("-")
    if name and not name[0].isalpha():
        name = f"m-{name}"
    name = name[:63].rstrip("-")
    if not _DNS_1035.match(name):
        raise InputError(f"model name {model_name!r} gives no valid Kubernetes name; pass --name with letters, digits and -")
    return name


def inference_service(name: str, storage_uri: str, *, gpus_per_replica: int = 1, min_replicas: int = 1,
                      max_replicas: int = 4, target_concurrency: int = 64, cpu: str = "2", memory: str = "4Gi",
                      runtime_version: str | None = None, namespace: str | None = None,
                      triton_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The InferenceService as a dict (JSON/YAML-ready)."""
    if not storage_uri or not storage_uri.startswith(_STORAGE):
        raise InputError(f"storage URI {storage_uri!r} is not one KServe's storage initializer reads; expected one of "
                         f"{', '.join(_STORAGE)} pointing at the repository folder (e.g. s3://bucket/model_repository)")
    if gpus_per_replica < 0 or min_replicas < 0 or max_replicas < 1 or target_concurrency < 1:
        raise InputError(f"GPUs per replica ({gpus_per_replica}) and min replicas ({min_replicas}) must be >= 0, "
                         f"max replicas ({max_replicas}) and target concurrency ({target_concurrency}) >= 1")
    if min_replicas > max_replicas:
        raise InputError(f"min replicas {min_replicas} exceeds max replicas {max_replicas}")
    if not _DNS_1035.match(name) or len(name) > 63:
        raise InputError(f"InferenceService name {name!r} is not a DNS-1035 label (lower case letters, digits, -)")
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus_per_replica:
        for part in resources.values():
            part["nvidia.com/gpu"] = str(gpus_per_replica)
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/managed-by": "resdeploy"}}
    if namespace:
        metadata["namespace"] = namespace
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "runtime": TRITON_RUNTIME,
        "runtimeVersion": runtime_version or TRITON_RUNTIME_VERSION,
        "protocolVersion": "v2",
        "storageUri": storage_uri,
        "resources": resources,
    }
    if triton_args:
        model["args"] = list(triton_args)
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": {
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "scaleMetric": "concurrency",
            "scaleTarget": target_concurrency,
            "model": model,
        }},
    }


def to_yaml(obj: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists, strings, numbers and booleans (strings double-quoted: JSON is YAML)."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}\n"
        lines = []
        for k, v in obj.items():
            key = json.dumps(str(k)) if not re.match(r"^[A-Za-z_][A-Za-z0-9_./-]*$", str(k)) else str(k)
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{key}:\n{to_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {to_yaml(v, 0).strip()}\n")
        return "".join(lines)
    if isinstance(obj, list):
        if not obj:
            return "[]\n"
        out = []
        for v in obj:
            body = to_yaml(v, indent + 2)
            out.append(f"{pad}- {body.lstrip()}" if isinstance(v, (dict, list)) and v else f"{pad}- {body.strip()}\n")
        return "".join(out)
    return json.dumps(obj) + "\n"


def write_inference_service(result: Any, path: str | Path, *, storage_uri: str, gpus_per_replica: int = 1,
                            min_replicas: int = 1, max_replicas: int = 4, target_concurrency: int | None = None,
                            image_tag: str | None = None, namespace: str | None = None) -> Path:
    """Write the InferenceService for a ``make_model_repository`` result. ``path`` "" or "-": beside the repository
    (``<repo>/../<name>-inferenceservice.yaml``; never inside it, where Triton would look for models)."""
    from resdeploy.serve.repository import read_config

    config = read_config(result.config_path)
    kinds = {g.kind for g in config.instance_group}
    if gpus_per_replica == 0 and 1 in kinds:  # ModelInstanceGroup.KIND_GPU
        raise InputError(f"model '{config.name}' has KIND_GPU instances but the manifest gives 0 GPUs per replica; "
                         "pass --gpus-per-replica 1 or make the repository with --kind KIND_CPU")
    if target_concurrency is None:
        target_concurrency = max(4, 2 * int(config.max_batch_size))
    name = service_name(config.name)
    manifest = inference_service(name, storage_uri, gpus_per_replica=gpus_per_replica, min_replicas=min_replicas,
                                 max_replicas=max_replicas, target_concurrency=target_concurrency,
                                 runtime_version=image_tag, namespace=namespace)
    repo = Path(result.repo).resolve()
    out = Path(path) if str(path) not in ("", "-") else repo.parent / f"{name}-inferenceservice.yaml"
    if out.resolve().is_relative_to(repo):
        raise InputError(f"{out} is inside the repository {repo}; put the manifest beside it (Triton reads the folder)")
    header = (f"# KServe InferenceService for the Triton model repository {repo.name}/ (written by resdeploy repo).\n"
              f"# Upload the repository folder to {storage_uri}, then: kubectl apply -f {out.name}\n")
    atomic.write_text(out, header + to_yaml(manifest))
    return out


__all__ = ["API_VERSION", "TRITON_RUNTIME", "TRITON_RUNTIME_VERSION", "inference_service", "service_name", "to_yaml",
           "write_inference_service"]
