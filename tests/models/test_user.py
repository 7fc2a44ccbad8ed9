"""The user's own network (models/user.py): factories by module or file, strict weights, code archives refused, the
trainer on any classifier module, and factory checkpoints that never import what they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resdeploy.errors import InputError
from resdeploy.models import load_checkpoint, load_data
from resdeploy.models.spec import InputSpec
from resdeploy.models.train import TrainConfig, train
from resdeploy.models.user import (
    FactoryRef, factory_fingerprint, import_factory, load_factory_checkpoint, load_user_model, split_spec,
)

USER = Path(__file__).resolve().parents[1] / "data" / "user_model.py"
FACTORY = f"{USER}:tiny_resnet"
SPEC = InputSpec(1, 8, 8, mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("spec, parts", [("torchvision.models:resnet18", ("torchvision.models", "resnet18")),
                                         ("nets/my_net.py:Net.build", ("nets/my_net.py", "Net.build")),
                                         ("C:/work/net.py:make", ("C:/work/net.py", "make"))])
def test_split_spec(spec, parts):
    assert split_spec(spec) == parts


@pytest.mark.parametrize("spec", ["resnet18", "torchvision.models:", ":resnet18", "torch vision:resnet18", "a.py:1net"])
def test_split_spec_refuses_what_is_not_a_factory(spec):
    with pytest.raises(InputError, match="MODULE:CALLABLE"):
        split_spec(spec)


@pytest.mark.parametrize("spec", ["model.pt2", "scripted.pt", "net.safetensors"])
def test_a_saved_model_file_is_not_a_factory(spec):
    with pytest.raises(InputError, match="is a saved file, not a factory.*refused: loading either runs code"):
        split_spec(spec)


def test_import_by_module_and_by_file():
    assert import_factory("torch.nn:Identity") is torch.nn.Identity
    net = import_factory(FACTORY)(width=4)
    assert isinstance(net, torch.nn.Module) and type(net).__name__ == "TinyResNet"


def test_weights_load_strictly_and_the_card_is_attached(tmp_path):
    src = import_factory(FACTORY)(width=4)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = load_user_model(FactoryRef(FACTORY, {"width": 4}), tmp_path / "w.pth", SPEC, ["c%d" % i for i in range(10)])
    assert not model.training and model.input_spec == SPEC and model.labels[3] == "c3"
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), src.eval()(x))
    state = src.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="missing keys: head.bias; unexpected keys: extra.weight") as err:
        load_user_model(FactoryRef(FACTORY, {"width": 4}), tmp_path / "bad.pth", SPEC)
    assert "check --model and --model-kwargs" in str(err.value)


def test_labels_must_match_the_logits():
    with pytest.raises(InputError, match="3 labels given but factory .* returns 10 logits"):
        load_user_model(FactoryRef(FACTORY), None, SPEC, ["a", "b", "c"])


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_code_archives_are_refused_as_weights(kind, tmp_path):
    lin = torch.nn.Linear(2, 2)
    if kind == "torchscript":
        path = tmp_path / "w.pt"
        torch.jit.save(torch.jit.script(lin), str(path))
        match = "TorchScript archive"
    else:
        path = tmp_path / "w.pt2"
        torch.export.save(torch.export.export(lin, (torch.zeros(1, 2),)), str(path))
        match = "torch.export program"
    with pytest.raises(InputError, match=match) as err:
        load_user_model(FactoryRef(FACTORY), path, SPEC)
    assert "runs code" in str(err.value)


def test_the_trainer_trains_any_classifier_module_and_its_checkpoint_needs_the_factory(tmp_path):
    ref = FactoryRef(FACTORY, {"width": 4})
    data = load_data("digits")
    result = train(TrainConfig(factory=ref, data="digits", epochs=1, max_batches=8, input_shape=(1, 12, 12),
                               progress=False), out_dir=tmp_path / "ckpt", data=data)
    assert result.arch == "tiny_resnet" and 0.0 <= result.test_accuracy <= 1.0
    with pytest.raises(InputError, match=f"trained from your factory '{FACTORY}'; load it with --model"):
        load_checkpoint(tmp_path / "ckpt")  # never imports the factory the file names
    model, meta = load_factory_checkpoint(tmp_path / "ckpt", ref)
    assert model.input_spec.shape == (1, 12, 12) and meta["metrics"]["data"] == "digits"
    with pytest.raises(InputError, match="not .*width"):
        load_factory_checkpoint(tmp_path / "ckpt", FactoryRef(FACTORY, {"width": 8}))


def test_fingerprint_follows_the_factory_code(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n")
    before = factory_fingerprint(f"{f}:net")
    f.write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 3)\n")
    assert factory_fingerprint(f"{f}:net")["file_sha256"] != before["file_sha256"]
    import_factory("torch.nn:Identity")
    assert factory_fingerprint("torch.nn:Identity")["version"].startswith("torch==")
