"""Calibration data for INT8: real, already-normalised images fed to ONNX Runtime's calibrator in batches.

The caller (the pipeline) decides where the images come from; by convention it is the data module's val split,
never the test split, so the accuracy measured on the test split stays an honest one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from resdeploy.errors import InputError


@dataclass(frozen=True)
class CalibrationSet:
    """Normalised NCHW float32 images plus where they came from (recorded in the variant's metadata)."""

    images: np.ndarray  # float32 (N, C, H, W), already normalised with the model's mean/std
    source: str = "array"  # data name, e.g. "mnist"
    split: str = "val"  # which split of the source
    fingerprint: str = ""  # the source's fingerprint (DataBundle.fingerprint)

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32:
            shape = getattr(x, "shape", None)
            raise InputError(f"calibration images must be a float32 (N, C, H, W) array; got {type(x).__name__} "
                             f"{getattr(x, 'dtype', '')} {shape}. Normalise the [0, 1] images with the model's mean/std first")
        if len(x) == 0:
            raise InputError("the calibration set is empty; give at least one image (a few hundred is typical)")
        if not np.isfinite(x).all():
            raise InputError("the calibration images hold NaN or inf; check the data and the normalisation")

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict[str, object]:
        return {"data": self.source, "split": self.split, "count": len(self), "fingerprint": self.fingerprint}


def even_batch_size(n: int, batch_size: int) -> int:
    """The largest batch size <= ``batch_size`` that divides ``n``.

    ORT's histogram calibrators (percentile, entropy) stack per-batch outputs into one array, which fails on a
    ragged last batch ("inhomogeneous shape"); equal batches keep every calibration image.
    """
    return next(b for b in range(max(1, min(batch_size, n)), 0, -1) if n % b == 0)


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    batch_size = even_batch_size(len(images), batch_size)
    for i in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[i:i + batch_size])


# Values (all images of one calibration pass) an image model's input may hold before the calibrator is fed in
# chunks. ORT's calibrators keep every intermediate tensor of every batch they are given until the pass ends: a
# ResNet-50 at 224x224 holds ~100 MB of activations per image, so 500 images in one pass need ~50 GB. Fed in chunks
# (ORT's CalibStridedMinMax: one collect_data per chunk, ranges and histograms merged), memory stays at one chunk.
CHUNK_INPUT_VALUES = 1 << 22  # 4M input values per chunk: 27 images at 3x224x224, 1365 at 3x32x32


def chunk_batches(n_images: int, batch_size: int, image_values: int, budget: int | None = None) -> int:
    """Batches per calibration chunk: as many as ``budget`` input values allow (at least one), dividing the batch
    count exactly (ORT refuses a ragged last chunk)."""
    batch_size = even_batch_size(n_images, batch_size)
    n_batches = max(1, n_images // batch_size)
    budget = CHUNK_INPUT_VALUES if budget is None else budget
    most = max(1, budget // max(1, image_values * batch_size))
    return next(k for k in range(min(most, n_batches), 0, -1) if n_batches % k == 0)


def make_reader(images: np.ndarray, input_name: str, batch_size: int):  # noqa: ANN201 - onnxruntime type
    """A ``CalibrationDataReader`` over ``images``: rewindable, so calibrators that read twice (entropy) work, and
    with ``len``/``set_range`` (in batches), so ORT can feed its calibrator one chunk at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    all_batches = list(batches(images, batch_size))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(all_batches))

        def __len__(self) -> int:
            return len(all_batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._range = all_batches[start_index:end_index]
            self._it = iter(self._range)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(self._range)

    return _Reader()
