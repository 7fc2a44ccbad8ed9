"""Plain baselines without short paths: LeNet-5 (LeCun et al. 1998) and a small VGG-style net (Simonyan &
Zisserman 2015). LeNet-5 keeps its 6/16 conv maps and 120/84 units; ReLU and max pooling replace the original
squashing and subsampling, and a 28x28 input is padded by 2 so the maps are the original 32x32 ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, square_input


class LeNet5(ResidualNet):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__()
        pad = max(0, (32 - image_size) // 2)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self._set_card(square_input(in_channels, image_size, mean, std, MNIST_MEAN, MNIST_STD), num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


VGG_CONFIG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, 128, "M")


class VGG(ResidualNet):
    """conv3x3-BN-ReLU stacks with 2x2 max pools ("M"), global average pooling and two linear layers."""

    def __init__(self, config: Sequence[int | str] = VGG_CONFIG, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, 1, 1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(), nn.Linear(256, num_classes))
        self._set_card(square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD), num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))
