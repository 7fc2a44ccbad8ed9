"""Architecture registry: builders are one-liners; unknown names raise with the known ones listed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.cifar_resnet import CifarResNet
from resdeploy.models.densenet import DenseNet, cifar_densenet_bc
from resdeploy.models.fractalnet import FractalNet
from resdeploy.models.highway import HighwayNet
from resdeploy.models.imagenet_resnet import BasicBlock, Bottleneck, ResNet
from resdeploy.models.preact_resnet import PreActResNet
from resdeploy.models.plain_nets import VGG, LeNet5
from resdeploy.models.seednet import SeedNet
from resdeploy.models.stochastic_depth import StochasticDepthResNet


def _cifar(depth: int, **fixed: Any) -> Callable[..., ResidualNet]:
    """A builder of the CIFAR ResNet (or, with ``residual=False``, its plain twin) at ``depth``."""
    def build(**kw: Any) -> ResidualNet:
        return CifarResNet(depth=depth, **fixed, **kw)
    return build


_BUILDERS: dict[str, Callable[..., ResidualNet]] = {
    "seednet": lambda **kw: SeedNet(**kw),
    **{f"resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110)},
    **{f"plain{d}": _cifar(d, residual=False) for d in (20, 32, 44, 56, 110)},
    "resnet18": lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw),
    "resnet34": lambda **kw: ResNet(BasicBlock, (3, 4, 6, 3), **kw),
    "resnet50": lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw),
    "resnet101": lambda **kw: ResNet(Bottleneck, (3, 4, 23, 3), **kw),
    "resnet152": lambda **kw: ResNet(Bottleneck, (3, 8, 36, 3), **kw),
    "preact_resnet18": lambda **kw: PreActResNet((2, 2, 2, 2), **kw),
    "preact_resnet34": lambda **kw: PreActResNet((3, 4, 6, 3), **kw),
    # The seed's other short paths, and its plain references.
    "densenet40": lambda **kw: cifar_densenet_bc(40, 12, **kw),
    "densenet121": lambda **kw: DenseNet(32, (6, 12, 24, 16), 64, **kw),
    "highway": lambda **kw: HighwayNet(**kw),
    "sd_resnet20": lambda **kw: StochasticDepthResNet(20, **kw),
    "sd_resnet56": lambda **kw: StochasticDepthResNet(56, **kw),
    "fractalnet": lambda **kw: FractalNet(**kw),
    "lenet5": lambda **kw: LeNet5(**kw),
    "vgg9": lambda **kw: VGG(**kw),
}

_FAMILIES = {
    "seednet": "seed ResBlock classifier",
    "resnet20": "CIFAR ResNet (He et al. 2015)",
    "plain20": "CIFAR plain net (no shortcuts)",
    "resnet18": "ImageNet ResNet (torchvision keys)",
    "preact_resnet18": "pre-activation ResNet (He et al. 2016)",
    "densenet40": "CIFAR DenseNet-BC, k=12 (Huang et al. 2017): concat paths",
    "densenet121": "ImageNet DenseNet (torchvision keys): concat paths",
    "highway": "convolutional Highway net (Srivastava et al. 2015): gated paths",
    "sd_resnet20": "stochastic-depth ResNet (Huang et al. 2016): scaled adds",
    "fractalnet": "FractalNet, 3 columns (Larsson et al. 2016): mean joins",
    "lenet5": "LeNet-5 (LeCun et al. 1998): plain, no short paths",
    "vgg9": "VGG-style plain net (Simonyan & Zisserman 2015): no short paths",
}


def list_models() -> list[str]:
    return list(_BUILDERS)


def describe(name: str) -> str:
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name.startswith("sd_resnet"):
        return _FAMILIES["sd_resnet20"]
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
