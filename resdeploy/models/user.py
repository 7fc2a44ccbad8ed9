"""The user's own network: a factory they name, its keyword arguments, and their trained weights.

    ref = FactoryRef("torchvision.models:resnet18", {"num_classes": 10})
    model = load_user_model(ref, "resnet18.safetensors", InputSpec(3, 64, 64, mean=(0.5,) * 3, std=(0.25,) * 3))

A factory is ``package.module:callable`` or ``path/to/file.py:callable`` (Polygraphy's ``script.py:func``); the
callable, given the kwargs, returns the ``nn.Module``. **Importing it runs the user's code** (the module's top
level and the callable), as their own training script does. resdeploy imports only a factory the user names on
the command line or in their config, never one that a file it reads names: a checkpoint trained here from a
factory records the factory's name, and loading it needs the factory given again.

Weights are data, never code: ``.safetensors``, or a state_dict ``.pt``/``.pth`` read with
``torch.load(weights_only=True)``; keys must match the module's exactly. ``.pt2`` files (``torch.export.load``
falls back to full unpickling) and TorchScript archives (they carry code) are refused, with the reason.

The module gets two attributes the rest of resdeploy reads: ``input_spec`` (shape and normalisation) and
``labels``. Its output must be classification logits, shaped (batch, classes).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resdeploy import atomic
from resdeploy.errors import InputError
from resdeploy.models.checkpoint import load_state_dict_strict, read_checkpoint_meta, read_state_dict
from resdeploy.models.spec import InputSpec

_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
SPEC_HELP = "write MODULE:CALLABLE (e.g. torchvision.models:resnet18) or path/to/file.py:CALLABLE"


@dataclass(frozen=True)
class FactoryRef:
    """A factory the user named, and the keyword arguments it is called with."""

    spec: str  # "package.module:callable" or "path/to/file.py:callable"
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # JSON-like values (numbers, strings, lists, tables)

    @property
    def name(self) -> str:
        """The callable's own name (``resnet18``): the model's default name in a repository."""
        return self.spec.rpartition(":")[2].rpartition(".")[2] or "model"

    def describe(self) -> str:
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in self.kwargs.items())
        return f"{self.spec}({args})"

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.spec, "factory_kwargs": dict(self.kwargs)}


def split_spec(spec: str) -> tuple[str, str]:
    """(module name or .py path, attribute path) of a factory spec; InputError when it is not one."""
    if spec.endswith((".pt2", ".pt", ".pth", ".ts", ".jit", ".safetensors")):
        raise InputError(f"--model {spec!r} is a saved file, not a factory; give the code that builds the network "
                         "(MODULE:CALLABLE) and its weights with --weights (.safetensors or a state_dict). A .pt2 "
                         "program or a TorchScript archive is refused: loading either runs code")
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _ATTR.fullmatch(attr):
        raise InputError(f"--model {spec!r} is not a factory; {SPEC_HELP}")
    if not target.endswith(".py") and not _ATTR.fullmatch(target):
        raise InputError(f"--model {spec!r}: {target!r} is neither a module name nor a .py file; {SPEC_HELP}")
    return target, attr


def _import_target(target: str, spec: str) -> Any:
    """The module ``target`` names (a dotted module or a .py file), imported: this runs its top level."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"--model {spec!r}: file {path} does not exist; give the .py file that defines the factory")
        name = f"resdeploy_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"--model {spec!r}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.parent.resolve()))  # its sibling modules import as they do in the user's script
        try:
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code can raise anything
            sys.modules.pop(name, None)
            raise InputError(f"--model {spec!r}: importing {path} raised {_one_line(exc)}; fix the file") from None
        finally:
            sys.path.remove(str(path.parent.resolve()))
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        where = "" if exc.name == target else f" (while importing {target})"
        raise InputError(f"--model {spec!r}: no module named {exc.name!r}{where}; install it in this environment, "
                         "or give path/to/file.py:CALLABLE") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"--model {spec!r}: importing {target} raised {_one_line(exc)}; fix the module") from None


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names. Imports its module, so it runs the user's code."""
    target, attr = split_spec(spec)
    obj = _import_target(target, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise InputError(f"--model {spec!r}: {target} has no {part!r}; callables there: {shown or 'none'}") from None
    if not callable(obj):
        raise InputError(f"--model {spec!r}: {attr} is a {type(obj).__name__}, not a callable; name the function or "
                         "class that builds the model")
    return obj


def build_module(ref: FactoryRef) -> nn.Module:
    """Call the factory (after importing it) and check it returned an eager ``nn.Module``."""
    fn = import_factory(ref.spec)
    try:
        model = fn(**dict(ref.kwargs))
    except Exception as exc:  # noqa: BLE001 - the user's code can raise anything
        raise InputError(f"factory {ref.describe()} raised {_one_line(exc)}; check --model-kwargs "
                         "(factory_kwargs) against its signature") from None
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"factory {ref.spec} returned a TorchScript module; return the eager nn.Module "
                         "(resdeploy exports it with torch.export)")
    if not isinstance(model, nn.Module):
        raise InputError(f"factory {ref.spec} returned {type(model).__name__}, not a torch.nn.Module; name the callable "
                         "that builds and returns the network")
    return model


def probe_classes(model: nn.Module, shape: tuple[int, int, int], name: str) -> int:
    """Run a batch of 2 zero images of ``shape`` through ``model`` (eval mode); return its number of logits."""
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - a shape mismatch surfaces as any error type in user code
        raise InputError(f"{name} rejects input shape {','.join(map(str, shape))} ({_one_line(exc)}); give "
                         "--input-shape C,H,W that it takes (model.input_shape)") from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"{name} returns {type(out).__name__}, not a tensor of logits; wrap it so forward returns "
                         "(batch, classes) logits")
    if out.ndim != 2 or out.shape[0] != 2:
        raise InputError(f"{name} returns shape {tuple(out.shape)} for a batch of 2; resdeploy deploys classifiers "
                         "whose output is (batch, classes) logits")
    return int(out.shape[1])


def build_checked(ref: FactoryRef, shape: tuple[int, int, int], classes: int | None = None,
                  data_name: str = "the data") -> tuple[nn.Module, int]:
    """(the factory's module with its initial weights, its number of logits), checked on ``shape`` and, when
    ``classes`` is given, against the data's number of classes."""
    model = build_module(ref)
    n = probe_classes(model, shape, f"factory {ref.spec}")
    if classes is not None and n != classes:
        raise InputError(f"factory {ref.spec} returns {n} logits but {data_name} has {classes} classes; make it return "
                         f"{classes} (e.g. --model-kwargs '{{\"num_classes\": {classes}}}')")
    return model, n


def attach_card(model: nn.Module, spec: InputSpec, labels: tuple[str, ...] | list[str], classes: int, name: str) -> None:
    """Give ``model`` the ``input_spec`` and ``labels`` attributes every stage reads."""
    labels = tuple(str(x) for x in labels) or tuple(str(i) for i in range(classes))
    if len(labels) != classes:
        raise InputError(f"{len(labels)} labels given but {name} returns {classes} logits; give one label per class")
    try:
        model.input_spec = spec
        model.labels = labels
    except (AttributeError, TypeError) as exc:
        raise InputError(f"{name} does not accept the attributes input_spec/labels ({exc}); rename its own") from None


def load_user_model(ref: FactoryRef, weights: str | Path | None, spec: InputSpec,
                    labels: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """The factory's module with ``weights`` loaded strictly (None: its own initial weights), in eval mode,
    checked on ``spec``'s shape, carrying ``input_spec`` and ``labels``."""
    model = build_module(ref)
    if weights is not None:
        state = read_state_dict(Path(weights))
        load_state_dict_strict(model, state, str(weights), hint="check --model and --model-kwargs")
    classes = probe_classes(model, spec.shape, f"factory {ref.spec}")
    attach_card(model, spec, labels, classes, f"factory {ref.spec}")
    return model.eval()


def load_factory_checkpoint(path: str | Path, ref: FactoryRef) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint folder trained here from ``ref`` (its model.json names the factory): (module, metadata)."""
    weights, meta = read_checkpoint_meta(Path(path))
    if meta.get("factory") != ref.spec or dict(meta.get("factory_kwargs") or {}) != dict(ref.kwargs):
        raise InputError(f"checkpoint {path} was trained from {meta.get('factory') or meta.get('arch')!r} with "
                         f"{meta.get('factory_kwargs')}, not {ref.describe()}; give the factory it was trained from")
    model = load_user_model(ref, weights, InputSpec.from_dict(meta["input_spec"]), tuple(meta.get("labels") or ()))
    return model, meta


def factory_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies an imported factory's code for a cache key: the sha256 of the file its module lives in and
    the version of the distribution that ships it (call after :func:`import_factory`)."""
    target, _ = split_spec(spec)
    out: dict[str, Any] = {"spec": spec}
    if target.endswith(".py"):
        origin: str | None = target
    else:
        origin = getattr(sys.modules.get(target), "__file__", None)
        top = target.split(".")[0]
        dists = importlib.metadata.packages_distributions().get(top) or []
        out["version"] = ",".join(f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(dists)))
    if origin and Path(origin).is_file():
        out["file_sha256"] = atomic.sha256_file(Path(origin))
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


__all__ = ["FactoryRef", "attach_card", "build_checked", "build_module", "factory_fingerprint", "import_factory", "load_factory_checkpoint",
           "load_user_model", "probe_classes", "split_spec"]
