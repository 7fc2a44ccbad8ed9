"""DenseNet (Huang et al. 2017): each layer's new feature maps are concatenated to everything before them.

Module names follow torchvision's DenseNet (``features.conv0``, ``features.denseblockB.denselayerL.norm1/conv1/
norm2/conv2``, ``features.transitionB.norm/conv``, ``features.norm5``, ``classifier``), so ``densenet121`` has
torchvision's state_dict keys, shapes and parameter count (7,978,856). Each dense layer returns
``cat([x, new], 1)`` itself (torchvision concatenates the list at the next layer's input; the values are the
same), so every concat short path belongs to one named layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, square_input


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck to ``bn_size * growth``) then BN-ReLU-conv3x3 (``growth`` maps), concatenated
    to the layer's input: the concat short path."""

    short_path_kind = "concat"

    def __init__(self, in_features: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, new], 1)


class DenseBlock(nn.Sequential):
    def __init__(self, layers: int, in_features: int, growth: int, bn_size: int) -> None:
        super().__init__(OrderedDict((f"denselayer{i + 1}", DenseLayer(in_features + i * growth, growth, bn_size))
                                     for i in range(layers)))


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) and 2x2 average pooling between dense blocks."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.conv = nn.Conv2d(in_features, out_features, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2, 2)


class DenseNet(ResidualNet):
    """DenseNet-BC. ``stem="imagenet"``: 7x7/2 conv + 3x3/2 max pool (torchvision); ``"cifar"``: one 3x3 conv."""

    def __init__(
        self,
        growth: int = 32,
        blocks: Sequence[int] = (6, 12, 24, 16),
        init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise InputError(f"stem must be 'imagenet' (7x7/2 conv + max pool) or 'cifar' (3x3 conv), got {stem!r}")
        if stem == "imagenet":
            layers: list[tuple[str, nn.Module]] = [
                ("conv0", nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False)),
                ("norm0", nn.BatchNorm2d(init_features)), ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, 2, 1))]
        else:
            layers = [("conv0", nn.Conv2d(in_channels, init_features, 3, 1, 1, bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))
        n = init_features
        for i, count in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(count, n, growth, bn_size))
            n += count * growth
            if i != len(blocks) - 1:
                out = int(n * compression)
                self.features.add_module(f"transition{i + 1}", Transition(n, out))
                n = out
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        cifar = stem == "cifar"
        self._set_card(
            square_input(in_channels, image_size, mean, std, CIFAR_MEAN if cifar else IMAGENET_MEAN,
                         CIFAR_STD if cifar else IMAGENET_STD),
            num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def cifar_densenet_bc(depth: int = 40, growth: int = 12, **kw: object) -> DenseNet:
    """Huang et al.'s CIFAR DenseNet-BC: 3 blocks of (depth - 4) / 6 bottleneck layers, 2k stem maps."""
    if (depth - 4) % 6 != 0:
        raise InputError(f"DenseNet-BC depth must be 6n+4 (40, 100, 190), got {depth}")
    n = (depth - 4) // 6
    kw = {"num_classes": 10, "image_size": 32, **kw}
    return DenseNet(growth=growth, blocks=(n, n, n), init_features=2 * growth, stem="cifar", **kw)  # type: ignore[arg-type]
