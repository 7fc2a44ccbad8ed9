"""Architecture registry: builders are one-liners; unknown names raise with the known ones listed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.cifar_resnet import CifarResNet
from resdeploy.models.imagenet_resnet import BasicBlock, Bottleneck, ResNet
from resdeploy.models.preact_resnet import PreActResNet
from resdeploy.models.seednet import SeedNet

_BUILDERS: dict[str, Callable[..., ResidualNet]] = {
    "seednet": lambda **kw: SeedNet(**kw),
    **{f"resnet{d}": (lambda d: lambda **kw: CifarResNet(depth=d, **kw))(d) for d in (20, 32, 44, 56, 110)},
    **{f"plain{d}": (lambda d: lambda **kw: CifarResNet(depth=d, residual=False, **kw))(d) for d in (20, 32, 44, 56, 110)},
    "resnet18": lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw),
    "resnet34": lambda **kw: ResNet(BasicBlock, (3, 4, 6, 3), **kw),
    "resnet50": lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw),
    "resnet101": lambda **kw: ResNet(Bottleneck, (3, 4, 23, 3), **kw),
    "resnet152": lambda **kw: ResNet(Bottleneck, (3, 8, 36, 3), **kw),
    "preact_resnet18": lambda **kw: PreActResNet((2, 2, 2, 2), **kw),
    "preact_resnet34": lambda **kw: PreActResNet((3, 4, 6, 3), **kw),
}

_FAMILIES = {
    "seednet": "seed ResBlock classifier",
    "resnet20": "CIFAR ResNet (He et al. 2015)",
    "plain20": "CIFAR plain net (no shortcuts)",
    "resnet18": "ImageNet ResNet (torchvision keys)",
    "preact_resnet18": "pre-activation ResNet (He et al. 2016)",
}


def list_models() -> list[str]:
    return list(_BUILDERS)


def describe(name: str) -> str:
    if name in _FAMILIES:
        return _FAMILIES[name]
    for prefix, text in (("plain", _FAMILIES["plain20"]), ("preact", _FAMILIES["preact_resnet18"])):
        if name.startswith(prefix):
            return text
    depth = int(name.removeprefix("resnet"))
    return _FAMILIES["resnet20"] if depth in (20, 32, 44, 56, 110) else _FAMILIES["resnet18"]


def create_model(name: str, **kwargs: Any) -> ResidualNet:
    """Build architecture ``name``; kwargs are the architecture's (num_classes, in_channels, image_size, ...)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(_BUILDERS)}") from None
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise InputError(f"architecture {name!r} does not accept these arguments {sorted(kwargs)}: {exc}") from None
    model.arch = name
    model.arch_kwargs = dict(kwargs)
    return model
