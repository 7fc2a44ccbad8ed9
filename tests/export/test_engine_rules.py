"""The short-path engine on the patterns of networks nobody here wrote, in miniature (torch only, no declarations):
inverted residuals with SiLU and a squeeze-excitation gate, ConvNeXt's depthwise conv + LayerNorm + GELU + layer
scale, ResNet-D's avg-pool shortcut, pre-activation blocks, a zero-initialised last conv, DenseNet concats found
without declarations. Each must pass when exported correctly, and each surgery must be named at its block.
The full-size networks are the zoo tier (tests/zoo)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from resdeploy.export import ExportConfig, check_short_paths, check_skip_adds, export_onnx, find_short_paths
from tests.zoo import onnx_surgery


class MBConv(nn.Module):
    """Inverted residual: expand (SiLU), depthwise (SiLU), a sigmoid SE gate on a pooled branch, project."""

    def __init__(self, c: int) -> None:
        super().__init__()
        e = 4 * c
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.fc1, self.fc2 = nn.Conv2d(e, c, 1), nn.Conv2d(c, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        gate = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h * gate)


class CNBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm + MLP with GELU, a layer scale (a Mul by a parameter)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return x + self.gamma * h


class ResNetD(nn.Module):
    """A ResNet-D downsampling block: the shortcut is avg-pool then a 1x1 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.Conv2d(c, 2 * c, 3, 1, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(2 * c)
        self.down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                  nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.down(x))


class PreAct(nn.Module):
    """A pre-activation block: BN-ReLU before each conv, the skip is the block input."""

    def __init__(self, c: int, zero_last: bool = False) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        if zero_last:  # timm's zero_init_last: a fresh block's branch is 0 (a 1x1 conv of zeros is still a conv)
            nn.init.zeros_(self.conv2.weight)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


class Net(nn.Module):
    """One of each, and no declaration of any block."""

    def __init__(self, zero_last: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mb, self.cn, self.down = MBConv(8), CNBlock(8), ResNetD(8)
        self.pre = nn.Sequential(PreAct(16), PreAct(16, zero_last), PreAct(16), PreAct(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pre(self.down(self.cn(self.mb(self.stem(x)))))
        return self.head(x.mean((2, 3)))


BLOCKS = ["mb", "cn", "down", "pre.0", "pre.1", "pre.2", "pre.3"]


def _settled(model: nn.Module, x: np.ndarray) -> nn.Module:
    """BatchNorm statistics from ``x`` (not the identity of a fresh BN), then eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["trained-like", "zero-init-last"])
def net(request, tmp_path_factory):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    model = _settled(Net(zero_last=request.param), x)
    report = export_onnx(model, tmp_path_factory.mktemp("net") / "net.onnx", input_shape=(3, 16, 16), sample=x,
                         config=ExportConfig(parity_images=4))
    return model, report.path, onnx.load(str(report.path)), x


def test_gates_and_activations_are_not_short_paths(net):
    _, _, proto, _ = net
    paths = find_short_paths(proto)
    # SiLU (x * sigmoid(x)), GELU and the SE gate's Mul (a pooled, broadcast operand) are no merges; the layer
    # scale's Mul by a parameter is inside the ConvNeXt branch. Seven adds, one per block.
    assert [p.kind for p in paths] == ["add"] * 7, [(p.kind, p.op, p.block) for p in paths]
    assert [p.shortcut for p in paths] == ["identity", "identity", "pooled"] + ["identity"] * 4


def test_correct_export_passes_without_declarations(net):
    model, path, _, x = net
    report = check_short_paths(path, model, x[:2])
    assert report, str(report)
    assert [r.block for r in report.rows] == BLOCKS
    assert report.to_dict()["kinds"]["add"] == 7 and report.to_dict()["residual_adds"] == 7
    assert all(r.operand_rel_err is not None and r.operand_rel_err < 1e-4 for r in report.rows), str(report)


@pytest.mark.parametrize("surgery", ["removed", "rewired", "inside_branch", "scaled_to_zero", "add_to_sub", "swapped"])
@pytest.mark.parametrize("block", ["pre.2", "cn"])
def test_surgery_named_at_its_block(net, surgery, block):
    model, _, proto, x = net
    earlier = BLOCKS[:BLOCKS.index(block)]
    if surgery == "rewired" and block == "cn":
        earlier = ["mb"]
    broken = onnx_surgery.apply(surgery, proto, block, earlier)
    # Still only adds: a Mul by 0 of a residual add's output, read by the next block too, is no mean join.
    assert {p.kind for p in find_short_paths(broken)} == {"add"}
    report = check_short_paths(broken, model, x[:2])
    if surgery == "swapped":
        assert report, str(report)
    else:
        assert not report and report.defects[0].block == block, str(report)


def test_preact_skip_from_inside_the_branch_needs_no_sample(net):
    """relu(bn(x)) has x's shape and no conv between: the structure matches, and only the shortcut operand's value
    shows the wrong wire. Without sample images a float32 graph is compared on seeded random inputs."""
    model, _, proto, _ = net
    broken = onnx_surgery.inside_branch(proto, "pre.1")
    report = check_skip_adds(broken, model)
    assert not report and report.numeric and report.inputs == "seeded random inputs", str(report)
    first = report.defects[0]
    assert first.block == "pre.1" and "shortcut operand" in first.message, str(report)


def test_removed_skip_between_identical_blocks(net):
    """pre.1 and pre.2 look alike: the removed skip of pre.2 must not be blamed on pre.1."""
    model, _, proto, x = net
    report = check_short_paths(onnx_surgery.removed(proto, "pre.2"), model, x[:2])
    assert not report and report.defects[0].block == "pre.2" and "no residual Add" in report.defects[0].message


def test_densenet_concats_found_without_declarations(tmp_path, mnist):
    """resdeploy's densenet40 inside a plain module: nothing declares its concats, the check still finds them."""
    from resdeploy.models import create_model, normalize

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = create_model("densenet40", in_channels=1, image_size=28)

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = Wrapped().eval()
    x = normalize(mnist.test.images[:4], model.inner.input_spec.mean, model.inner.input_spec.std)
    report = export_onnx(model, tmp_path / "d.onnx", input_shape=(1, 28, 28), sample=x,
                         config=ExportConfig(parity_images=4))
    declared = [f"inner.{d.path}" for d in model.inner.short_paths()]
    check = check_short_paths(report.path, model, x[:2])
    assert check and [r.block for r in check.rows] == declared, str(check)
    assert check.to_dict()["kinds"]["concat"] == len(declared)
    proto = onnx.load(str(report.path))
    broken = check_short_paths(onnx_surgery.scaled_to_zero(proto, declared[5]), model, x[:2])
    assert not broken and broken.defects[0].block == declared[5], str(broken)
