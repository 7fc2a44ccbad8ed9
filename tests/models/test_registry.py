import pytest
import torch

from resdeploy.errors import InputError
from resdeploy.models import create_model, list_models

# Residual blocks per the papers: CIFAR 6n+2 nets have 3n blocks; ImageNet 18/34/50/101/152 have 8/16/16/33/50.
EXPECTED_BLOCKS = {
    "seednet": 3, "resnet20": 9, "resnet32": 15, "resnet44": 21, "resnet56": 27, "resnet110": 54,
    "plain20": 0, "plain32": 0, "plain44": 0, "plain56": 0, "plain110": 0,
    "resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50,
    "preact_resnet18": 8, "preact_resnet34": 16,
    # The seed's other short paths: only stochastic depth's blocks are residual (scaled) adds.
    "densenet40": 0, "densenet121": 0, "highway": 0, "sd_resnet20": 9, "sd_resnet56": 27, "fractalnet": 0,
    "lenet5": 0, "vgg9": 0,
}


def test_registry_lists_every_architecture():
    assert set(list_models()) == set(EXPECTED_BLOCKS)


def test_unknown_name_lists_known_ones():
    with pytest.raises(InputError, match=r"unknown architecture 'resnet19'.*resnet18.*preact_resnet18"):
        create_model("resnet19")


def test_bad_kwargs_name_the_architecture():
    with pytest.raises(InputError, match="resnet20.*does not accept"):
        create_model("resnet20", widths=3)


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_forward_shape_determinism_and_blocks(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    spec = model.input_spec
    x = torch.randn(2, *spec.shape)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert y1.shape == (2, 7)
    assert torch.equal(y1, y2), "eval mode must be deterministic"
    assert len(model.labels) == 7
    blocks = model.residual_blocks()
    assert len(blocks) == EXPECTED_BLOCKS[name]
    assert all(b.kind in ("identity", "projection", "option_a") for b in blocks)
    paths = dict(model.named_modules())
    assert all(b.path in paths for b in blocks)


def test_shortcut_kinds():
    a = create_model("resnet20")
    assert [b.kind for b in a.residual_blocks()].count("option_a") == 2
    b = create_model("resnet20", shortcut="B")
    kinds = [x.kind for x in b.residual_blocks()]
    assert kinds.count("projection") == 2 and kinds.count("identity") == 7
    assert b.residual_blocks()[3].shortcut_path == "layer2.0.shortcut"
    assert sum(p.numel() for p in a.parameters()) == 269_722  # the paper's ~0.27M


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = create_model("resnet20").layer2[0]
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_preact_add_is_not_followed_by_relu():
    model = create_model("preact_resnet18").eval()
    block = model.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        out = block(x)
    assert (out < 0).any(), "pre-activation blocks output the raw sum; negative values must survive"


def test_configurable_inputs():
    m = create_model("resnet18", num_classes=10, in_channels=1, image_size=64)
    assert m.conv1.in_channels == 1 and m.input_spec.shape == (1, 64, 64)
    assert len(m.input_spec.mean) == 1
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 10)
