"""Shared fixtures. The trained resnet20 checkpoint is committed in tests/data (made by `resdeploy train`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def trained_resnet20_dir() -> Path:
    """Folder with model.safetensors + model.json of resnet20 trained on the MNIST split (1x28x28, 10 classes)."""
    path = DATA / "resnet20-mnist"
    assert (path / "model.json").is_file(), f"{path} missing; recreate with `resdeploy train --arch resnet20 --epochs 20 --out {path}`"
    return path


@pytest.fixture(scope="session")
def mnist():
    """The deterministic MNIST split (train 3500 / val 500 / test 1000), loaded once per session."""
    from resdeploy.models.data import load_data

    return load_data("mnist")


@pytest.fixture(scope="session")
def trained_resnet20(trained_resnet20_dir):
    """(model in eval mode, CheckpointInfo)."""
    from resdeploy.models.checkpoint import load_checkpoint

    return load_checkpoint(trained_resnet20_dir)
