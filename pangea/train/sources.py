"""Where a task's samples come from, by what `--dataset` names.  No torch here: the preprocessor
needs none (a user's dataset factory may import it).

| `--dataset` | source |
|---|---|
| `digits`, `PATH.npz` | in-memory arrays (`pangea.train.data.Dataset`) |
| `PATH.txt`, `PATH.bin`, a directory or glob of them (`--task lm`) | a token stream (`pangea.train.tokens`) |
| `npy:DIR`, or a directory holding `x_train.npy` | memory-mapped `NAME_train.npy` / `NAME_test.npy` |
| `parquet:PATH`, `PATH.parquet`, a directory or glob of them | Parquet row groups, read on demand |
| `hf:DIR`, or a `save_to_disk` directory | a Hugging Face dataset (dict): memory-mapped Arrow |
| `imagefolder:ROOT` | `ROOT/<class>/<image>`, with the built-in crop and flip |
| `module:factory`, `pickle:<sha256>` | a user's map-style dataset (see `pangea.train.tables`) |

Every source but the token stream and plain arrays is a `MapSource` (`pangea.train.samples`):
per-sample `--transform` and global-batch `--collate`, keyed by the run's seed; `--val-dataset`
names a separate evaluation source of the same kind.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

from pangea.errors import DataError
from pangea.train import usercode
from pangea.train.data import load_dataset
from pangea.train.samples import MapSource
from pangea.train.tokens import load_tokens

KINDS = ("npy", "parquet", "hf", "imagefolder")


def load_data(
    task: str,
    dataset: str,
    *,
    step: str = "",
    context: int = 128,
    vocab: int = 0,
    val_fraction: float = 0.1,
    eval_windows: int = 256,
    val_dataset: str | None = None,
    token_dtype: str = "uint16",
    transform: str = "",
    collate: str = "",
    columns: str = "",
    image_size: int = 32,
    code_dir: Path | None = None,
    allow_pickle: bool = True,
    workers: int = 1,
    validation: bool = True,
):
    """The samples a task trains on: in-memory arrays, a token stream for `lm`, or a map-style
    source.  `validation=False`: the caller serves training batches only (the preprocessor), so a
    separate validation source is not opened.  `workers`: processes computing samples (map sources).

    Targets must be class labels for `classify` with its own step; a user's `step` (or loss)
    decides what any numeric targets mean."""
    if task == "lm":
        return load_tokens(
            dataset,
            context=context,
            vocab=vocab,
            val_fraction=val_fraction,
            eval_windows=eval_windows,
            val_path=val_dataset if validation else None,
            held_out=bool(val_dataset),
            token_dtype=token_dtype,
        )
    labels = task == "classify" and not step
    kind, where = _kind(dataset)
    if kind == "arrays" and not (transform or collate or columns):
        if val_dataset:
            raise DataError(f"--val-dataset: {dataset} holds its own x_test and y_test")
        return load_dataset(dataset, labels=labels)
    user = functools.partial(usercode.resolve, code_dir=code_dir, allow_pickle=allow_pickle, error=DataError)
    train, evaluation, builtin = _tables(kind, where, image_size, user)
    if val_dataset and validation:
        evaluation = _evaluation(kind, train, val_dataset, image_size, user)
    recipe = functools.partial(
        load_data, task, dataset, step=step, val_dataset=val_dataset, transform=transform, collate=collate,
        columns=columns, image_size=image_size, code_dir=code_dir, allow_pickle=allow_pickle, validation=False,
    )  # fmt: skip
    return MapSource(
        Path(str(where)).name or str(where),
        train,
        evaluation,
        transform=user(transform, what="--transform") if transform else builtin,
        collate=user(collate, what="--collate") if collate else None,
        columns=_columns(columns),
        labels=labels,
        workers=workers,
        recipe=recipe,
    )


def load_training_data(settings, *, workers: int = 1, validation: bool = True, allow_pickle: bool = True):
    """The samples `settings` train on (arrays, a token stream for --task lm, or a map-style source)."""
    return load_data(
        settings.task,
        settings.dataset,
        step=settings.step,
        context=settings.context,
        vocab=settings.vocab,
        val_fraction=settings.val_fraction,
        eval_windows=settings.eval_windows,
        val_dataset=settings.val_dataset,
        token_dtype=settings.token_dtype,
        transform=settings.transform,
        collate=settings.collate,
        columns=settings.columns,
        image_size=settings.image_size,
        code_dir=settings.code_dir,
        allow_pickle=allow_pickle,
        workers=workers,
        validation=validation,
    )


def _kind(dataset: str) -> tuple[str, object]:
    """What kind of source `dataset` names, and where it is."""
    prefix, sep, rest = dataset.partition(":")
    if sep and prefix in KINDS:
        return prefix, rest
    if usercode.pickled_hash(dataset) or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", dataset):
        return "factory", dataset
    from pangea.train import tables

    path = Path(dataset)
    if dataset == "digits" or path.suffix == ".npz":
        return "arrays", dataset
    if tables.is_hf_directory(path):
        return "hf", dataset
    if tables.is_npy_directory(path):
        return "npy", dataset
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))) or dataset.endswith("*.parquet"):
        return "parquet", dataset
    raise DataError(
        f"unknown dataset {dataset!r}: use digits, an .npz, npy:DIR, a Parquet file (or parquet:PATH), a Hugging "
        "Face save_to_disk directory (or hf:DIR), imagefolder:ROOT or module:factory"
    )


def _tables(kind: str, where, image_size: int, user):
    """(train table, evaluation table or None, the built-in transform or None) of a source."""
    from pangea.train import images, tables

    if kind == "arrays":
        data = load_dataset(str(where), labels=False)
        return _Arrays(data, "train"), _Arrays(data, "test"), None
    if kind == "npy":
        return (*tables.npy_splits(Path(where)), None)
    if kind == "parquet":
        return tables.parquet_table(str(where)), None, None
    if kind == "hf":
        return (*tables.hf_splits(Path(where)), None)
    if kind == "imagefolder":
        return (*images.folder_splits(Path(where)), images.ImageTransform(image_size))
    return (*_factory(user(str(where), what="--dataset"), str(where)), None)


def _evaluation(kind: str, train, val_dataset: str, image_size: int, user):
    """`--val-dataset`'s table: of the training source's kind (its classes numbered alike)."""
    from pangea.train import images

    val_kind, where = (
        _kind(val_dataset) if ":" in val_dataset or kind != "imagefolder" else ("imagefolder", val_dataset)
    )
    if val_kind != kind:
        raise DataError(f"--val-dataset {val_dataset} is {val_kind} data, --dataset {kind}")
    if kind == "imagefolder":
        return images.ImageFolder(Path(where), train.classes)
    return _tables(val_kind, where, image_size, user)[0]


def _factory(factory, spec: str):
    """A user's dataset: `factory()`'s table, (train, evaluation) pair, or {"train": ..., "test": ...}."""
    if not callable(factory):
        raise DataError(f"--dataset {spec} is not callable: give a factory returning the dataset")
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - user code: one line
        raise DataError(f"--dataset {spec}() failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, Mapping) and "train" in made:
        held = next((made[k] for k in ("test", "validation", "eval") if k in made), None)
        return made["train"], held
    if isinstance(made, tuple) and len(made) == 2 and hasattr(made[0], "__len__"):
        if made[1] is None or hasattr(made[1], "__len__"):
            return made
    if hasattr(made, "__len__") and hasattr(made, "__getitem__"):
        return made, None
    raise DataError(f"--dataset {spec}() returned {type(made).__name__}: a map-style dataset (__len__, __getitem__)")


def _columns(spec: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in spec.split(",")) if spec else {}


class _Arrays:
    """One split of in-memory arrays as a table (an .npz with a transform or a collate)."""

    deterministic = True  # reading a row draws nothing

    def __init__(self, data, split: str) -> None:
        self.columns = {
            "x": getattr(data, f"x_{split}"),
            "y": getattr(data, f"y_{split}"),
            **getattr(data, f"extra_{split}"),
        }

    def __len__(self) -> int:
        return len(self.columns["x"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}

    def largest(self, column: str) -> int:
        """The largest value of a column (its labels)."""
        return int(self.columns[column].max())
