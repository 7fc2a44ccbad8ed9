"""Convolutional Highway network (Srivastava et al. 2015): ``y = H(x)*T(x) + x*(1 - T(x))``.

``H`` is conv-BN-ReLU, the transform gate ``T`` a conv with a sigmoid whose bias starts negative (-2, the paper's
advice), so each layer begins by mostly carrying its input through: the gated short path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, square_input


class HighwayBlock(nn.Module):
    short_path_kind = "gated_add"

    def __init__(self, channels: int, gate_bias: float = -2.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.gate = nn.Conv2d(channels, channels, 3, 1, 1)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        t = torch.sigmoid(self.gate(x))
        return h * t + x * (1 - t)


class HighwayNet(ResidualNet):
    """Stem conv, then per stage ``n`` highway blocks and (between stages) a strided conv that widens."""

    def __init__(
        self,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers: list[nn.Module] = []
            if i:
                layers += [nn.Conv2d(widths[i - 1], w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [HighwayBlock(w) for _ in range(n)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._set_card(square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD), num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
