"""How inferenceservice-v1beta1.schema.json was made (not run by the tests; kept so the fixture can be remade).

Source: KServe's published CRD, https://github.com/kserve/kserve, config/crd/full/serving.kserve.io_inferenceservices.yaml
(Apache License 2.0), commit given in the fixture's "$comment". The full file is ~2 MB: this keeps the v1beta1
openAPIV3Schema with the parts of ``spec.predictor`` a resdeploy manifest can use, every kept node verbatim.

    python tests/data/kserve/prune_crd.py serving.kserve.io_inferenceservices.yaml COMMIT > tests/data/kserve/inferenceservice-v1beta1.schema.json
"""

from __future__ import annotations

import json
import sys

import yaml

PREDICTOR = ["annotations", "autoScaling", "canaryTrafficPercent", "containerConcurrency", "labels", "maxReplicas",
             "minReplicas", "model", "nodeSelector", "scaleMetric", "scaleMetricType", "scaleTarget",
             "serviceAccountName", "timeout", "tolerations", "triton"]
MODEL = ["args", "command", "env", "image", "modelFormat", "name", "protocolVersion", "resources", "runtime",
         "runtimeVersion", "storageUri"]


def keep(node: dict, names: list[str]) -> dict:
    return {**node, "properties": {k: v for k, v in node["properties"].items() if k in names}}


def main(path: str, commit: str) -> None:
    crd = yaml.safe_load(open(path))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]
    spec = keep(schema["properties"]["spec"], ["predictor"])
    pred = keep(spec["properties"]["predictor"], PREDICTOR)
    for name in ("model", "triton"):
        pred["properties"][name] = keep(pred["properties"][name], MODEL if name == "model" else [m for m in MODEL if m not in ("modelFormat", "runtime")])
    spec["properties"]["predictor"] = pred
    out = {"$comment": f"KServe InferenceService v1beta1 openAPIV3Schema (kserve/kserve@{commit}, "
                       "config/crd/full/serving.kserve.io_inferenceservices.yaml, Apache-2.0), pruned to "
                       "spec.predictor's fields in tests/data/kserve/prune_crd.py; kept nodes verbatim",
           **{k: v for k, v in schema.items() if k != "properties"},
           "properties": {"apiVersion": schema["properties"]["apiVersion"], "kind": schema["properties"]["kind"],
                          "metadata": schema["properties"]["metadata"], "spec": spec}}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
