"""export_onnx: what it writes (opset, I/O, batch axis, metadata, folded BN), that it verifies itself, that it
is deterministic and atomic, and the external-data path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from resdeploy.artifact import ArtifactMetadata
from resdeploy.errors import CheckFailed, InputError
from resdeploy.export import ExportConfig, check_skip_adds, export_onnx
from resdeploy.export.onnx_export import default_opset
from resdeploy.models import create_model


@pytest.fixture()
def seednet():
    torch.manual_seed(0)
    return create_model("seednet").eval()


def _x(model, n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *model.input_spec.shape)).astype(np.float32)


def test_trained_resnet20_export(r20_onnx, trained_resnet20, r20_images):
    proto = onnx.load(str(r20_onnx))
    assert default_opset(proto) == ExportConfig().opset == 18
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert {p.key: p.value for p in proto.metadata_props}["architecture"] == "resnet20"
    # The written file answers any batch size and matches PyTorch on real digits.
    sess = ort.InferenceSession(str(r20_onnx), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": r20_images[:5]})[0]
    with torch.no_grad():
        ref = trained_resnet20[0](torch.from_numpy(r20_images[:5])).numpy()
    assert np.abs(got - ref).max() <= 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


def test_report_numbers(seednet, tmp_path):
    report = export_onnx(seednet, tmp_path / "s.onnx", input_shape=(1, 28, 28), sample=_x(seednet, 8),
                         metadata=ArtifactMetadata(architecture="seednet", labels=("a", "b")))
    assert report and report.parity.images == 8 and report.parity.top1_agreement == 1.0
    assert 0 <= report.parity.max_abs_err <= 1e-4 and report.opset == 18 and report.exporter == "dynamo"
    assert report.op_counts["Add"] == 3 and report.metadata["labels"] == '["a", "b"]'
    assert "max abs err" in str(report) and report.parity.inputs == "real images"


def test_deterministic(seednet, tmp_path):
    x = _x(seednet)
    a = export_onnx(seednet, tmp_path / "a.onnx", input_shape=(1, 28, 28), sample=x, metadata=ArtifactMetadata(extra={"k": "v"}))
    b = export_onnx(seednet, tmp_path / "b.onnx", input_shape=(1, 28, 28), sample=x, metadata=ArtifactMetadata(extra={"k": "v"}))
    assert a.sha256 == b.sha256
    proto = onnx.load(str(a.path))
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in proto.graph.node for p in n.metadata_props)


def test_preactivation_bn_rewritten_as_affine(tmp_path):
    torch.manual_seed(0)
    model = create_model("preact_resnet18").eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    report = export_onnx(model, tmp_path / "p.onnx", input_shape=(3, 32, 32), sample=_x(model, 2),
                         config=ExportConfig(parity_images=2))
    assert "BatchNormalization" not in report.op_counts and report.op_counts["Mul"] == 9
    assert report.parity.max_abs_err <= 1e-4


def test_torchscript_exporter_and_opset_17(seednet, tmp_path):
    report = export_onnx(seednet, tmp_path / "t.onnx", input_shape=(1, 28, 28), sample=_x(seednet),
                         config=ExportConfig(exporter="torchscript", opset=17))
    assert report.opset == 17 and report.exporter == "torchscript" and report


def test_dynamo_opset_17_is_refused_not_silently_bumped(seednet, tmp_path):
    with pytest.raises(CheckFailed, match="opset 18"):
        export_onnx(seednet, tmp_path / "d.onnx", input_shape=(1, 28, 28), config=ExportConfig(opset=17))
    assert not (tmp_path / "d.onnx").exists()


def test_failed_parity_leaves_previous_file(seednet, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(CheckFailed, match="parity") as err:
        export_onnx(seednet, out, input_shape=(1, 28, 28), sample=_x(seednet), config=ExportConfig(atol=0.0))
    assert err.value.exit_code == 1 and "max abs err" in str(err.value)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data(seednet, tmp_path):
    x = _x(seednet)
    report = export_onnx(seednet, tmp_path / "ext.onnx", input_shape=(1, 28, 28), sample=x,
                         config=ExportConfig(external_data_threshold=1024))
    assert report.external_data and (tmp_path / "ext.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    proto = onnx.load(str(report.path), load_external_data=False)
    locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"ext.onnx.data"}
    onnx.checker.check_model(str(report.path), full_check=True)
    got = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        assert np.abs(got - seednet(torch.from_numpy(x)).numpy()).max() <= 1e-4
    # The skip-add check runs its numeric pass on external-data models too.
    assert check_skip_adds(report.path, seednet, x[:1])


def test_external_data_outside_the_folder_is_refused(seednet, tmp_path):
    report = export_onnx(seednet, tmp_path / "ext.onnx", input_shape=(1, 28, 28),
                         config=ExportConfig(external_data_threshold=1024))
    proto = onnx.load(str(report.path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save(proto, str(tmp_path / "evil.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        check_skip_adds(tmp_path / "evil.onnx", seednet, _x(seednet, 1))


def test_static_batch(seednet, tmp_path):
    report = export_onnx(seednet, tmp_path / "s.onnx", input_shape=(1, 28, 28), sample=_x(seednet, 3),
                         config=ExportConfig(dynamic_batch=False))
    dim0 = onnx.load(str(report.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 1 and report.parity.images == 3


def test_bad_arguments(seednet, tmp_path):
    with pytest.raises(InputError, match=r"\.onnx"):
        export_onnx(seednet, tmp_path / "m.bin", input_shape=(1, 28, 28))
    with pytest.raises(InputError, match="sample images"):
        export_onnx(seednet, tmp_path / "m.onnx", input_shape=(1, 28, 28), sample=np.zeros((2, 3, 8, 8), np.float32))


class _NoOnnxOp(torch.nn.Module):
    """A forward with an op the dynamo exporter has no ONNX function for (kthvalue)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.kthvalue(self.conv(x).flatten(1), 2)[0].unsqueeze(1).expand(-1, 10)


class _BatchOfOne(torch.nn.Module):
    """A forward that fixes the batch to 1 (``view(1, -1)``): its batch axis cannot be dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(1, -1))


def test_exporter_failure_names_the_op_and_the_fix(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with pytest.raises(InputError) as err:
        export_onnx(_NoOnnxOp().eval(), tmp_path / "k.onnx", input_shape=(1, 28, 28), sample=x)
    msg = str(err.value)
    assert err.value.exit_code == 2 and "aten.kthvalue" in msg and "--exporter torchscript" in msg, msg
    assert "\n" not in msg and not list(tmp_path.iterdir())


def test_a_batch_fixed_by_the_forward_points_to_static_batch(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    model = _BatchOfOne().eval()
    with pytest.raises(InputError, match=r"failed.*Fix: export a fixed batch of 1 \(--static-batch"):
        export_onnx(model, tmp_path / "b.onnx", input_shape=(1, 28, 28), sample=x)
    report = export_onnx(model, tmp_path / "b.onnx", input_shape=(1, 28, 28), sample=x,
                         config=ExportConfig(dynamic_batch=False))
    assert report and onnx.load(str(report.path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_dynamic_batch_from_a_single_sample_image(seednet, tmp_path):
    """The batch axis is exported from a batch-2 example even when one image is given (torch.export would
    specialise a batch-1 example to 1)."""
    report = export_onnx(seednet, tmp_path / "one.onnx", input_shape=(1, 28, 28), sample=_x(seednet, 1))
    assert report and report.parity.images == 1
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": _x(seednet, 3)})[0].shape == (3, 10)
