"""The seed's two classes, verbatim, must load into ours and give exactly the same outputs."""

import torch
from torch import nn

from resdeploy.models import ResBlock, conv_layer


def seed_conv_layer(ni, nf, kernel_size=3, stride=2):
    return nn.Sequential(nn.Conv2d(ni, nf, kernel_size, stride, padding=1), nn.BatchNorm2d(nf), nn.ReLU())


class SeedResBlock(nn.Module):
    def __init__(self, nf):
        super().__init__()
        self.conv1 = seed_conv_layer(nf, nf, 3, 1)
        self.conv2 = seed_conv_layer(nf, nf, 3, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x)) + x


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def test_resblock_state_dict_and_outputs_match_the_seed():
    torch.manual_seed(0)
    seed = SeedResBlock(16).eval()
    _randomise_bn(seed)
    ours = ResBlock(16).eval()
    assert list(seed.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(seed.state_dict(), strict=True)
    x = torch.randn(3, 16, 12, 12)
    with torch.no_grad():
        assert torch.equal(seed(x), ours(x))


def test_conv_layer_matches_the_seed():
    torch.manual_seed(1)
    seed, ours = seed_conv_layer(3, 8).eval(), conv_layer(3, 8).eval()
    ours.load_state_dict(seed.state_dict(), strict=True)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(seed(x), ours(x))
    assert ours[0].stride == (2, 2) and ours[0].padding == (1, 1)
