"""A user's own network, as a user would write it: no resdeploy imports, a factory function, plain nn.Modules.

The tests name it the way users do: ``--model tests/data/user_model.py:tiny_resnet``. The other factories are
deliberately broken, one way each.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x): a basic residual block, nothing declared about it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def tiny_resnet(**kwargs) -> TinyResNet:
    return TinyResNet(**kwargs)


def not_a_module() -> dict:
    return {"weights": []}


def raises(**kwargs) -> nn.Module:
    raise RuntimeError("the factory cannot build this\n(a second line the one-line error must not carry)")
