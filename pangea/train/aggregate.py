"""The sample-weighted mean of one round's shard gradients, reduced chunk by chunk.

Pure numpy, no I/O: memory is one float64 accumulator whatever the number of workers.
Every refusal raises `Rejected` with a short machine-readable reason.
"""

from __future__ import annotations

import numpy as np

from pangea.errors import Reason, Rejected
from pangea.train import robust
from pangea.wire import chunking
from pangea.wire.messages import Chunk


class RoundAccumulator:
    """Streaming sum of n_k * g_k over the shards of one round; `mean()` once complete."""

    def __init__(self, round_: int, numel: int, shard_sizes: dict[int, int], keep_rows: bool = False) -> None:
        self.round = round_
        # Robust aggregators need every shard's whole gradient, not only the running sum.
        self._rows: dict[int, np.ndarray] | None = {} if keep_rows else None
        self.numel = numel
        self.shard_sizes = dict(shard_sizes)
        self.total_samples = sum(shard_sizes.values())
        self._sum = np.zeros(numel, dtype=np.float64)
        self._chunk_counts: dict[int, int] = {}
        self._seen: dict[int, set[int]] = {s: set() for s in shard_sizes}
        self._loss: dict[int, float] = {}

    def add(self, shard: int, num_samples: int, loss: float, chunk: Chunk, values: np.ndarray) -> None:
        """Add one chunk of one shard's gradient (the mean over that shard's samples)."""
        if shard not in self.shard_sizes:
            raise Rejected(Reason.UNKNOWN_SHARD, f"round {self.round} has no shard {shard}")
        if num_samples != self.shard_sizes[shard]:
            raise Rejected(
                Reason.WRONG_SAMPLES, f"shard {shard} has {self.shard_sizes[shard]} samples, got {num_samples}"
            )
        if values.ndim != 1:
            raise Rejected(Reason.WRONG_SHAPE, f"chunk values must be 1-d, got shape {values.shape}")
        problem = chunking.check(chunk, values.shape[0], self.numel)
        if problem:
            raise Rejected(Reason.WRONG_SHAPE, problem)
        expected_count = self._chunk_counts.get(shard, chunk.count)
        if chunk.count != expected_count:
            raise Rejected(Reason.WRONG_SHAPE, f"shard {shard} chunk count {chunk.count} != {expected_count}")
        if chunk.index in self._seen[shard]:
            raise Rejected(Reason.DUPLICATE, f"round {self.round} shard {shard} chunk {chunk.index} already counted")
        if not np.isfinite(values).all() or not np.isfinite(loss):
            raise Rejected(Reason.NON_FINITE, f"round {self.round} shard {shard} chunk {chunk.index} has NaN/Inf")
        stop = chunk.offset + values.shape[0]
        # In-place multiply-add into the float64 sum: no temporary of the chunk's size in float64.
        np.add(
            self._sum[chunk.offset : stop], values.astype(np.float64) * num_samples, out=self._sum[chunk.offset : stop]
        )
        if self._rows is not None:
            self._rows.setdefault(shard, np.zeros(self.numel, np.float32))[chunk.offset : stop] = values
        self._chunk_counts[shard] = chunk.count  # only an accepted chunk fixes the shard's count
        self._seen[shard].add(chunk.index)
        self._loss[shard] = float(loss)

    def missing(self) -> list[int]:
        """Shards not yet complete."""
        return [s for s in self.shard_sizes if len(self._seen[s]) != self._chunk_counts.get(s, -1)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def mean(self) -> np.ndarray:
        """The sample-weighted mean gradient, float32.  Once per round, in the float64 sum's own
        memory: no second vector exists at the peak (see `_downcast_in_place`)."""
        if not self.complete:
            raise RuntimeError(f"round {self.round} is missing shards {self.missing()}")
        if self._sum is None:
            raise RuntimeError(f"the mean of round {self.round} was already taken")
        total, self._sum = self._sum, None
        np.divide(total, self.total_samples, out=total)
        return _downcast_in_place(total)

    def loss(self) -> float:
        """The sample-weighted mean of the shards' mean losses (over the shards heard from)."""
        heard = {s: n for s, n in self.shard_sizes.items() if s in self._loss}
        return sum(self._loss[s] * n for s, n in heard.items()) / max(1, sum(heard.values()))

    def robust(self, aggregator: str, byzantine: int, clip_norm: float) -> np.ndarray:
        """Combine the complete shards' gradients with a robust aggregator (after clipping)."""
        if self._rows is None:
            raise RuntimeError("robust aggregation needs keep_rows=True")
        done = [s for s in self.shard_sizes if s not in self.missing()]
        rows = np.stack([self._rows[s] for s in done]).astype(np.float64)
        if clip_norm > 0:
            rows = robust.clip(rows, clip_norm)
        weights = np.array([self.shard_sizes[s] for s in done], dtype=np.float64)
        return robust.combine(rows, weights, aggregator, byzantine).astype(np.float32)

    def complete_samples(self) -> int:
        """Samples of the shards whose whole gradient arrived."""
        return sum(self.shard_sizes[s] for s in self.shard_sizes if s not in self.missing())

    def partial_mean(self) -> np.ndarray:
        """Quorum close: each element averaged over the samples whose chunk for it arrived.

        Equals `mean()` when the round is complete; elements no shard delivered get 0.
        """
        weights = np.zeros(self.numel, dtype=np.float64)
        for shard, seen in self._seen.items():
            for index in seen:
                start, stop = chunking.bounds(self.numel, self._chunk_counts[shard], index)
                weights[start:stop] += self.shard_sizes[shard]
        out = np.zeros(self.numel, dtype=np.float64)
        np.divide(self._sum, weights, out=out, where=weights > 0)
        return out.astype(np.float32)


_DOWNCAST_ELEMENTS = 1 << 20  # elements per step of the in-place float64 -> float32 conversion


def _downcast_in_place(values: np.ndarray) -> np.ndarray:
    """`values` (float64, owning its memory) as float32, in that memory, which is then shrunk to
    half: the same result as `values.astype(np.float32)` without a model-sized float32 copy next to
    the float64 one (the orchestrator's peak memory is the float64 sum plus this copy otherwise).

    Element i goes to bytes [4i, 4i+4), front to back, a block at a time: a block's float32 slots
    overlap only float64 elements already converted, except in the first block, which numpy's
    assignment copies first since source and destination overlap.  `values` must not be used after."""
    n = values.shape[0]
    slots = values.view(np.float32)
    for start in range(0, n, _DOWNCAST_ELEMENTS):
        stop = min(n, start + _DOWNCAST_ELEMENTS)
        slots[start:stop] = values[start:stop]
    del slots  # no view may outlive the resize: realloc may move the memory
    values.resize((n + 1) // 2, refcheck=False)  # realloc to the float32 half: the back half goes back to the OS
    return values.view(np.float32)[:n]


def split_batch(batch_size: int, workers: list[str]) -> list[tuple[str, int, int]]:
    """Cut a global batch into contiguous shards, one per worker, sizes differing by at most 1.

    Workers beyond the batch size get no shard.
    """
    used = workers[: max(1, min(len(workers), batch_size))]
    return [(w, *chunking.bounds(batch_size, len(used), i)) for i, w in enumerate(used)]
