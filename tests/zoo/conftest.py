"""The zoo tier: networks nobody here wrote (torchvision, timm), marker ``zoo``.

It runs in its own venv, ``.venv-zoo`` (``make zoo-venv``: torch 2.14.1 + torchvision 0.29.1 + timm beside the
project), never in the main one: ``make test`` runs ``.venv-zoo/bin/python -m pytest -m zoo tests/zoo`` after the
main suite, whose ``-m 'not zoo'`` leaves these tests out. Every test collected under this folder gets the marker;
a zoo run without torchvision or timm fails (it must not pass by skipping).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

ZOO_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the marker must be there when it does
def pytest_collection_modifyitems(config, items):  # noqa: ANN001 - pytest hook
    for item in items:
        if ZOO_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.zoo)


@pytest.fixture(scope="session")
def zoo_stack() -> SimpleNamespace:
    """torchvision and timm; a failure naming the fix when the venv lacks them."""
    try:
        import timm
        import torchvision
    except ImportError as exc:
        pytest.fail(f"the zoo tier needs torchvision and timm ({exc}); run it in its venv: make zoo-venv && "
                    ".venv-zoo/bin/python -m pytest -m zoo tests/zoo", pytrace=False)
    return SimpleNamespace(torchvision=torchvision, timm=timm)


@pytest.fixture(scope="session")
def zoo_images(zoo_stack):
    """``zoo_images(n, offset=0)``: n real images (MNIST digits resized to 3x64x64, ImageNet-normalised)."""
    from tests.zoo.networks import images

    return images
