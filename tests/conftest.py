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


@pytest.fixture(scope="session")
def resnet20_onnx(tmp_path_factory, trained_resnet20_dir) -> Path:
    """What users serve: `resdeploy export` of the trained resnet20 (labels in its metadata)."""
    from resdeploy.pipeline.exporting import export_checkpoint

    path = tmp_path_factory.mktemp("onnx") / "resnet20.onnx"
    export_checkpoint(trained_resnet20_dir, path, check=False)
    return path


@pytest.fixture(scope="session")
def r20_images(trained_resnet20, mnist):
    """16 normalised test digits for the trained resnet20."""
    from resdeploy.models import normalize

    spec = trained_resnet20[0].input_spec
    return normalize(mnist.test.images[:16], spec.mean, spec.std)


@pytest.fixture(scope="session")
def r20_onnx(trained_resnet20, r20_images, tmp_path_factory) -> Path:
    """The trained resnet20 exported by the export stage alone (dynamo, opset 18, dynamic batch)."""
    from resdeploy.artifact import ArtifactMetadata
    from resdeploy.export import export_onnx

    model, _ = trained_resnet20
    out = tmp_path_factory.mktemp("r20") / "resnet20.onnx"
    export_onnx(model, out, input_shape=model.input_spec.shape, metadata=ArtifactMetadata(architecture="resnet20"), sample=r20_images)
    return out
