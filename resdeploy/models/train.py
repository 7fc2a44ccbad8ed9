"""A small, deterministic CPU trainer: a registry architecture, or the user's own network (any ``nn.Module`` whose
output is (batch, classes) logits, built by their factory), trained on real packaged data."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resdeploy.models.base import ResidualNet
from resdeploy.models.checkpoint import save_checkpoint
from resdeploy.models.data import DataBundle, Split, fit_images, load_data, normalize
from resdeploy.models.registry import create_model
from resdeploy.models.spec import InputSpec
from resdeploy.models.user import FactoryRef, attach_card, build_checked


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    data: str = "mnist"  # mnist | digits | image folder | .npz
    epochs: int = 10  # resnet20 on the MNIST split reaches ~98-99% in 10
    batch_size: int = 64
    lr: float = 0.1  # peak of the one-cycle schedule (SGD, Nesterov momentum 0.9)
    weight_decay: float = 5e-4
    augment: bool = True  # random shifts of up to 2 px: cheap and enough for digits
    seed: int = 0  # seeds torch, numpy and the split
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    image_size: int | None = None  # train at this size (bilinear resize of the data); None = the data's own size
    channels: int | None = None  # grey images repeated to this many channels (e.g. 3 for ImageNet ResNets)
    max_batches: int | None = None  # cap batches per epoch (smoke tests)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    factory: FactoryRef | None = None  # train the user's network from this factory instead of ``arch``
    input_shape: tuple[int, int, int] | None = None  # fit the data to this C,H,W; None = image_size/channels
    mean: tuple[float, ...] = ()  # the factory network's normalisation; () = the train split's statistics
    std: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()  # class names for the factory network; () = the data's classes

    @property
    def name(self) -> str:
        return self.factory.name if self.factory is not None else self.arch


@dataclass(frozen=True)
class TrainResult:
    arch: str
    test_accuracy: float
    val_accuracy: float
    seconds: float
    epochs: int
    checkpoint: Path | None

    def __str__(self) -> str:
        return (f"{self.arch}: test accuracy {self.test_accuracy:.2%}, val {self.val_accuracy:.2%}, "
                f"{self.epochs} epochs in {self.seconds:.1f} s -> {self.checkpoint}")


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px with zero fill (pad, then a random crop per batch)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on already-normalised ``images``."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(torch.from_numpy(images[i:i + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return correct / max(len(labels), 1)


def build_for_data(arch: str, data: DataBundle, **kwargs: Any) -> ResidualNet:
    """The architecture sized for the data: channels, image size, classes, and train-split statistics."""
    c, h, w = data.shape
    mean, std = data.channel_stats()
    defaults = dict(num_classes=len(data.classes), in_channels=c, image_size=h, mean=list(mean), std=list(std), labels=list(data.classes))
    return create_model(arch, **{**defaults, **kwargs})


def build_factory_for_data(ref: FactoryRef, data: DataBundle, mean: tuple[float, ...] = (), std: tuple[float, ...] = (),
                           labels: tuple[str, ...] = ()) -> torch.nn.Module:
    """The user's network from its factory, checked against the data: it takes the data's shape and returns one
    logit per class. Normalisation: ``mean``/``std`` when given, else the train split's statistics."""
    c, h, w = data.shape
    dm, ds = data.channel_stats()
    spec = InputSpec(c, h, w, mean=tuple(mean) or dm, std=tuple(std) or ds)
    model, classes = build_checked(ref, spec.shape, len(data.classes), data.name)
    attach_card(model, spec, labels or data.classes, classes, f"factory {ref.spec}")
    return model


def resize_data(data: DataBundle, channels: int, size: int, width: int | None = None) -> DataBundle:
    """The same split at another size/channel count (the fingerprint is kept: same images, same split)."""
    import dataclasses

    shape = (channels, size, width or size)

    def fit(split: Split) -> Split:
        return Split(fit_images(split.images, shape), split.labels)

    return dataclasses.replace(data, train=fit(data.train), val=fit(data.val), test=fit(data.test))


def train(config: TrainConfig, out_dir: str | Path | None = None, data: DataBundle | None = None) -> TrainResult:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = data or load_data(config.data, seed=config.seed)
    if config.input_shape is not None and tuple(config.input_shape) != data.shape:
        data = resize_data(data, *config.input_shape)
    elif config.image_size or config.channels:
        data = resize_data(data, config.channels or data.shape[0], config.image_size or data.shape[1])
    if config.factory is not None:
        model = build_factory_for_data(config.factory, data, config.mean, config.std, config.labels)
    else:
        model = build_for_data(config.arch, data, **config.arch_kwargs)
    spec = model.input_spec
    x_train = torch.from_numpy(normalize(data.train.images, spec.mean, spec.std))
    y_train = torch.from_numpy(data.train.labels)
    x_val = normalize(data.val.images, spec.mean, spec.std)
    x_test = normalize(data.test.images, spec.mean, spec.std)

    steps_per_epoch = -(-len(y_train) // config.batch_size)
    if config.max_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_batches)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.25)
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    bar = None
    if config.progress and sys.stderr.isatty():  # a bar on a terminal only: piped into a CI log it is noise
        from tqdm import tqdm

        bar = tqdm(total=config.epochs * steps_per_epoch, unit="batch", desc=f"train {config.name}", mininterval=0.1)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if config.augment:
                xb = _shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    val_acc = evaluate(model, x_val, data.val.labels)
    test_acc = evaluate(model, x_test, data.test.labels)
    ckpt = None
    if out_dir is not None:
        metrics = {"test_accuracy": test_acc, "val_accuracy": val_acc, "train_seconds": round(seconds, 2), "epochs": config.epochs,
                   "data": data.name, "split": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}}
        ckpt = save_checkpoint(model, out_dir, metrics=metrics, data_fingerprint=data.fingerprint,
                               factory=config.factory.to_dict() if config.factory is not None else None)
    return TrainResult(config.name, test_acc, val_acc, seconds, config.epochs, ckpt)
