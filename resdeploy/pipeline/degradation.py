"""The degradation experiment (He et al. 2015, Fig. 1 and Fig. 6): plain and residual nets of two depths trained
with one schedule on packaged data; training and test error per epoch, as JSON and one PNG.

The claim under test: a deeper *plain* net reaches a higher training error than a shallower one (an optimisation
problem, not overfitting), while the deeper *residual* net does not. Training error is measured in eval mode over
the whole training split after each epoch (so BatchNorm's running statistics and the same weights are judged for
train and test alike); test error on the held-out test split.

Defaults are the ones the README run used: scikit-learn's 8x8 digits (1,257 training images), no augmentation,
SGD with momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, lr divided by 10 at 50 % and 75 % of the epochs (He
et al.'s step schedule, shortened). MNIST at 28x28 is both slower on 2 CPU cores and, with BatchNorm, easy enough
that all four nets reach near-zero training error quickly, which hides the effect being measured.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resdeploy import atomic
from resdeploy.errors import InputError

NETS = ("plain20", "plain56", "resnet20", "resnet56")
# "Trains worse" means a last-quarter training error more than one percentage point above the shallower net's:
# two or three misfit images out of 1,257 are noise, not degradation.
WORSE_BY = 0.01


@dataclass(frozen=True)
class DegradationConfig:
    nets: tuple[str, ...] = NETS
    data: str = "digits"  # a load_data source: digits (8x8, the default) | mnist | folder | .npz
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    train_limit: int | None = None  # use only the first N training images (a harder, smaller problem)
    image_size: int | None = None  # resize the data (None: its own size)
    seed: int = 0
    threads: int = 1  # torch threads: 1 is fastest on a shared CPU (more threads spin-wait under contention)


@dataclass(frozen=True)
class NetHistory:
    net: str
    params: int
    train_error: tuple[float, ...]  # per epoch, eval mode over the whole training split
    test_error: tuple[float, ...]  # per epoch, test split
    seconds: float


@dataclass(frozen=True)
class DegradationResult:
    config: DegradationConfig
    data: str  # what was trained on, in words
    histories: tuple[NetHistory, ...]
    seconds: float
    machine: dict[str, Any] = field(default_factory=dict)

    def final(self, net: str) -> NetHistory:
        return next(h for h in self.histories if h.net == net)

    def verdict(self) -> dict[str, Any]:
        """Did the deeper plain net train worse than the shallower (degradation), and the deeper ResNet not?

        Judged on the mean training error over the last quarter of the epochs (less noisy than the last epoch),
        with a margin of :data:`WORSE_BY`.
        """
        out: dict[str, Any] = {}
        for family in ("plain", "resnet"):
            nets = sorted((h for h in self.histories if h.net.startswith(family)), key=lambda h: int(h.net[len(family):]))
            if len(nets) < 2:
                continue
            shallow, deep = nets[0], nets[-1]
            tail = max(1, len(shallow.train_error) // 4)
            s_tail, d_tail = float(np.mean(shallow.train_error[-tail:])), float(np.mean(deep.train_error[-tail:]))
            out[family] = {"shallow": shallow.net, "deep": deep.net,
                           "final_train_error": [shallow.train_error[-1], deep.train_error[-1]],
                           "final_test_error": [shallow.test_error[-1], deep.test_error[-1]],
                           "last_quarter_train_error": [s_tail, d_tail],
                           "deeper_trains_worse": d_tail > s_tail + WORSE_BY}
        if "plain" in out and "resnet" in out:
            out["degradation_shown"] = bool(out["plain"]["deeper_trains_worse"] and not out["resnet"]["deeper_trains_worse"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "data": self.data, "seconds": round(self.seconds, 1),
                "machine": self.machine, "verdict": self.verdict(),
                "histories": [asdict(h) for h in self.histories]}

    def __str__(self) -> str:
        lines = [f"degradation experiment on {self.data}: {self.config.epochs} epochs, {self.seconds:.0f} s",
                 f"{'net':<10} {'params':>9} {'train err':>10} {'test err':>9} {'seconds':>8}"]
        for h in self.histories:
            lines.append(f"{h.net:<10} {h.params:>9,} {h.train_error[-1]:>10.2%} {h.test_error[-1]:>9.2%} {h.seconds:>8.0f}")
        v = self.verdict()
        for family in ("plain", "resnet"):
            if family in v:
                f = v[family]
                lines.append(f"{family}: {f['deep']} vs {f['shallow']} last-quarter train error "
                             f"{f['last_quarter_train_error'][1]:.2%} vs {f['last_quarter_train_error'][0]:.2%}: "
                             + ("deeper trains worse" if f["deeper_trains_worse"] else "deeper trains as well or better"))
        if "degradation_shown" in v:
            lines.append("degradation shown (deeper plain worse, deeper ResNet not)" if v["degradation_shown"]
                         else "degradation NOT shown in this run")
        return "\n".join(lines)


def _errors(model: Any, x: Any, y: Any, batch: int = 512) -> float:
    import torch

    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            wrong += int((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum())
    return wrong / max(len(y), 1)


def run_degradation(config: DegradationConfig = DegradationConfig(),
                    progress: Callable[[str], None] | None = None) -> DegradationResult:
    """Train every net in ``config.nets`` with the same data, schedule and seed; errors per epoch."""
    import torch
    import torch.nn.functional as F

    from resdeploy.models import load_data, normalize
    from resdeploy.models.registry import list_models
    from resdeploy.models.train import build_for_data, resize_data

    unknown = [n for n in config.nets if n not in list_models()]
    if unknown:
        raise InputError(f"unknown nets {unknown}; the experiment compares plain<depth> with resnet<depth> "
                         "(see `resdeploy models`)")
    if config.epochs < 1:
        raise InputError(f"epochs must be >= 1, got {config.epochs}")
    say = progress or (lambda msg: None)
    torch.set_num_threads(max(1, config.threads))
    data = load_data(config.data, seed=config.seed)
    if config.image_size:
        data = resize_data(data, data.shape[0], config.image_size)
    train_x, train_y = data.train.images, data.train.labels
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    described = (f"{data.name} {'x'.join(map(str, data.shape))}, {len(train_y)} train / {len(data.test)} test images, "
                 "no augmentation")
    histories: list[NetHistory] = []
    start = time.perf_counter()
    for net in config.nets:
        torch.manual_seed(config.seed)
        model = build_for_data(net, data)
        spec = model.input_spec
        xt = torch.from_numpy(normalize(train_x, spec.mean, spec.std))
        yt = torch.from_numpy(train_y)
        xs = torch.from_numpy(normalize(data.test.images, spec.mean, spec.std))
        ys = torch.from_numpy(data.test.labels)
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        # He et al.'s schedule, shortened: lr / 10 at half and three quarters of training.
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, config.epochs // 2), max(1, 3 * config.epochs // 4)], 0.1)
        gen = torch.Generator().manual_seed(config.seed)
        tr_err: list[float] = []
        te_err: list[float] = []
        t0 = time.perf_counter()
        for epoch in range(config.epochs):
            model.train()
            order = torch.randperm(len(yt), generator=gen)
            for i in range(0, len(yt), config.batch_size):
                idx = order[i:i + config.batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm needs two samples
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            tr_err.append(_errors(model, xt, yt))
            te_err.append(_errors(model, xs, ys))
            say(f"{net} epoch {epoch + 1}/{config.epochs}: train error {tr_err[-1]:.2%}, test error {te_err[-1]:.2%}")
        histories.append(NetHistory(net, sum(p.numel() for p in model.parameters()), tuple(tr_err), tuple(te_err),
                                    round(time.perf_counter() - t0, 1)))
    machine = {"cpu": platform.processor() or platform.machine(), "torch_threads": config.threads,
               "torch": torch.__version__}
    return DegradationResult(config, described, tuple(histories), time.perf_counter() - start, machine)


def plot_degradation(result: DegradationResult, path: str | Path) -> Path:
    """One PNG in the style of He et al. 2015 Fig. 1/6: left plain nets, right ResNets; thin dashed lines
    training error, bold lines test error; the deeper net in red."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90, sharey=True)
    colors = ("tab:orange", "tab:red")
    for ax, family, title in ((axes[0], "plain", "plain"), (axes[1], "resnet", "ResNet")):
        nets = sorted((h for h in result.histories if h.net.startswith(family)), key=lambda h: int(h.net[len(family):]))
        for k, h in enumerate(nets):
            epochs = np.arange(1, len(h.train_error) + 1)
            c = colors[min(k, 1)] if len(nets) <= 2 else plt.get_cmap("autumn")(k / max(1, len(nets) - 1))
            ax.plot(epochs, 100 * np.asarray(h.train_error), "--", color=c, linewidth=1.0)
            ax.plot(epochs, 100 * np.asarray(h.test_error), "-", color=c, linewidth=2.2,
                    label=f"{title}-{h.net[len(family):]}")
        ax.set_title(f"{title} nets")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=9)
    axes[0].set_ylabel("error (%)")
    top = max(max(max(h.train_error), max(h.test_error)) for h in result.histories)
    axes[0].set_ylim(0, min(100, 100 * top * 1.05 + 1))
    fig.suptitle(f"{result.data}, {result.config.epochs} epochs (dashed: training error, bold: test error)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_outputs(result: DegradationResult, out_dir: str | Path) -> tuple[Path, Path]:
    """``degradation.json`` and ``degradation.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic.write_text(out / "degradation.json", json.dumps(result.to_dict(), indent=2))
    png = plot_degradation(result, out / "degradation.png")
    return js, png


def quick_config(nets: Sequence[str] = NETS) -> DegradationConfig:
    """A few minutes on 2 shared cores: the same schedule, fewer epochs, half the training images."""
    return DegradationConfig(nets=tuple(nets), epochs=8, train_limit=640)
