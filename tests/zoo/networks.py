"""The networks of the zoo tier: real torchvision and timm models, one or more per short-path pattern.

Random weights, made realistic so a wrong wire shows in the numbers: constant-initialised tensors (a zero-init last
BN or conv that makes a fresh block's branch 0, ConvNeXt's 1e-6 layer scale) are re-drawn, and BatchNorm statistics
are set from real images (MNIST digits resized to 3x64x64). Shared by tests/zoo/test_networks.py and
benchmarks/zoo_networks.py; it imports torchvision/timm only inside functions (the main venv has neither).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_SHAPE = (3, 64, 64)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SURGERIES = ("removed", "rewired", "inside_branch", "scaled_to_zero", "add_to_sub", "swapped")


@dataclass(frozen=True)
class Network:
    id: str
    source: str  # torchvision | timm
    name: str  # the factory's name in that library
    pattern: str  # the short-path pattern it stands for
    kinds: dict[str, int]  # short paths per kind: the architecture's counts
    block_types: tuple[str, ...]  # module classes whose instances make a short path
    surgeries: tuple[str, ...] = SURGERIES  # those that apply to its blocks (see tests/zoo/onnx_surgery.py)
    kwargs: dict[str, Any] = field(default_factory=dict)


# "inside_branch" needs a tensor inside the branch with the skip's shape: a bottleneck or an inverted residual has
# none (its inner tensors have other channel counts), so it is left out there and said so in the results.
NO_INSIDE = tuple(s for s in SURGERIES if s != "inside_branch")
NETWORKS = (
    Network("resnet50", "torchvision", "resnet50", "bottleneck, projection shortcut", {"add": 16},
            ("Bottleneck",), NO_INSIDE),
    Network("mobilenet_v3_large", "torchvision", "mobilenet_v3_large", "inverted residual, hardsigmoid SE gate",
            {"add": 10}, ("InvertedResidual",), NO_INSIDE),
    Network("efficientnet_b0", "torchvision", "efficientnet_b0", "MBConv, SiLU, sigmoid SE gate, stochastic depth",
            {"add": 9}, ("MBConv",), NO_INSIDE),
    Network("regnet_y_400mf", "torchvision", "regnet_y_400mf", "RegNet Y: grouped convs, SE", {"add": 16},
            ("ResBottleneckBlock",)),
    Network("convnext_tiny", "torchvision", "convnext_tiny", "ConvNeXt: depthwise conv, layer scale, LayerNorm",
            {"add": 18}, ("CNBlock",)),
    Network("densenet121", "torchvision", "densenet121", "DenseNet concats, found without declarations",
            {"concat": 58}, ("_DenseLayer", "_DenseBlock"), ("removed", "rewired", "inside_branch", "scaled_to_zero")),
    Network("resnet50d", "timm", "resnet50d", "ResNet-D: avg-pool + conv shortcut", {"add": 16}, ("Bottleneck",),
            NO_INSIDE),
    Network("seresnext26d_32x4d", "timm", "seresnext26d_32x4d", "SE-ResNeXt-D: grouped convs, SE, pooled shortcut",
            {"add": 8}, ("Bottleneck",)),
    Network("resnetv2_50", "timm", "resnetv2_50", "pre-activation bottleneck", {"add": 16}, ("PreActBottleneck",)),
    Network("convnext_atto_drop_path", "timm", "convnext_atto", "timm ConvNeXt with drop path 0.1 (eval)",
            {"add": 12}, ("ConvNeXtBlock",), kwargs={"drop_path_rate": 0.1}),
)


def network(net_id: str) -> Network:
    found = [n for n in NETWORKS if n.id == net_id]
    if not found:
        raise KeyError(f"no zoo network {net_id!r}; known: {', '.join(n.id for n in NETWORKS)}")
    return found[0]


def build(net: Network, seed: int = 0) -> Any:
    """The network with random weights (seeded), 10 classes, in eval mode."""
    import torch

    torch.manual_seed(seed)
    if net.source == "torchvision":
        import torchvision

        model = getattr(torchvision.models, net.name)(weights=None, num_classes=10, **net.kwargs)
    else:
        import timm

        model = timm.create_model(net.name, pretrained=False, num_classes=10, **net.kwargs)
    return model.eval()


def images(n: int, offset: int = 0) -> np.ndarray:
    """``n`` real images (MNIST test digits resized to 3x64x64), ImageNet-normalised."""
    from resdeploy.models.data import fit_images, load_data, normalize

    digits = load_data("mnist").test.images[offset:offset + n]
    return normalize(fit_images(digits, INPUT_SHAPE), MEAN, STD)


def realistic_weights(model: Any, calibration: np.ndarray, seed: int = 0) -> Any:
    """Re-draw constant-initialised tensors and set BatchNorm statistics from ``calibration`` images (eval after)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() < 2 or not bool(torch.all(flat == flat[0])):
                continue
            if "scale" in name or "gamma" in name:  # layer scale
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 + 0.2)
            elif p.dim() >= 2:  # a zero-initialised conv / linear weight
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, flat.numel() // p.shape[0])) ** 0.5)
            elif name.endswith("weight"):  # a norm's scale
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:  # a bias
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
                m.train()
        for i in range(0, len(calibration), 8):
            model(torch.from_numpy(calibration[i:i + 8]))
    return model.eval()


def export_network(net: Network, out_dir: Any, x: np.ndarray) -> tuple[Any, Any, float]:
    """(model with realistic weights, its ExportReport, export seconds): ``net`` exported to ``out_dir`` with a
    dynamic batch. The parity gate scales with the logits: random-weight nets reach logits in the thousands."""
    import time
    from pathlib import Path

    import torch

    from resdeploy.export import ExportConfig, export_onnx

    model = realistic_weights(build(net), images(32, offset=100))
    with torch.no_grad():
        scale = max(1.0, float(model(torch.from_numpy(x)).abs().max()))
    t0 = time.perf_counter()
    report = export_onnx(model, Path(out_dir) / f"{net.id}.onnx", input_shape=tuple(x.shape[1:]), sample=x,
                         config=ExportConfig(parity_images=4, atol=1e-4 * scale))
    return model, report, time.perf_counter() - t0


def has_short_path(net: Network, module: Any) -> bool:
    """Whether a module of one of ``net.block_types`` makes a short path (an inverted residual only with
    ``use_res_connect``; a dense layer only when it concatenates two or more earlier tensors)."""
    if type(module).__name__ not in net.block_types:
        return False
    return bool(getattr(module, "use_res_connect", True))


def expected_blocks(net: Network, model: Any) -> list[str]:
    """The module paths whose forward makes a short path, in the order the graph computes them: what the check
    must name. A DenseNet block concatenates in each layer but the first, then once more after its last layer."""
    out: list[str] = []
    block = ""  # the dense block whose final concat comes after its layers
    for path, module in model.named_modules():
        if block and not path.startswith(block + "."):
            out.append(block)
            block = ""
        if not has_short_path(net, module):
            continue
        kind = type(module).__name__
        if kind == "_DenseBlock":
            block = path
        elif kind != "_DenseLayer" or not path.endswith(".denselayer1"):
            out.append(path)
    return out + ([block] if block else [])
