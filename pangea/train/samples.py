"""Map-style data: a table of samples (any object with `__len__` and `__getitem__(i)` returning a
mapping of arrays, or a built-in table of `pangea.train.tables`) made into global batches.

Global batch (epoch, step) is the samples at `global_batch(n, B, seed, epoch, step)`, as for every
source.  What is random about a sample comes from a generator keyed by (seed, epoch, index), never
from a process's stream: `transform(sample, rng)` gets numpy's Philox with that counter (Grain's
scheme), and runs with torch's, numpy's and Python's global generators seeded from it too (for
transforms that use them).  So sample i's crop in epoch e is the same whatever K, whichever shard
it falls in, on a re-issue, a restart or a replay, and whichever process of the pool computed it:
the batch bytes do not depend on the pool's size.  What is random about a global batch (padding to
its longest sample, mixup, masked-LM masking) is `collate(samples, rng)`, run once on the whole
global batch with a generator keyed by (seed, epoch, step), before it is cut into shards.

Evaluation samples go through `transform(sample, None)` (the deterministic part: a center crop)
and `collate(samples, None)`.

A pool of processes (`workers` > 1) computes a global batch's samples; each process builds the
source itself from its recipe (`load_data`'s arguments), so nothing but indices and arrays crosses
between them.

Why one module of ~300 lines: the keyed generators, the source, its pool and the turning of a
sample into arrays are one path, from an index to the bytes of a batch, read top to bottom.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from pangea.errors import DataError
from pangea.train import randomness
from pangea.train.data import WIRE_DTYPES, global_batch, position

log = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
Transform = Callable[[Mapping, "np.random.Generator | None"], Mapping]
Collate = Callable[[list[Mapping], "np.random.Generator | None"], Mapping]
_BATCH = 0x42415443  # "BATC": the collate's generators apart from the samples'
_LABEL_SCAN = 100_000  # classes are counted from the labels of tables at most this long


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Sample `index`'s generator in `epoch`: numpy's Philox keyed by the run's seed, the counter
    (0, 0, epoch, index)."""
    return np.random.Generator(np.random.Philox(key=seed, counter=[0, 0, epoch, index]))


def batch_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of global batch (epoch, step)'s collate."""
    return np.random.Generator(np.random.Philox(key=seed, counter=[0, _BATCH, epoch, step]))


class MapSource:
    """Global batches of a map-style table, with per-sample transforms and a global-batch collate."""

    targets_per_sample = 1
    bytes_per_token = None

    def __init__(
        self,
        name: str,
        train,
        evaluation=None,
        *,
        transform: Transform | None = None,
        collate: Collate | None = None,
        columns: Mapping[str, str] | None = None,
        labels: bool = True,
        num_classes: int | None = None,
        workers: int = 1,
        recipe: Callable[[], MapSource] | None = None,
    ) -> None:
        self.name = name
        self.train = train
        self.evaluation = evaluation
        self.hooks = _Hooks(transform, collate, dict(columns or {}))
        self.labels = labels
        self._num_classes = num_classes
        self._pool = _Pool(workers, recipe)
        self._last: tuple[tuple[int, int, int], Sample] | None = None  # the last global batch: shards reuse it
        if len(train) == 0:
            raise DataError(f"{name}: no training samples")
        self._first = self.samples_of(train, 0, 0, [0], train=True)[0]  # shapes and dtypes, checked once
        if "x" not in self._first or "y" not in self._first:
            names = ", ".join(self._first) or "none"
            raise DataError(f"{name}: samples need x and y (they have {names}): map columns with --columns x=...,y=...")

    # ------------------------------------------------------------ what every source offers

    @property
    def num_samples(self) -> int:
        return len(self.train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._first["x"].shape)

    @property
    def num_classes(self) -> int:
        """The classes the data declares (a table's `num_classes`, a ClassLabel's names); else for
        integer labels the largest + 1, and for other targets the values per sample (as a batch
        holds them: after the collate)."""
        if self._num_classes is None:
            self._num_classes = self._classes()
        return self._num_classes

    def _classes(self) -> int:
        column = self.hooks.columns.get("y", "y")
        for table in (self.train, self.evaluation):
            counted = getattr(table, "class_count", None)  # a table that knows its columns' classes
            declared = counted(column) if callable(counted) else getattr(table, "num_classes", None)
            if isinstance(declared, int) and declared > 0:
                return declared
        y = self.rows(0, 1, 0, 0, 1)["y"][0]
        if np.issubdtype(y.dtype, np.integer) and y.ndim == 0:
            return _count_classes(self.name, self.train, column)
        return int(np.prod(y.shape, dtype=np.int64))

    def rows(self, seed: int, batch_size: int, global_step: int, start: int, stop: int) -> Sample:
        """Rows [start, stop) of global batch `global_step`, by name (the last global batch is kept:
        its shards, and a re-issue, cut it again)."""
        key = (seed, batch_size, global_step)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.global_batch(seed, batch_size, global_step))
        return {k: v[start:stop] for k, v in self._last[1].items()}

    @property
    def touches_globals(self) -> bool:
        """Whether making a sample sets the process's global generators (a user's dataset or
        transform may draw from them): then nothing else may draw meanwhile, not even another
        thread of the process."""
        return self.hooks.global_draws or not getattr(self.train, "deterministic", False)

    def eval_rows(self, size: int = 256):
        """The evaluation samples in batches (none without an evaluation split)."""
        if self.evaluation is None:
            return
        for first in range(0, len(self.evaluation), size):
            indices = list(range(first, min(first + size, len(self.evaluation))))
            yield self._collated(self.samples_of(self.evaluation, 0, 0, indices, train=False), None)

    def close(self) -> None:
        """Stop the pool of data workers (if one was started)."""
        self._pool.close()

    # ------------------------------------------------------------ making batches

    def global_batch(self, seed: int, batch_size: int, global_step: int) -> Sample:
        """Global batch `global_step`, computed (its samples in the pool, if there is one)."""
        epoch, step = position(global_step, self.num_samples, batch_size)
        indices = [int(i) for i in global_batch(self.num_samples, batch_size, seed, epoch, step)]
        if self._pool.usable and len(indices) > 1:
            samples = self._pool.samples(seed, epoch, indices)
        else:
            samples = self.samples_of(self.train, seed, epoch, indices, train=True)
        return self._collated(samples, batch_rng(seed, epoch, step))

    def samples_of(self, table, seed: int, epoch: int, indices: list[int], *, train: bool) -> list[Sample]:
        """Samples `indices` of `table`, renamed and transformed.  A built-in table's are read together
        (a Parquet row group once); a user's table is read under the sample's keyed generators, since
        its `__getitem__` may draw (a torchvision-style dataset transforms there)."""
        if getattr(table, "deterministic", False):
            raws = _read(table, indices, self.name)
            return [self._finished(raw, seed, epoch, i, train) for i, raw in zip(indices, raws)]
        out = []
        for i in indices:
            with randomness.seeded(_key(seed, epoch, i, train)):
                (raw,) = _read(table, [i], self.name)
                out.append(self._finished(raw, seed, epoch, i, train, seeded=True))
        return out

    def _finished(self, raw, seed: int, epoch: int, index: int, train: bool, seeded: bool = False) -> Sample:
        """A sample read: renamed, then transformed with its keyed generator (none for evaluation)."""
        hooks = self.hooks
        sample = _named(raw, hooks.columns)
        if hooks.transform is None:
            return _arrays(sample, self.name)
        rng = sample_rng(seed, epoch, index) if train else None
        try:
            if hooks.global_draws and not seeded:  # the generators a user's transform may use besides its rng
                with randomness.seeded(_key(seed, epoch, index, train)):
                    out = hooks.transform(sample, rng)
            else:
                out = hooks.transform(sample, rng)
        except Exception as exc:  # noqa: BLE001 - user code: one line
            raise DataError(
                f"{self.name}: the transform failed on sample {index}: {type(exc).__name__}: {exc}"
            ) from None
        return _arrays(out, self.name)

    def _collated(self, samples: list[Sample], rng: np.random.Generator | None) -> Sample:
        if self.hooks.collate is not None:
            try:
                batch = self.hooks.collate(samples, rng)
            except Exception as exc:  # noqa: BLE001 - user code: one line
                raise DataError(f"{self.name}: the collate failed: {type(exc).__name__}: {exc}") from None
            out = _arrays(batch, self.name)
            if len({len(v) for v in out.values()}) > 1:
                raise DataError(f"{self.name}: the collate returned tensors with different numbers of rows")
            return out
        return _stack(samples, self.name)


@dataclass(frozen=True)
class _Hooks:
    """A source's user hooks: per-sample transform, global-batch collate, column names."""

    transform: Transform | None
    collate: Collate | None
    columns: dict[str, str]

    @property
    def global_draws(self) -> bool:
        """Whether the transform may draw from torch's, numpy's or Python's global generators (a
        user's may; the built-in image one draws from its rng alone, and skips their ~0.1 ms)."""
        return self.transform is not None and not getattr(self.transform, "rng_only", False)


class _Pool:
    """Processes that compute a global batch's samples, each building the source from its recipe."""

    def __init__(self, workers: int, recipe: Callable[[], MapSource] | None) -> None:
        self.workers, self.recipe = workers, recipe
        self._executor: ProcessPoolExecutor | None = None

    @property
    def usable(self) -> bool:
        return self.workers > 1 and self.recipe is not None

    def samples(self, seed: int, epoch: int, indices: list[int]) -> list[Sample]:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")  # no fork of a process with threads (the bus)
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start, initargs=(self.recipe,)
            )
        # Contiguous runs of the batch per process, in order: each sample's bytes depend on its key
        # only, so the batch is the same for any pool size.
        size = -(-len(indices) // self.workers)
        parts = [indices[i : i + size] for i in range(0, len(indices), size)]
        results = self._executor.map(_samples, [(seed, epoch, part) for part in parts])
        return [sample for part in results for sample in part]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# ------------------------------------------------------------ the pool's side

_SOURCE: MapSource | None = None


def _start(recipe: Callable[[], MapSource]) -> None:
    global _SOURCE
    _SOURCE = recipe()


def _samples(job: tuple[int, int, list[int]]) -> list[Sample]:
    seed, epoch, indices = job
    return _SOURCE.samples_of(_SOURCE.train, seed, epoch, indices, train=True)


_EVALUATION_EPOCH = 1 << 40  # evaluation samples' generators: apart from every training epoch's


def _key(seed: int, epoch: int, index: int, train: bool) -> int:
    """The seed of the global generators while sample `index` is read and transformed."""
    return randomness.sample_seed(seed if train else 0, epoch if train else _EVALUATION_EPOCH, index)


def _read(table, indices: list[int], where: str) -> list:
    """Rows `indices` of a table: together where it can (`take`), else one by one."""
    try:
        take = getattr(table, "take", None)
        return take(indices) if callable(take) else [table[i] for i in indices]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's dataset: one line
        raise DataError(f"{where}: reading samples {indices[:3]}... failed: {type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------ samples as arrays


def _named(sample, columns: Mapping[str, str]) -> dict:
    """A table's sample as a dict, its columns under the names steps read: a mapping as it is, a
    pair (a torchvision-style dataset's (image, label)) as x and y; `columns` renames (name=column)."""
    if isinstance(sample, Mapping):
        out = dict(sample)
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        out = {"x": sample[0], "y": sample[1]}
    else:
        raise DataError(f"a sample must be a mapping of arrays or an (x, y) pair, not {type(sample).__name__}")
    for name, column in columns.items():
        if column not in out:
            raise DataError(f"--columns {name}={column}: the samples have no {column!r} (they have {', '.join(out)})")
        out[name] = out.pop(column)
    return out


def _arrays(sample: Mapping, where: str) -> Sample:
    """Every value as a numpy array in its own dtype (float64 as float32: what models take), one a
    Batch can carry."""
    out = {}
    for name, value in sample.items():
        array = _array(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: {name!r} holds {array.dtype} values: a batch carries numbers (transform it)")
        if np.dtype(array.dtype).newbyteorder("=").name not in WIRE_DTYPES:
            raise DataError(
                f"{where}: {name!r} is {array.dtype}, which a Batch cannot carry: use one of {', '.join(sorted(WIRE_DTYPES))}"
            )
        out[str(name)] = array
    return out


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _stack(samples: Sequence[Sample], where: str) -> Sample:
    names = samples[0].keys()
    odd = next((s for s in samples if s.keys() != names), None)
    if odd is not None:
        raise DataError(f"{where}: samples with different names ({', '.join(names)} vs {', '.join(odd)})")
    out = {}
    for name in names:
        shapes = {s[name].shape for s in samples}
        if len(shapes) > 1:
            raise DataError(
                f"{where}: {name!r} has samples of shapes {sorted(shapes)[:3]}: pad them to one shape in a "
                "--collate (or --transform)"
            )
        out[name] = np.stack([s[name] for s in samples])
    return out


def _count_classes(name: str, train, column: str) -> int:
    """Classes of a table with integer labels and no declared count: its largest label + 1 (a
    built-in table reads the label column alone, in bounded pieces; a small user table: every sample)."""
    largest = getattr(train, "largest", None)
    if callable(largest):
        return max(int(largest(column)), 0) + 1
    if len(train) > _LABEL_SCAN:
        raise DataError(
            f"{name}: {len(train)} samples and no num_classes attribute: give the dataset a num_classes attribute"
        )
    top = max(int(np.asarray(_named(train[i], {"y": column} if column != "y" else {})["y"])) for i in range(len(train)))
    return top + 1
