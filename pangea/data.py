"""Built-in datasets, .npz datasets, and the global batch order shared by every role.

The order of samples depends only on (seed, epoch), never on the number of workers:
that is what makes distributed training comparable with the single-process reference.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DIGITS_SPLIT_SEED = 1234  # fixed: the digits train/test split never changes
_DIGITS_TEST_FRACTION = 0.25
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A dataset that cannot be loaded, with a one-line reason."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, (n, ...)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_dataset(spec: str) -> Dataset:
    """`digits` (scikit-learn's bundled digits, scaled to [0, 1]) or a path to an .npz file."""
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if path.suffix == ".npz" or path.exists():
        return _npz(path)
    raise DataError(f"unknown dataset {spec!r}: use 'digits' or a path to an .npz file")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * _DIGITS_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test])


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs {', '.join(_NPZ_KEYS)})")
            arrays = {k: f[k] for k in _NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or y.ndim != 1:
            raise DataError(f"{path}: x_{split} and y_{split} must have the same length, y 1-d")
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{path}: y_{split} must hold non-negative integer class labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train and x_test sample shapes differ")
    return Dataset(
        path.stem,
        arrays["x_train"].astype(np.float32),
        arrays["y_train"].astype(np.int64),
        arrays["x_test"].astype(np.float32),
        arrays["y_test"].astype(np.int64),
    )


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Global batches per epoch; the last one may be short (no sample is dropped)."""
    return math.ceil(num_samples / batch_size)


def position(round_: int, num_samples: int, batch_size: int) -> tuple[int, int]:
    """(epoch, step) of a round."""
    return divmod(round_, steps_per_epoch(num_samples, batch_size))


def global_batch(num_samples: int, batch_size: int, seed: int, epoch: int, step: int) -> np.ndarray:
    """Sample indices of global batch `step` of `epoch`: a seeded shuffle, cut in order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[step * batch_size : (step + 1) * batch_size]
