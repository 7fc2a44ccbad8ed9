"""What a model expects and what it says about itself: input spec, labels, residual blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from resdeploy.errors import InputError
from resdeploy.artifact import CIFAR_MEAN, CIFAR_STD, InputSpec  # noqa: F401 - re-exported; the input contract lives with the artifact

ShortcutKind = Literal["identity", "projection", "option_a"]
# The short paths the seed's families create (He et al.'s residual add and its relatives):
#   add         x + f(x)                       ResNets (the residual blocks below)
#   concat      cat([x, f(x)], channels)       DenseNet
#   gated_add   H(x)*T(x) + x*(1 - T(x))       Highway networks (T = sigmoid gate)
#   scaled_add  x + p*f(x)                     stochastic depth at inference (p = survival probability)
#   mean_join   (f1(x) + ... + fn(x)) / n      FractalNet joins
ShortPathKind = Literal["add", "concat", "gated_add", "scaled_add", "mean_join"]
SHORT_PATH_KINDS: tuple[str, ...] = ("add", "concat", "gated_add", "scaled_add", "mean_join")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A dataset's per-channel statistics fitted to ``channels``: averaged for grey input, repeated for one value."""
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return tuple(values) * channels
    raise InputError(f"no default normalisation for {channels} channels from {len(values)} values; pass mean= and std=")


def square_input(channels: int, size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                 default_mean: tuple[float, ...], default_std: tuple[float, ...]) -> InputSpec:
    """A ``channels`` x ``size`` x ``size`` input normalised with ``mean``/``std``, else the dataset's defaults
    fitted to ``channels`` (what every architecture's constructor needs)."""
    return InputSpec(channels, size, size, tuple(mean or default_stats(default_mean, channels)),
                     tuple(std or default_stats(default_std, channels)))


@dataclass(frozen=True)
class ResidualBlockInfo:
    """One residual add of a model, as the architecture declares it."""

    path: str  # module path of the block, e.g. "layer2.0"
    kind: ShortcutKind  # how the shortcut reaches the add
    shortcut_path: str | None = None  # module path of the shortcut module (projection/option-A), if any


@dataclass(frozen=True)
class ShortPathInfo:
    """One short path of a model, as the architecture declares it."""

    path: str  # module path of the module whose forward makes the path, e.g. "features.denseblock1.denselayer1"
    kind: ShortPathKind
    inputs: int = 2  # tensors merged (a mean join of three columns: 3)
    shortcut: ShortcutKind | None = None  # for add / scaled_add: how the skip reaches the add


@dataclass(frozen=True)
class ModelCard:
    """Everything a checkpoint or an exported model must carry besides weights."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_spec: InputSpec = field(default_factory=InputSpec)
    labels: tuple[str, ...] = ()
