"""What a model expects and what it says about itself: input spec, labels, residual blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ShortcutKind = Literal["identity", "projection", "option_a"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A dataset's per-channel statistics fitted to ``channels``: averaged for grey input, repeated for one value."""
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return tuple(values) * channels
    raise ValueError(f"no default normalisation for {channels} channels from {len(values)} values; pass mean= and std=")


@dataclass(frozen=True)
class InputSpec:
    """The one input tensor of a model: NCHW float32, already normalised with ``mean``/``std``."""

    channels: int = 3
    height: int = 32
    width: int = 32
    mean: tuple[float, ...] = CIFAR_MEAN  # per channel, applied to [0, 1] pixels before the model
    std: tuple[float, ...] = CIFAR_STD
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            # A 1-channel model given RGB statistics (or the reverse) is a config slip; broadcast a single value.
            if len(self.mean) == 1 and len(self.std) == 1:
                object.__setattr__(self, "mean", tuple(self.mean) * self.channels)
                object.__setattr__(self, "std", tuple(self.std) * self.channels)
            else:
                raise ValueError(
                    f"InputSpec: mean/std have {len(self.mean)}/{len(self.std)} values but channels={self.channels}; "
                    "give one value per channel"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            layout=str(d.get("layout", "NCHW")),
        )


@dataclass(frozen=True)
class ResidualBlockInfo:
    """One residual add of a model, as the architecture declares it."""

    path: str  # module path of the block, e.g. "layer2.0"
    kind: ShortcutKind  # how the shortcut reaches the add
    shortcut_path: str | None = None  # module path of the shortcut module (projection/option-A), if any


@dataclass(frozen=True)
class ModelCard:
    """Everything a checkpoint or an exported model must carry besides weights."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_spec: InputSpec = field(default_factory=InputSpec)
    labels: tuple[str, ...] = ()
