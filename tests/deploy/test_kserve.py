"""The KServe InferenceService `resdeploy repo --kserve-manifest` writes, validated against KServe's published CRD
schema (tests/data/kserve: the v1beta1 openAPIV3Schema, pruned to spec.predictor) in a strict mode: unknown fields
are errors, as `kubectl apply --validate=strict` / kubeconform -strict would report them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from resdeploy.errors import InputError
from resdeploy.pipeline.cli import main
from resdeploy.pipeline.kserve import inference_service, service_name, to_yaml, write_inference_service
from resdeploy.pipeline.repository import make_model_repository

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "kserve" / "inferenceservice-v1beta1.schema.json"


def strict(node):
    """additionalProperties: false on every object that lists its properties and keeps no unknown fields."""
    node = copy.deepcopy(node)

    def walk(n):
        if isinstance(n, dict):
            if "properties" in n and "additionalProperties" not in n and not n.get("x-kubernetes-preserve-unknown-fields"):
                n["additionalProperties"] = False
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node)
    return node


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    assert "kserve/kserve@" in schema["$comment"]
    return jsonschema.Draft7Validator(strict(schema))


def errors(validator, manifest):
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_repo_writes_a_valid_manifest_beside_the_repository(tmp_path, validator, capsys):
    src = _tiny_onnx(tmp_path / "m.onnx")
    rc = main(["repo", str(src), "--out", str(tmp_path / "model_repository"), "--name", "resnet20_gpu", "--kind", "KIND_GPU",
               "--max-batch-size", "16", "--kserve-manifest", "--storage-uri", "s3://models/model_repository",
               "--gpus-per-replica", "2", "--min-replicas", "1", "--max-replicas", "8"])
    assert rc == 0
    path = tmp_path / "resnet20-gpu-inferenceservice.yaml"
    assert f"KServe InferenceService: {path}" in capsys.readouterr().out
    manifest = yaml.safe_load(path.read_text())
    assert errors(validator, manifest) == []
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "resnet20-gpu"
    pred = manifest["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (1, 8, "concurrency", 32)
    model = pred["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/model_repository"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2" == model["resources"]["requests"]["nvidia.com/gpu"]


def test_cpu_manifest_and_explicit_path(tmp_path, validator):
    src = _tiny_onnx(tmp_path / "m.onnx")
    r = make_model_repository(src, tmp_path / "repo", "small", kind="KIND_CPU")
    out = write_inference_service(r, tmp_path / "k8s" / "isvc.yaml", storage_uri="pvc://models-pvc/repo",
                                  gpus_per_replica=0, min_replicas=0, target_concurrency=10, image_tag="24.10-py3")
    manifest = yaml.safe_load(out.read_text())
    assert errors(validator, manifest) == []
    res = manifest["spec"]["predictor"]["model"]["resources"]
    assert "nvidia.com/gpu" not in res["limits"] and manifest["spec"]["predictor"]["minReplicas"] == 0


def test_the_validator_catches_mistakes(validator):
    good = inference_service("m", "s3://b/repo")
    assert errors(validator, good) == []
    typo = copy.deepcopy(good)
    typo["spec"]["predictor"]["minReplica"] = 1
    assert any("minReplica" in e for e in errors(validator, typo))
    metric = copy.deepcopy(good)
    metric["spec"]["predictor"]["scaleMetric"] = "qps"
    assert any("scaleMetric" in e for e in errors(validator, metric))
    kind = copy.deepcopy(good)
    kind["spec"]["predictor"]["maxReplicas"] = "4"
    assert any("maxReplicas" in e for e in errors(validator, kind))
    nofmt = copy.deepcopy(good)
    del nofmt["spec"]["predictor"]["model"]["modelFormat"]["name"]
    assert any("name" in e for e in errors(validator, nofmt))


def test_yaml_round_trip():
    obj = inference_service("m", "gs://b/repo", triton_args=("--log-verbose=1",), namespace="ml")
    assert yaml.safe_load(to_yaml(obj)) == obj
    odd = {"a b": [1, {"x": "y: z", "e": []}, "s"], "t": True, "n": None, "empty": {}}
    assert yaml.safe_load(to_yaml(odd)) == odd


def test_refusals(tmp_path):
    src = _tiny_onnx(tmp_path / "m.onnx")
    assert main(["repo", str(src), "--out", str(tmp_path / "r"), "--kserve-manifest"]) == 2  # no --storage-uri
    r = make_model_repository(src, tmp_path / "repo", "g", kind="KIND_GPU")
    with pytest.raises(InputError, match="0 GPUs per replica"):
        write_inference_service(r, "-", storage_uri="s3://b/r", gpus_per_replica=0)
    with pytest.raises(InputError, match="storage initializer"):
        write_inference_service(r, "-", storage_uri="/local/path")
    with pytest.raises(InputError, match="inside the repository"):
        write_inference_service(r, tmp_path / "repo" / "isvc.yaml", storage_uri="s3://b/r")
    with pytest.raises(InputError, match="exceeds max replicas"):
        inference_service("m", "s3://b/r", min_replicas=5, max_replicas=2)
    assert service_name("ResNet20_Int8.v2") == "resnet20-int8-v2" and service_name("20x") == "m-20x"
