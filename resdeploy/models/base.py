"""What every resdeploy network knows about itself beyond its weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from resdeploy.errors import InputError
from resdeploy.models.spec import InputSpec, ModelCard, ResidualBlockInfo, ShortPathInfo


class ResidualNet(nn.Module):
    """Base class: carries the input spec and labels, and enumerates residual blocks.

    A block declares itself residual by a ``shortcut_kind`` attribute ("identity", "projection",
    "option_a"; ``None`` for a plain block). A module that makes another kind of short path (DenseNet's concat,
    Highway's gate, stochastic depth's scaled add, FractalNet's mean join) declares ``short_path_kind`` (and
    ``short_path_inputs`` when it merges more than two tensors). Adds no parameters, so state_dict keys stay those of the
    architecture (torchvision-identical for the ImageNet ResNets).
    """

    arch: str = ""
    arch_kwargs: dict[str, Any]
    input_spec: InputSpec
    labels: tuple[str, ...]

    def _set_card(self, input_spec: InputSpec, num_classes: int, labels: tuple[str, ...] | list[str] | None) -> None:
        self.input_spec = input_spec
        labels = tuple(labels) if labels else tuple(str(i) for i in range(num_classes))
        if len(labels) != num_classes:
            raise InputError(f"{len(labels)} labels given for num_classes={num_classes}; give one label per class")
        self.labels = labels

    @property
    def card(self) -> ModelCard:
        return ModelCard(arch=self.arch, kwargs=dict(self.arch_kwargs), input_spec=self.input_spec, labels=self.labels)

    def residual_blocks(self) -> list[ResidualBlockInfo]:
        blocks = []
        for path, module in self.named_modules():
            kind = getattr(module, "shortcut_kind", None)
            if kind is None:
                continue
            shortcut = getattr(module, "shortcut_module_name", None)
            blocks.append(ResidualBlockInfo(path=path, kind=kind, shortcut_path=f"{path}.{shortcut}" if shortcut else None))
        return blocks

    def short_paths(self) -> list[ShortPathInfo]:
        """Every short path, in module order: residual blocks as ``add`` (unless they declare a more specific
        ``short_path_kind``, as stochastic-depth blocks do with ``scaled_add``), and the other families' paths."""
        paths = []
        for path, module in self.named_modules():
            kind = getattr(module, "short_path_kind", None)
            shortcut = getattr(module, "shortcut_kind", None)
            if kind is None and shortcut is None:
                continue
            paths.append(ShortPathInfo(path=path, kind=kind or "add", inputs=int(getattr(module, "short_path_inputs", 2)),
                                       shortcut=shortcut))
        return paths
