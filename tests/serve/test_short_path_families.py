"""Every short-path family through the whole pipeline: export (with the short-path check) -> parity on ONNX Runtime
-> a Triton repository -> `resdeploy serve` answering like ONNX Runtime. Random-weight models on 28x28 digits with
BatchNorm statistics set from real images (so their logits are realistic), one repository and one server for all."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

FAMILIES = {
    "densenet40": ({}, "concat"),
    "highway": ({"blocks": (2, 2, 2)}, "gated_add"),
    "sd_resnet20": ({}, "scaled_add"),
    "fractalnet": ({}, "mean_join"),
    "lenet5": ({}, None),
    "vgg9": ({}, None),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist):
    """name -> (model, onnx path, ExportResult), each exported through the pipeline's export stage."""
    import torch

    from resdeploy.artifact import ArtifactMetadata
    from resdeploy.models import create_model, normalize
    from resdeploy.pipeline.exporting import export_model
    from resdeploy.pipeline.workbench import recalibrate_batchnorm

    out = {}
    root = tmp_path_factory.mktemp("families")
    for name, (kw, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = create_model(name, in_channels=1, image_size=28, **kw)
        recalibrate_batchnorm(model, images=32)
        model.eval()
        x = normalize(mnist.test.images[:4], model.input_spec.mean, model.input_spec.std)
        meta = ArtifactMetadata(architecture=name, input_spec=model.input_spec, labels=tuple(model.labels),
                                precision="fp32")
        res = export_model(model, root / f"{name}.onnx", metadata=meta, images=x)
        out[name] = (model, root / f"{name}.onnx", res)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_checks_and_passes_parity(exported, name):
    from resdeploy.pipeline.parity import ParityConfig, run_parity
    from resdeploy.pipeline.workbench import Reference

    model, path, res = exported[name]
    assert res, str(res)
    kind = FAMILIES[name][1]
    kinds = {r.kind for r in res.check.rows}
    assert kinds == ({kind} if kind else set()), str(res.check)
    assert res.check.to_dict()["passed"]
    report = run_parity(Reference(model, name, False), {"fp32": path}, ["onnxruntime"],
                        ParityConfig(precisions=("fp32",), limit=48), progress=lambda m: None)
    assert report, str(report)
    row = report.rows[0]
    assert row.backend == "onnxruntime" and row.metrics.max_abs <= 1e-4 and row.metrics.top1_agreement == 1.0


def test_every_family_is_served(exported, tmp_path, spawn_server, mnist):
    import onnxruntime as ort

    from resdeploy.models import normalize
    from resdeploy.pipeline.repository import make_model_repository

    repo = tmp_path / "repo"
    for name, (_, path, _) in exported.items():
        make_model_repository(path, repo, name, max_batch_size=8)
    start_server, stop_server = spawn_server
    sp = start_server(repo, tmp_path)
    try:
        for name, (model, path, _) in exported.items():
            x = normalize(mnist.test.images[:2], model.input_spec.mean, model.input_spec.std)
            body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}).encode()
            req = urllib.request.Request(f"http://{sp.url}/v2/models/{name}/infer", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:  # a non-200 raises, with the server's message
                status, raw = r.status, r.read()
            assert status == 200, (name, raw[:300])
            out = json.loads(raw)["outputs"][0]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            want = sess.run(None, {"input": x})[0]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    finally:
        stop_server(sp)
