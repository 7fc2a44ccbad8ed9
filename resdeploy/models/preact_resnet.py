"""Pre-activation ResNet (He et al. 2016, "Identity Mappings"): BN-ReLU before each conv, and no ReLU
after the skip add, so the identity path runs clean from block to block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, square_input


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            # The projection reads the pre-activated input, as in the paper's full pre-activation unit.
            self.shortcut: nn.Module | None = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))
            self.shortcut_kind, self.shortcut_module_name = "projection", "shortcut"
        else:
            self.shortcut = None
            self.shortcut_kind, self.shortcut_module_name = "identity", None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(ResidualNet):
    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        in_planes = width
        for i, n in enumerate(layers, start=1):
            planes = width * 2 ** (i - 1)
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 1 and j == 0) else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._set_card(
            square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD),
            num_classes,
            labels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
