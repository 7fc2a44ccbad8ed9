"""A small FractalNet (Larsson et al. 2016): fractal blocks whose columns meet in mean joins.

``f_1(z) = conv(z)``, ``f_C(z) = join(f_{C-1}(f_{C-1}(z)), conv(z))``, with nested joins flattened as in the
paper's figure: a block of C columns has joins of 2..C inputs, and its deepest column 2^(C-1) convs. A join is
the element-wise mean of its inputs. In training, local drop-path drops each join input with probability
``drop_path`` (at least one survives) and the mean is over the survivors; at inference (and in the export) every
join is the plain mean, with no random op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.spec import CIFAR_MEAN, CIFAR_STD, square_input


class ConvUnit(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Join(nn.Module):
    """Element-wise mean of ``n`` same-shaped tensors: the mean-join short path."""

    short_path_kind = "mean_join"

    def __init__(self, n: int, drop_path: float = 0.15) -> None:
        super().__init__()
        self.short_path_inputs = n
        self.drop_path = drop_path

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:
            keep = torch.rand(len(xs)) >= self.drop_path
            if not bool(keep.any()):
                keep[torch.randint(len(xs), ())] = True
            kept = [x for x, k in zip(xs, keep.tolist()) if k]
            return sum(kept[1:], kept[0]) / len(kept)
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out / len(xs)


class FractalBlock(nn.Module):
    """``columns`` columns from ``cin`` to ``cout`` maps; column c holds 2^(c-1) conv units."""

    def __init__(self, columns: int, cin: int, cout: int, drop_path: float) -> None:
        super().__init__()
        self.columns = columns
        depth = 2 ** (columns - 1)
        # units[c][d]: the conv of column c at depth d (column c has a conv every 2^(C-1-c) rows).
        self.cols = nn.ModuleList()
        for c in range(columns):
            step = 2 ** (columns - 1 - c)
            self.cols.append(nn.ModuleList(ConvUnit(cin if d == 0 else cout, cout) for d in range(0, depth, step)))
        # A join closes every row where two or more columns end a conv together.
        self.joins = nn.ModuleDict()
        for d in range(depth):
            n = sum(1 for c in range(columns) if (d + 1) % (2 ** (columns - 1 - c)) == 0)
            if n > 1:
                self.joins[f"row{d + 1}"] = Join(n, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = 2 ** (self.columns - 1)
        state = [x] * self.columns  # what each column reads next
        for d in range(depth):
            ending = []
            for c in range(self.columns):
                step = 2 ** (self.columns - 1 - c)
                if d % step == 0:
                    state[c] = self.cols[c][d // step](state[c])
                if (d + 1) % step == 0:
                    ending.append(c)
            if len(ending) > 1:
                joined = self.joins[f"row{d + 1}"](*[state[c] for c in ending])
                for c in ending:
                    state[c] = joined
        return state[0]


class FractalNet(ResidualNet):
    def __init__(
        self,
        columns: int = 3,
        widths: Sequence[int] = (16, 32),
        drop_path: float = 0.15,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if columns < 1:
            raise InputError(f"a fractal block needs at least one column, got {columns}")
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(FractalBlock(columns, cin, w, drop_path))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._set_card(square_input(in_channels, image_size, mean, std, CIFAR_MEAN, CIFAR_STD), num_classes, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.max_pool2d(block(x), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
