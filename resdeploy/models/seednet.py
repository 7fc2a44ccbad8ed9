"""A small classifier built from the seed's ``conv_layer`` and ``ResBlock``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from resdeploy.models.base import ResidualNet
from resdeploy.models.blocks import ResBlock, conv_layer
from resdeploy.models.spec import MNIST_MEAN, MNIST_STD, square_input


class SeedNet(ResidualNet):
    """stride-2 conv_layer to downsample, a ResBlock after each, global pooling, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: Sequence[int] = (16, 32, 64),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ni = in_channels
        for nf in widths:
            layers += [conv_layer(ni, nf, 3, 2), ResBlock(nf)]
            ni = nf
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ni, num_classes)
        self._set_card(
            square_input(in_channels, image_size, mean, std, MNIST_MEAN, MNIST_STD),
            num_classes,
            labels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
