"""He et al. 2015 CIFAR ResNets (6n+2 layers, 16/32/64 channels) and their plain twins.

Option A (the paper's default for CIFAR): the shortcut subsamples with stride 2 and zero-pads the new
channels, so it has no parameters. Option B: a 1x1 projection conv + BN where the shape changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, square_input

Shortcut = Literal["A", "B"]


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: ``x[:, :, ::2, ::2]`` zero-padded from ``in_planes`` to ``planes`` channels."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        extra = planes - in_planes
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; with ``residual=False`` the plain twin."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: Shortcut = "A", residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = residual
        self.shortcut_kind: str | None = None
        self.shortcut_module_name: str | None = None
        if not residual:
            self.shortcut: nn.Module = nn.Identity()
        elif stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
            self.shortcut_kind = "identity"
        elif option == "A":
            self.shortcut = OptionAShortcut(in_planes, planes)
            self.shortcut_kind, self.shortcut_module_name = "option_a", "shortcut"
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            self.shortcut_kind, self.shortcut_module_name = "projection", "shortcut"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(ResidualNet):
    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        shortcut: Shortcut = "A",
        residual: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise InputError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise InputError(f"shortcut must be 'A' (subsample + zero-pad) or 'B' (projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut, residual))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self._set_card(
            square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD),
            num_classes,
            labels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
