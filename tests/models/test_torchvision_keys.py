"""torchvision cannot be installed beside torch 2.13 here, so its resnet18/50 state_dict names and shapes
were recorded once from torchvision's resnet code into tests/data/torchvision_resnet_keys.json."""

import json
from pathlib import Path

import pytest
import torch

from resdeploy.models import create_model
from resdeploy.models.checkpoint import load_state_dict_strict

RECORDED = json.loads((Path(__file__).parent.parent / "data" / "torchvision_resnet_keys.json").read_text())
# Published parameter counts of torchvision's ImageNet weights (torchvision docs, "num_params").
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_keys_and_shapes_match_torchvision(name):
    model = create_model(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == RECORDED[name]
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_torchvision_shaped_state_dict_loads_strictly(name):
    state = {k: torch.randn(shape) if shape else torch.tensor(0) for k, shape in RECORDED[name]}
    model = create_model(name)
    load_state_dict_strict(model, state, "recorded")
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
