"""densenet121 has torchvision's state_dict names, shapes and parameter count (torchvision is not installed here:
the names and shapes are in tests/data/torchvision_densenet_keys.json), so its checkpoints load strictly."""

import json
from pathlib import Path

import torch

from resdeploy.models import create_model
from resdeploy.models.checkpoint import load_state_dict_strict

RECORDED = json.loads((Path(__file__).parent.parent / "data" / "torchvision_densenet_keys.json").read_text())


def test_densenet121_keys_shapes_and_parameter_count():
    model = create_model("densenet121")
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == RECORDED["densenet121"]
    assert sum(p.numel() for p in model.parameters()) == 7_978_856  # torchvision's published num_params


def test_a_torchvision_shaped_densenet_state_dict_loads_strictly():
    state = {k: torch.randn(shape) if shape else torch.tensor(0) for k, shape in RECORDED["densenet121"]}
    model = create_model("densenet121")
    load_state_dict_strict(model, state, "recorded")
    assert torch.equal(model.state_dict()["classifier.weight"], state["classifier.weight"])


def test_cifar_densenet_bc_40():
    model = create_model("densenet40")
    paths = model.short_paths()
    assert len(paths) == 18 and {p.kind for p in paths} == {"concat"}  # 3 blocks of (40 - 4) / 6 = 6 layers
    assert model.features.norm5.num_features == 132  # 24 -> +72 -> 48 -> +72 -> 60 -> +72
    assert sum(p.numel() for p in model.parameters()) == 176_122  # Huang et al.'s DenseNet-BC (L=40, k=12), 10 classes
