"""Stochastic depth (Huang et al. 2016): CIFAR ResNets whose residual branches are dropped at random in training.

Block ``l`` of ``L`` survives with probability ``p_l = 1 - l/L * (1 - p_L)`` (the linear decay rule, ``p_L = 0.5``).
Training: the branch is kept or dropped per mini-batch. Inference (and therefore export): the branch is scaled by
its survival probability, ``x + p_l * f(x)``, deterministically: no random op reaches the ONNX graph, and the
short path is a scaled add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.cifar_resnet import OptionAShortcut
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, square_input


class StochasticDepthBlock(nn.Module):
    short_path_kind = "scaled_add"

    def __init__(self, in_planes: int, planes: int, stride: int, survival: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.survival = float(survival)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
            self.shortcut_kind, self.shortcut_module_name = "identity", None
        else:
            self.shortcut = OptionAShortcut(in_planes, planes)
            self.shortcut_kind, self.shortcut_module_name = "option_a", "shortcut"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(x)
        if self.training:
            # Python control flow on a random draw is fine here: export traces the module in eval mode.
            if torch.rand(()) >= self.survival:
                return F.relu(skip)
            return F.relu(skip + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(skip + self.survival * self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class StochasticDepthResNet(ResidualNet):
    def __init__(
        self,
        depth: int = 20,
        final_survival: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise InputError(f"stochastic-depth ResNet depth must be 6n+2 (20, 56, 110), got {depth}")
        if not 0 < final_survival <= 1:
            raise InputError(f"final_survival is a probability in (0, 1], got {final_survival}")
        n = (depth - 2) // 6
        total = 3 * n
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, l = 16, 0
        for i, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for j in range(n):
                l += 1
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(StochasticDepthBlock(in_planes, planes, stride, 1 - l / total * (1 - final_survival)))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self._set_card(square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD), num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
