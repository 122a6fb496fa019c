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
Face's `Image` feature, a binary column), decoded with Pillow to (channels, height, width) uint8.
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

    def labels(self, column: str) -> np.ndarray:
        """The largest label, read in bounded chunks (what counting classes needs)."""
        return np.array([self.columns[column].largest()])


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
        return np.frombuffer(raw, self.dtype).reshape(self.shape[1:]).copy()

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
    train = NpyTable(directory, "train")
    test = NpyTable(directory, "test") if any(directory.glob("*_test.npy")) else None
    return train, test


# ------------------------------------------------------------ Arrow: Parquet and Hugging Face


class ArrowTable:
    """Rows of Arrow record batches read on demand: Parquet row groups, or memory-mapped Arrow files."""

    def __init__(self, name: str, parts: list, read, schema, num_classes: int | None = None) -> None:
        """`parts`: (rows) per part; `read(k)`: part k as a pyarrow Table."""
        self.name = name
        self._starts = np.cumsum([0, *parts])
        self._read = read
        self._cache: OrderedDict[int, object] = OrderedDict()
        self.schema = schema
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        table = self._part(part)
        row = table.slice(i - int(self._starts[part]), 1)
        return {field.name: _value(row.column(field.name), self.name, field.name) for field in row.schema}

    def labels(self, column: str) -> np.ndarray:
        """A whole column (integer labels, to count classes), part by part."""
        return np.concatenate([self._read(k).column(column).to_numpy() for k in range(len(self._starts) - 1)])

    def _part(self, k: int):
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        table = self._read(k)
        self._cache[k] = table
        while len(self._cache) > _CACHED_GROUPS:
            self._cache.popitem(last=False)
        return table


def _value(column, table: str, name: str) -> np.ndarray:
    """One row of an Arrow column as a numpy array."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # Hugging Face's Image
        return _image(column.combine_chunks().field("bytes")[0].as_py(), table, name)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _image(column[0].as_py(), table, name)
    value = column[0]
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return np.asarray(value.values.to_numpy(zero_copy_only=False))
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return np.asarray(value.as_py(), dtype=kind.to_pandas_dtype())
    raise DataError(f"{table}: column {name!r} is {kind}: a batch carries numbers, vectors or images")


def _image(data: bytes | None, table: str, name: str) -> np.ndarray:
    """Encoded image bytes as (channels, height, width) uint8, decoded with Pillow."""
    if data is None:
        raise DataError(f"{table}: column {name!r} holds an image without bytes")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
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
    readers = [pq.ParquetFile(f) for f in files]
    schemas = {str(r.schema_arrow) for r in readers}
    if len(schemas) > 1:
        raise DataError(f"{spec}: its files have different columns")
    groups = [(r, g) for r in readers for g in range(r.num_row_groups)]
    parts = [r.metadata.row_group(g).num_rows for r, g in groups]

    def read(k: int):
        reader, group = groups[k]
        return reader.read_row_group(group)

    return ArrowTable(spec, parts, read, readers[0].schema_arrow, _class_count(readers[0].schema_arrow))


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
    tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    info = {}
    if (directory / "dataset_info.json").is_file():
        info = json.loads((directory / "dataset_info.json").read_text()).get("features") or {}
    classes = next(
        (len(f["names"]) for f in info.values() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None
    )
    return ArrowTable(str(directory), [t.num_rows for t in tables], tables.__getitem__, tables[0].schema, classes)


def _class_count(schema) -> int | None:
    """The classes a Hugging Face ClassLabel feature names, if the file's metadata says so."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    features = (json.loads(meta).get("info") or {}).get("features") or {}
    return next(
        (len(f["names"]) for f in features.values() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None
    )


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
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_npy_directory(path: Path) -> bool:
    return path.is_dir() and (path / "x_train.npy").is_file()
