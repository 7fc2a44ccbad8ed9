"""Safe checkpoints: ``model.safetensors`` + ``model.json``; plain state_dicts read with weights_only only.

Nothing here ever unpickles code: safetensors holds raw tensors, and ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)``, which refuses any pickle that would import or call something.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import resdeploy
from resdeploy import atomic
from resdeploy.errors import InputError
from resdeploy.models.base import ResidualNet
from resdeploy.models.registry import create_model
from resdeploy.models.spec import InputSpec

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT = "resdeploy-checkpoint/1"


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a loaded checkpoint (``model.json``), plus where it came from."""

    arch: str
    kwargs: dict[str, Any]
    input_spec: InputSpec
    labels: tuple[str, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    resdeploy_version: str | None = None
    weights_sha256: str | None = None
    path: Path | None = None


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    *,
    factory: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` then ``out_dir/model.json`` (which records the weights' sha256).

    ``factory``: for a user's network (``{"factory": spec, "factory_kwargs": {...}}``, models.user.FactoryRef.to_dict()),
    recorded instead of a registry architecture; loading such a checkpoint needs the factory given again."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = "" if factory else model.arch
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "arch": arch or str(factory.get("factory", ""))})
    meta = {
        "format": FORMAT,
        "arch": arch,
        "kwargs": {} if factory else model.arch_kwargs,
        **(factory or {}),
        "input_spec": model.input_spec.to_dict(),
        "labels": list(model.labels),
        "metrics": metrics or {},
        "data_fingerprint": data_fingerprint,
        "resdeploy_version": resdeploy.__version__,
        "weights_sha256": atomic.sha256_file(out / WEIGHTS_NAME),
    }
    atomic.write_json(out / META_NAME, meta)
    return out


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """Return (weights file, metadata file or None) for a checkpoint dir, its json, or a weights file."""
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist; give a checkpoint folder (model.json + model.safetensors) or a .safetensors/.pt/.pth file")
    if path.is_dir():
        meta = path / META_NAME
        if not meta.is_file():
            raise InputError(f"checkpoint folder {path} has no {META_NAME}; write checkpoints with `resdeploy train` or save_checkpoint()")
        return path / WEIGHTS_NAME, meta
    if path.name == META_NAME:
        return path.parent / WEIGHTS_NAME, path
    sibling = path.parent / META_NAME
    return path, (sibling if path.suffix == ".safetensors" and sibling.is_file() else None)


def read_checkpoint_meta(path: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, model.json contents) of a checkpoint folder (or its model.json); InputError without one."""
    weights, meta_path = _resolve(path)
    if meta_path is None:
        raise InputError(f"{path} is not a checkpoint folder (model.json + model.safetensors)")
    return weights, _read_meta(meta_path)


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
        meta["arch"], meta["input_spec"]  # noqa: B018 - required keys
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"checkpoint metadata {meta_path} is unreadable or incomplete ({exc}); re-save the checkpoint") from None
    return meta


_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _pickle_calls(weights: Path) -> list[str]:
    """Name the imports/calls in a pickle by disassembling it (pickletools never executes anything)."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(weights):
            with zipfile.ZipFile(weights) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = weights.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]))
        # torch's own rebuild helpers are what weights_only allows; any other import is foreign code.
        return [f for f in dict.fromkeys(found) if f not in _CODE_OPS and not f.startswith("torch.") and f != "collections.OrderedDict"]
    except Exception:  # noqa: BLE001 - a corrupt pickle can fail anywhere in the disassembler: then it names nothing
        return []


def _code_archive(weights: Path) -> str:
    """What kind of code-carrying archive ``weights`` is ('' for none): TorchScript or a torch.export program."""
    import zipfile

    if weights.suffix == ".pt2":
        return "a torch.export program (.pt2; torch.export.load falls back to full unpickling)"
    try:
        if not zipfile.is_zipfile(weights):
            return ""
        with zipfile.ZipFile(weights) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return ""
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "a TorchScript archive (torch.jit.save; it carries Python code)"
    if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
        return "a torch.export program (torch.export.save; torch.export.load falls back to full unpickling)"
    return ""


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Read tensors only. A ``.pt``/``.pth`` pickle that carries code is refused, never executed."""
    if not weights.is_file():
        raise InputError(f"weights file {weights} does not exist")
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{weights} is not a readable safetensors file ({exc}); it may be truncated or corrupt, re-save it") from None
    refused = _code_archive(weights)
    if refused:
        raise InputError(f"{weights} is {refused}, refused for safety: loading it runs code. Save the weights as a "
                         "state_dict (torch.save(model.state_dict(), path)) or a safetensors file")
    if weights.suffix not in (".pt", ".pth", ".bin"):
        raise InputError(f"{weights}: unknown weights format {weights.suffix!r}; use .safetensors, .pt or .pth")
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        calls = _pickle_calls(weights)
        if calls:
            raise InputError(
                f"{weights} is a pickle that imports or calls code ({', '.join(calls[:4])}), refused for safety "
                "(read with torch.load(weights_only=True); nothing was executed). Save a plain state_dict "
                "(torch.save(model.state_dict(), path)) or a safetensors file instead"
            ) from None
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise InputError(f"{weights} is not a readable PyTorch state_dict ({detail}); it may be truncated or corrupt") from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes reach the unpickler's internals (IndexError, KeyError...)
        raise InputError(f"{weights} is not a readable PyTorch state_dict ({type(exc).__name__}: {exc}); it may be "
                         "truncated or corrupt") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{weights} does not hold a state_dict (a dict of tensor names to tensors)")
    return obj


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                           hint: str = "check --arch and its options (num_classes, in_channels, shortcut)") -> None:
    """``load_state_dict(strict=True)`` with one message listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        def show(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "") if items else "none"

        raise InputError(
            f"weights in {source} do not match the model: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; mis-shaped keys: {show(misshaped)}. Fix: {hint}"
        )
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, arch: str | None = None, **kwargs: Any) -> tuple[ResidualNet, CheckpointInfo]:
    """Load a checkpoint folder, or a bare state_dict file with ``arch`` (+ architecture kwargs). Eval mode."""
    weights, meta_path = _resolve(Path(path))
    if meta_path is not None:
        meta = _read_meta(meta_path)
        if meta.get("factory"):
            raise InputError(f"checkpoint {path} was trained from your factory {meta['factory']!r}; load it with "
                             f"--model {meta['factory']} --weights {weights} (importing the factory runs its code)")
        if arch is not None and arch != meta["arch"]:
            raise InputError(f"--arch {arch} given, but checkpoint {path} is a {meta['arch']}; drop --arch")
        arch, kwargs = meta["arch"], {**meta.get("kwargs", {}), **kwargs}
    elif arch is None:
        raise InputError(f"{path} is a bare state_dict with no {META_NAME}; say which architecture it is with --arch")
    model = create_model(arch, **kwargs)
    if meta_path is not None and meta.get("weights_sha256") and weights.is_file():
        actual = atomic.sha256_file(weights)
        if actual != meta["weights_sha256"]:
            raise InputError(f"{weights} sha256 {actual[:12]}... does not match {meta_path} ({meta['weights_sha256'][:12]}...); the weights were changed or truncated, re-save the checkpoint")
    state = read_state_dict(weights)
    load_state_dict_strict(model, state, str(weights))
    model.eval()
    if meta_path is not None:
        spec = InputSpec.from_dict(meta["input_spec"])
        model.input_spec = spec
        model.labels = tuple(meta.get("labels") or model.labels)
        info = CheckpointInfo(arch, dict(kwargs), spec, model.labels, meta.get("metrics", {}), meta.get("data_fingerprint"),
                              meta.get("resdeploy_version"), meta.get("weights_sha256"), weights.parent)
    else:
        info = CheckpointInfo(arch, dict(kwargs), model.input_spec, model.labels, path=weights)
    return model, info
