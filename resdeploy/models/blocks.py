"""The seed's residual block, exactly as the seed wrote it (module structure and state_dict keys)."""

from __future__ import annotations

import torch
from torch import nn


def conv_layer(ni: int, nf: int, kernel_size: int = 3, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ni, nf, kernel_size, stride, padding=1),
        nn.BatchNorm2d(nf),
        nn.ReLU(),
    )


class ResBlock(nn.Module):
    """``conv2(conv1(x)) + x``: the shortcut is the block input itself (identity)."""

    shortcut_kind = "identity"

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = conv_layer(nf, nf, 3, 1)
        self.conv2 = conv_layer(nf, nf, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x
