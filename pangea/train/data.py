"""Built-in datasets, .npz datasets, and the global batch order shared by every role.

The order of samples depends only on (seed, epoch), never on the number of workers:
that is what makes distributed training comparable with the single-process reference.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pangea.errors import DataError
from pangea.wire.messages import DTYPES

log = logging.getLogger(__name__)
# What a Batch tensor can carry (bfloat16 has no numpy dtype: an .npz cannot hold it).
WIRE_DTYPES = frozenset(name for name in DTYPES if name != "bfloat16")

_DIGITS_SPLIT_SEED = 1234  # fixed: the digits train/test split never changes
_DIGITS_TEST_FRACTION = 0.25
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """Samples that fit in memory: train and test arrays (`pangea.train.tokens.TokenData` is the other kind).

    Both kinds offer the same: `num_samples` per epoch, `rows()` (rows of a global batch as named
    arrays: `x`, `y` and any others), `eval_rows()`, `input_shape`, `num_classes`,
    `targets_per_sample`.
    """

    name: str
    x_train: np.ndarray  # float32, (n, ...): as every .npz has been read (npy:DIR keeps dtypes)
    y_train: np.ndarray  # int64 class labels (n,), or any targets for a user task
    x_test: np.ndarray
    y_test: np.ndarray
    extra_train: dict[str, np.ndarray] = field(default_factory=dict)  # other named arrays, one row per sample
    extra_test: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.x_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Classes of integer labels; for other targets, the number of values per sample."""
        if np.issubdtype(self.y_train.dtype, np.integer) and self.y_train.ndim == 1:
            return int(max(self.y_train.max(), self.y_test.max())) + 1
        return int(np.prod(self.y_train.shape[1:], dtype=np.int64))

    targets_per_sample = 1
    bytes_per_token = None

    def rows(self, seed: int, batch_size: int, global_step: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of global batch `global_step`, by name: `x`, `y`, then the others."""
        n = self.num_samples
        idx = global_batch(n, batch_size, seed, *position(global_step, n, batch_size))[start:stop]
        return {"x": self.x_train[idx], "y": self.y_train[idx], **{k: v[idx] for k, v in self.extra_train.items()}}

    def batch(
        self, seed: int, batch_size: int, global_step: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of global batch `global_step`: (x, y)."""
        rows = self.rows(seed, batch_size, global_step, start, stop)
        return rows["x"], rows["y"]

    def eval_rows(self, size: int = 4096):
        """The test set in batches of named arrays."""
        for i in range(0, len(self.x_test), size):
            part = slice(i, i + size)
            yield {"x": self.x_test[part], "y": self.y_test[part], **{k: v[part] for k, v in self.extra_test.items()}}

    def eval_batches(self, size: int = 4096):
        """The test set in batches: (x, y)."""
        for rows in self.eval_rows(size):
            yield rows["x"], rows["y"]


def load_dataset(spec: str, labels: bool = True) -> Dataset:
    """`digits` (scikit-learn's bundled digits, scaled to [0, 1]) or a path to an .npz file.

    `labels`: y must hold integer class labels (classification); otherwise any numeric
    targets with one row per sample (a user task's loss decides what they mean)."""
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if path.suffix == ".npz" or path.exists():
        return _npz(path, labels)
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


def _npz(path: Path, labels: bool = True) -> Dataset:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs {', '.join(_NPZ_KEYS)})")
            arrays = {k: f[k] for k in f.files}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or (labels and y.ndim != 1):
            raise DataError(
                f"{path}: x_{split} and y_{split} must have the same length" + (", y 1-d" if labels else "")
            )
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} is empty")
        if labels and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
            raise DataError(f"{path}: y_{split} must hold non-negative integer class labels")
        if not labels and not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise DataError(f"{path}: y_{split} must be numeric, not {y.dtype}")
    for a, b in [("x_train", "x_test")] + ([] if labels else [("y_train", "y_test")]):
        if arrays[a].shape[1:] != arrays[b].shape[1:]:
            raise DataError(f"{path}: {a} and {b} sample shapes differ")
    y_type = np.int64 if labels or np.issubdtype(arrays["y_train"].dtype, np.integer) else np.float32
    extra_train, extra_test = _extra_arrays(path, arrays)
    return Dataset(
        path.stem,
        arrays["x_train"].astype(np.float32),
        arrays["y_train"].astype(y_type),
        arrays["x_test"].astype(np.float32),
        arrays["y_test"].astype(y_type),
        extra_train,
        extra_test,
    )


def _extra_arrays(path: Path, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The named arrays beyond x and y: each `NAME_train` with its `NAME_test`, one row per sample,
    in their own dtype (a step reads them as `batch[NAME]`: a loss mask, an attention mask).  Other
    arrays (`x_val`, `classes`, a `NAME_train` without its `NAME_test`) are not read: said once."""
    names = sorted(k[: -len("_train")] for k in arrays if k.endswith("_train") and k not in _NPZ_KEYS)
    paired = [n for n in names if f"{n}_test" in arrays]
    unread = sorted(set(arrays) - set(_NPZ_KEYS) - {f"{n}_{split}" for n in paired for split in ("train", "test")})
    if unread:
        log.info("%s: not read (not x, y or a NAME_train/NAME_test pair): %s", path, ", ".join(unread))
    train, test = {}, {}
    for name in paired:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise DataError(f"{path}: {name!r} is not a name a step can read (letters, digits, _)")
        for split, out in (("train", train), ("test", test)):
            array = arrays[f"{name}_{split}"]
            if len(array) != len(arrays[f"x_{split}"]):
                raise DataError(f"{path}: {name}_{split} has {len(array)} rows, x_{split} {len(arrays[f'x_{split}'])}")
            if np.dtype(array.dtype).newbyteorder("=").name not in WIRE_DTYPES:
                raise DataError(
                    f"{path}: {name}_{split} is {array.dtype}, which a Batch cannot carry: use one of "
                    f"{', '.join(sorted(WIRE_DTYPES))}"
                )
            out[name] = array
    return train, test


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Global batches per epoch; the last one may be short (no sample is dropped)."""
    return math.ceil(num_samples / batch_size)


def position(round_: int, num_samples: int, batch_size: int) -> tuple[int, int]:
    """(epoch, step) of a round."""
    return divmod(round_, steps_per_epoch(num_samples, batch_size))


# Up to this many samples an epoch's order is numpy's permutation of (seed, epoch), made whole
# (128 MB of indices at the bound); past it, a keyed permutation that gives a batch's indices
# alone, in memory and time of the batch's size (`_permuted`).
PERMUTE_WHOLE = 1 << 24
_FEISTEL_ROUNDS = 6


def global_batch(num_samples: int, batch_size: int, seed: int, epoch: int, step: int) -> np.ndarray:
    """Sample indices of global batch `step` of `epoch`: a seeded shuffle, cut in order."""
    first, stop = step * batch_size, min((step + 1) * batch_size, num_samples)
    if num_samples <= PERMUTE_WHOLE:
        return np.random.default_rng([seed, epoch]).permutation(num_samples)[first:stop]
    return _permuted(np.arange(first, max(first, stop), dtype=np.uint64), num_samples, seed, epoch).astype(np.int64)


def _permuted(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Where `positions` go under a pseudo-random permutation of [0, n) keyed by (seed, epoch): a
    balanced Feistel network on the bits of the smallest even-width square domain >= n, walked
    again from any value past n (cycle walking: the domain is under 4n, so a few steps)."""
    half = max(1, (max(2, n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed, epoch, 0x5045524D]).generate_state(_FEISTEL_ROUNDS, np.uint64)
    out = positions.astype(np.uint64)
    todo = np.ones(len(out), bool)
    with np.errstate(over="ignore"):
        while todo.any():
            x = out[todo]
            left, right = x >> np.uint64(half), x & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(n)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every bit of the result depends on every bit of x."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
