"""Built-in tables of samples, each read on demand (no role loads one whole):

- `.npy` files, `NAME_train.npy` with `NAME_test.npy` in a directory (the `.npz` convention, one
  file per array), read by row: a sample is a row, in the file's own dtype;
- Parquet files (one, a directory or a glob), read a row group at a time with pyarrow;
- a Hugging Face `save_to_disk` directory (a dataset, or a dataset dict with its splits): Arrow
  files, memory-mapped by pyarrow;
- a user's `module:factory`, whose result is any object with `__len__` and `__getitem__(i)` (a
  torch map-style `Dataset`, a Hugging Face `datasets.Dataset`), a pair (train, evaluation) of them,
  or a mapping with a "train" split and an optional "test", "validation" or "eval" one.

A table gives one sample by index (`table[i]`, a dict by column); Arrow columns become numpy
arrays: numbers, fixed-size lists (a vector per sample), and images stored as encoded bytes (Hugging
Face's `Image` feature, a binary column), decoded with Pillow to (channels, height, width) uint8;
text passes through, for a transform to make numbers of.

Why one module of ~300 lines: the built-in tables are one contract (rows by index, read together,
the labels' largest value without reading the rest) over three file formats.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pangea.errors import DataError

log = logging.getLogger(__name__)
_CACHED_GROUPS = 4  # Parquet row groups kept decoded: a global batch's samples are spread over them


# ------------------------------------------------------------ .npy


class NpyTable:
    """`NAME_<split>.npy` files of one directory; each a column, one row per sample, in its dtype.

    Rows are read with `os.pread`, never through a memory map, whose touched pages would count in
    the process's memory: a directory larger than the machine reads in bounded memory."""

    deterministic = True  # reading a row draws nothing

    def __init__(self, directory: Path, split: str) -> None:
        files = sorted(directory.glob(f"*_{split}.npy"))
        if not files:
            raise DataError(f"{directory} has no *_{split}.npy files")
        self.columns = {f.name[: -len(f"_{split}.npy")]: _NpyColumn(f) for f in files}
        lengths = {name: len(c) for name, c in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{directory}: the {split} arrays have different lengths: {lengths}")
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {name: column.row(i) for name, column in self.columns.items()}

    def largest(self, column: str) -> int:
        """The largest value of a column, read in bounded chunks (what counting classes needs)."""
        if column not in self.columns:
            raise DataError(f"no {column}_*.npy: the labels are {column!r}")
        return self.columns[column].largest()


class _NpyColumn:
    """One .npy file: its header read, its rows read by offset."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
            except ValueError as exc:
                raise DataError(f"{path}: not an .npy file ({exc})") from None
            self.offset = f.tell()
        if fortran or not shape or dtype.hasobject:
            raise DataError(f"{path}: needs a C-ordered array of numbers with one row per sample")
        self.path, self.shape, self.dtype = path, tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.shape[0]:
            raise IndexError(i)
        with open(self.path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), self.row_bytes, self.offset + i * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape(self.shape[1:]).astype(self.dtype.newbyteorder("="))

    def largest(self, rows: int = 1 << 20) -> int:
        top = None
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for _ in range(0, self.shape[0], rows):
                chunk = np.frombuffer(f.read(rows * self.row_bytes), self.dtype)
                if len(chunk):
                    top = chunk.max() if top is None else max(top, chunk.max())
        return int(top if top is not None else 0)


def npy_splits(directory: Path) -> tuple[NpyTable, NpyTable | None]:
    """The train split of a directory of .npy files, and its test split if there is one."""
    train = NpyTable(directory, "train")
    test = NpyTable(directory, "test") if any(directory.glob("*_test.npy")) else None
    return train, test


# ------------------------------------------------------------ Arrow: Parquet and Hugging Face


class ArrowTable:
    """Rows of Arrow tables read on demand: Parquet row groups, or memory-mapped Arrow files."""

    deterministic = True  # reading a row draws nothing

    def __init__(self, name: str, parts: list[int], read, column, classes: dict[str, int]) -> None:
        """`parts`: rows per part; `read(k)`: part k as a pyarrow Table; `column(k, name)`: one
        column of it (without decoding the others); `classes`: a ClassLabel feature's classes by column."""
        self.name = name
        self._starts = np.cumsum([0, *parts])
        self._read, self._column = read, column
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._classes = classes

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        return self.take([i])[0]

    def take(self, indices: list[int]) -> list[dict]:
        """Rows `indices`, in that order; each part (row group) they fall in read once."""
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"rows {indices[:3]}... of {len(self)}")
        parts = np.searchsorted(self._starts, indices, side="right") - 1
        out: list[dict | None] = [None] * len(indices)
        for part in dict.fromkeys(parts.tolist()):
            table = self._part(part)
            for at in np.flatnonzero(parts == part):
                row = table.slice(indices[at] - int(self._starts[part]), 1)
                out[at] = {f.name: _value(row.column(f.name), self.name, f.name) for f in row.schema}
        return out

    def class_count(self, column: str) -> int | None:
        """The classes a Hugging Face ClassLabel feature names for `column` (None: not one)."""
        return self._classes.get(column)

    def largest(self, column: str) -> int:
        """The largest value of a column, part by part, reading that column alone."""
        try:
            return max(int(np.max(self._column(k, column))) for k in range(len(self._starts) - 1))
        except KeyError:
            raise DataError(
                f"{self.name}: no column {column!r} for the labels (map one with --columns y=...)"
            ) from None

    def _part(self, k: int):
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        try:
            table = self._read(k)
        except (OSError, ValueError) as exc:  # a damaged file (pyarrow's ArrowInvalid is a ValueError)
            raise DataError(f"{self.name}: cannot read part {k}: {exc}") from None
        self._cache[k] = table
        while len(self._cache) > _CACHED_GROUPS:
            self._cache.popitem(last=False)
        return table


def _value(column, table: str, name: str):
    """One row of an Arrow column: numbers and vectors as numpy arrays, encoded images decoded;
    anything else (text, paths) as Python gives it, for a transform to make numbers of."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # Hugging Face's Image
        return _image(column.combine_chunks().field("bytes")[0].as_py(), table, name)
    value = column[0]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        data = value.as_py()
        return _image(data, table, name) if _looks_like_image(data) else data
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return np.asarray(value.values.to_numpy(zero_copy_only=False))
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return np.asarray(value.as_py(), dtype=kind.to_pandas_dtype())
    return value.as_py()


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


def _looks_like_image(data: bytes | None) -> bool:
    return isinstance(data, bytes) and data.startswith(_IMAGE_MAGIC)


def _image(data: bytes | None, table: str, name: str) -> np.ndarray:
    """Encoded image bytes as (channels, height, width) uint8, decoded with Pillow."""
    if data is None:
        raise DataError(f"{table}: column {name!r} holds an image without bytes")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{table}: column {name!r} holds bytes Pillow cannot decode ({exc})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - with it
    except ImportError:
        raise DataError("Parquet files and Hugging Face directories need pyarrow: pip install 'pangea[data]'") from None
    return pyarrow


def parquet_table(spec: str) -> ArrowTable:
    """Parquet files (a file, a directory of *.parquet, or a glob) as one table, in name order."""
    pq = _pyarrow().parquet

    files = _files(spec, "*.parquet")
    readers = []
    for f in files:
        try:
            readers.append(pq.ParquetFile(f))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{f}: not a Parquet file pyarrow can read ({exc})") from None
    schemas = {str(r.schema_arrow) for r in readers}
    if len(schemas) > 1:
        raise DataError(f"{spec}: its files have different columns")
    groups = [(r, g) for r in readers for g in range(r.num_row_groups)]
    parts = [r.metadata.row_group(g).num_rows for r, g in groups]

    def read(k: int):
        reader, group = groups[k]
        return reader.read_row_group(group)

    def column(k: int, name: str):
        reader, group = groups[k]
        if name not in reader.schema_arrow.names:
            raise KeyError(name)
        return reader.read_row_group(group, columns=[name]).column(0).to_numpy()

    return ArrowTable(spec, parts, read, column, _class_counts(_hf_features(readers[0].schema_arrow)))


def hf_splits(directory: Path) -> tuple[ArrowTable, ArrowTable | None]:
    """A `save_to_disk` directory: a dataset (train only), or a dataset dict (its "train" split,
    and "test", "validation" or "eval" for evaluation)."""
    listed = directory / "dataset_dict.json"
    if listed.is_file():
        splits = json.loads(listed.read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{directory}: a dataset dict without a train split (it has {', '.join(splits)})")
        held = next((s for s in ("test", "validation", "eval") if s in splits), None)
        return _arrow_dir(directory / "train"), _arrow_dir(directory / held) if held else None
    return _arrow_dir(directory), None


def _arrow_dir(directory: Path) -> ArrowTable:
    pa = _pyarrow()

    try:
        state = json.loads((directory / "state.json").read_text())
        files = [directory / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{directory}: not a Hugging Face save_to_disk directory ({exc})") from None
    # Memory-mapped: a row read touches its pages only, and the process's memory does not hold the table.
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
        info = {}
        if (directory / "dataset_info.json").is_file():
            info = json.loads((directory / "dataset_info.json").read_text()).get("features") or {}
    except (OSError, ValueError) as exc:  # a missing or damaged file (pyarrow's ArrowInvalid is a ValueError)
        raise DataError(f"{directory}: cannot read its Arrow files ({exc})") from None

    def column(k: int, name: str):
        if name not in tables[k].column_names:
            raise KeyError(name)
        return tables[k].column(name).to_numpy()

    return ArrowTable(str(directory), [t.num_rows for t in tables], tables.__getitem__, column, _class_counts(info))


def _hf_features(schema) -> dict:
    """The Hugging Face features a Parquet file's metadata describes, if it does."""
    meta = (schema.metadata or {}).get(b"huggingface")
    return ((json.loads(meta).get("info") or {}).get("features") or {}) if meta else {}


def _class_counts(features: dict) -> dict[str, int]:
    """{column: classes} of the ClassLabel features."""
    return {
        name: len(f["names"])
        for name, f in features.items()
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names")
    }


def _files(spec: str, pattern: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        found = sorted(path.glob(pattern))
    elif glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec))
    else:
        found = [path] if path.is_file() else []
    if not found:
        raise DataError(f"{spec}: no {pattern} file found")
    return found


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face save_to_disk directory: a dataset dict's, or a dataset's."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_npy_directory(path: Path) -> bool:
    """A directory of NAME_train.npy / NAME_test.npy files."""
    return path.is_dir() and (path / "x_train.npy").is_file()
