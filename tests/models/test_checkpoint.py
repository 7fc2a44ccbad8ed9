import json
import pickle

import numpy as np
import pytest
import torch

from resdeploy.errors import InputError
from resdeploy.models import create_model, load_checkpoint, save_checkpoint


def _model():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10, in_channels=1, image_size=28, labels=[f"c{i}" for i in range(10)]).eval()


def test_round_trip_keeps_weights_spec_labels_and_metrics(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path / "ck", metrics={"test_accuracy": 0.5}, data_fingerprint="abc")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["arch"] == "resnet20" and meta["resdeploy_version"] and meta["data_fingerprint"] == "abc"
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert not loaded.training
    assert info.labels == tuple(f"c{i}" for i in range(10)) and info.metrics == {"test_accuracy": 0.5}
    assert info.input_spec == model.input_spec
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not list((tmp_path / "ck").glob(".*.tmp")), "atomic writes leave no temp files"


def test_plain_state_dict_needs_arch_and_loads_with_it(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError, match="--arch"):
        load_checkpoint(tmp_path / "w.pt")
    loaded, _ = load_checkpoint(tmp_path / "w.pt", arch="resnet20", num_classes=10, in_channels=1, image_size=28)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "w.pth")
    with pytest.raises(InputError) as err:
        load_checkpoint(tmp_path / "w.pth", arch="resnet20", num_classes=5, in_channels=1, shortcut="B")
    msg = str(err.value)
    assert "missing keys: layer2.0.shortcut.0.weight" in msg
    assert "fc.weight: file (10, 64) vs model (5, 64)" in msg
    assert "unexpected keys: none" in msg


class _Payload:
    """Unpickling this creates a sentinel file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": _Payload(str(sentinel))}, f)
    with pytest.raises(InputError, match="refused for safety"):
        load_checkpoint(tmp_path / "evil.pt", arch="resnet20")
    assert not sentinel.exists()


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    save_checkpoint(_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="sha256 .* does not match"):
        load_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    meta["weights_sha256"] = None
    (tmp_path / "ck" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")
    # Garbage reaches the unpickler's internals in many ways (IndexError, KeyError, TypeError...): every one of
    # them must come back as the same clear error, so try many seeded payloads, not one random one.
    rng = np.random.default_rng(0)
    for _ in range(300):
        (tmp_path / "bad.pt").write_bytes(rng.integers(0, 256, int(rng.integers(1, 96)), dtype=np.uint8).tobytes())
        with pytest.raises(InputError, match="not a readable PyTorch state_dict|pickle that imports or calls code|does not hold a state_dict"):
            load_checkpoint(tmp_path / "bad.pt", arch="resnet20")
    (tmp_path / "ck" / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable or incomplete"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
