"""Cutting a flat vector into chunks that fit one message, and putting it back together.

Chunk boundaries are a pure function of (total, count), so a receiver can check that a
chunk is exactly the slice it claims to be.  Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pangea.wire.messages import Chunk


def chunk_count(total: int, itemsize: int, max_bytes: int) -> int:
    """How many chunks a vector of `total` items needs so that none exceeds `max_bytes`."""
    per_chunk = max(1, max_bytes // itemsize)
    return max(1, -(-total // per_chunk))


def bounds(total: int, count: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk `index` of `count` over `total` items (sizes differ by at most 1)."""
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split(flat: np.ndarray, max_bytes: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """(Chunk, view) pairs covering a 1-d array, each at most `max_bytes`."""
    total = flat.shape[0]
    count = chunk_count(total, flat.itemsize, max_bytes)
    for index in range(count):
        start, stop = bounds(total, count, index)
        yield Chunk(index, count, start, total), flat[start:stop]


def check(chunk: Chunk, size: int, total: int) -> str | None:
    """Why a chunk of `size` items does not fit a vector of `total` items, or None if it does."""
    if chunk.total != total:
        return f"chunk of a {chunk.total}-element vector, expected {total}"
    if not 0 < chunk.count <= max(total, 1) or not 0 <= chunk.index < chunk.count:
        return f"chunk index {chunk.index} of {chunk.count} is out of range"
    if (chunk.offset, chunk.offset + size) != bounds(total, chunk.count, chunk.index):
        return f"chunk {chunk.index}/{chunk.count} covers [{chunk.offset}, {chunk.offset + size}), not its slice"
    return None


class Assembler:
    """Collects the chunks of one vector version; `complete` once every chunk arrived."""

    def __init__(self, total: int, dtype=np.float32) -> None:
        self.total = total
        self.buffer = np.empty(total, dtype=dtype)
        self.version: int | None = None
        self._seen: set[int] = set()
        self._count: int | None = None

    def add(self, version: int, chunk: Chunk, values: np.ndarray) -> None:
        """Store a chunk; a newer version discards an unfinished older one, an older chunk is ignored."""
        problem = check(chunk, values.shape[0], self.total)
        if problem:
            raise ValueError(problem)
        if self.version is not None and version < self.version:
            return  # a late chunk of a version already superseded
        if version != self.version:
            self.version, self._seen, self._count = version, set(), chunk.count
        if chunk.count != self._count:
            raise ValueError(f"chunk count {chunk.count} differs from {self._count} in version {version}")
        self.buffer[chunk.offset : chunk.offset + values.shape[0]] = values
        self._seen.add(chunk.index)

    @property
    def complete(self) -> bool:
        return self._count is not None and len(self._seen) == self._count
