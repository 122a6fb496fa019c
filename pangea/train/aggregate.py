"""One round's mean gradient from its shards' contributions, reduced chunk by chunk.

Pure numpy, no I/O: memory is one float64 accumulator whatever the number of workers.
Every refusal raises `Rejected` with a short machine-readable reason.

What a shard contributes, and how it is weighted:

- the parameter part (the first `params_end` elements): with `summed` (sync and async rounds)
  the gradient of the shard's loss summed over its `count` counted targets, and the mean is
  `sum of gradients / sum of counts`: the gradient of the global batch's mean over counted
  targets, for any number of shards (masked tokens and padding included).  Without `summed`
  (diloco's pseudo-gradients, or a caller that has means) a mean, weighted by its count;
- the buffer part (BatchNorm running statistics, see `Layout`): the buffers as the shard's
  forward left them, weighted by the shard's rows, since each row went through the forward.

A count is the worker's word, as its gradient is: the default mean trusts both (it is exact, not
robust); robust aggregators weight each shard by its planned rows, never by what it claims.
"""

from __future__ import annotations

import numpy as np

from pangea.errors import Reason, Rejected
from pangea.train import robust
from pangea.wire import chunking
from pangea.wire.messages import Chunk


def sums_on_wire(mode: str, compression: str) -> bool:
    """Whether a job's workers send the gradient of their loss sum (sync and async rounds), or their
    mean over counted targets: diloco's pseudo-gradients are means, and so are compressed gradients,
    whose fp16 range a sum over tens of thousands of tokens would overflow."""
    return mode != "diloco" and compression == "none"


NO_COUNT = -1.0  # what a Gradient says when its writer sent no count (schema default)


class RoundAccumulator:
    """Streaming sum of the shards' contributions to one round; `mean()` once complete."""

    def __init__(
        self,
        round_: int,
        numel: int,
        shard_sizes: dict[int, int],
        keep_rows: bool = False,
        *,
        params_end: int | None = None,
        summed: bool = False,
    ) -> None:
        self.round = round_
        # Robust aggregators need every shard's whole gradient, not only the running sum.
        self._rows: dict[int, np.ndarray] | None = {} if keep_rows else None
        self.numel = numel
        self.params_end = numel if params_end is None else max(0, min(numel, params_end))
        self.summed = summed
        self.shard_sizes = dict(shard_sizes)
        self.total_samples = sum(shard_sizes.values())
        self._sum = np.zeros(numel, dtype=np.float64)
        self._chunk_counts: dict[int, int] = {}
        self._counts: dict[int, float] = {}  # shard -> its counted targets, fixed by its first chunk
        self._seen: dict[int, set[int]] = {s: set() for s in shard_sizes}
        self._loss: dict[int, float] = {}

    def add(
        self, shard: int, num_samples: int, loss: float, chunk: Chunk, values: np.ndarray, count: float | None = None
    ) -> None:
        """Add one chunk of one shard's contribution: `count` counted targets (default: its rows)
        behind `values`, whose mean loss over them is `loss`."""
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
        count = float(num_samples if count is None else count)
        if not (np.isfinite(count) and count >= 0):
            old = " (a worker older than counts sends none)" if count == NO_COUNT else ""
            raise Rejected(Reason.WRONG_SAMPLES, f"shard {shard} claims {count} counted targets{old}")
        if self._counts.get(shard, count) != count:  # every chunk of a shard says the same
            raise Rejected(
                Reason.WRONG_SAMPLES, f"shard {shard} counted {self._counts[shard]} targets, this chunk says {count}"
            )
        start, stop = chunk.offset, chunk.offset + values.shape[0]
        middle = min(max(self.params_end, start), stop)  # where the chunk's buffer part begins
        self._add(start, middle, values[: middle - start], 1.0 if self.summed else count)
        self._add(middle, stop, values[middle - start :], num_samples)
        if self._rows is not None:
            self._rows.setdefault(shard, np.zeros(self.numel, np.float32))[start:stop] = values
        self._chunk_counts[shard] = chunk.count  # only an accepted chunk fixes the shard's count
        self._counts[shard] = count
        self._seen[shard].add(chunk.index)
        self._loss[shard] = float(loss)

    def _add(self, start: int, stop: int, values: np.ndarray, weight: float) -> None:
        """In-place multiply-add into the float64 sum: no temporary of the chunk's size in float64."""
        if stop > start:
            target = self._sum[start:stop]
            scaled = values.astype(np.float64) if weight == 1.0 else values.astype(np.float64) * weight
            np.add(target, scaled, out=target)

    def missing(self) -> list[int]:
        """Shards not yet complete."""
        return [s for s in self.shard_sizes if len(self._seen[s]) != self._chunk_counts.get(s, -1)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def total_count(self) -> float:
        """Counted targets of the shards heard from."""
        return sum(self._counts.values())

    def mean(self) -> np.ndarray:
        """The mean, float32.  Once per round, in the float64 sum's own memory: no second vector
        exists at the peak (see `_downcast_in_place`).  A round whose shards counted no target at
        all has a zero gradient (its loss sums had nothing to differentiate)."""
        if not self.complete:
            raise RuntimeError(f"round {self.round} is missing shards {self.missing()}")
        if self._sum is None:
            raise RuntimeError(f"the mean of round {self.round} was already taken")
        total, self._sum = self._sum, None
        p = self.params_end
        if self.total_count > 0:
            np.divide(total[:p], self.total_count, out=total[:p])
        else:
            total[:p] = 0.0
        if p < self.numel:
            np.divide(total[p:], self.total_samples, out=total[p:])
        return _downcast_in_place(total)

    def loss(self) -> float:
        """The mean loss over the counted targets of the shards heard from."""
        weights = {s: self._counts[s] for s in self._loss}
        total = sum(weights.values())
        return sum(self._loss[s] * w for s, w in weights.items()) / total if total > 0 else 0.0

    def robust(self, aggregator: str, byzantine: int, clip_norm: float) -> np.ndarray:
        """Combine the complete shards' gradients with a robust aggregator (after clipping): each
        shard's mean over its counted targets (a shard that counted none: zero), weighted by its
        planned rows, not by the count it claims (a worker could claim any)."""
        if self._rows is None:
            raise RuntimeError("robust aggregation needs keep_rows=True")
        done = [s for s in self.shard_sizes if s not in self.missing()]
        rows = np.stack([self._rows[s] for s in done]).astype(np.float64)
        if self.summed:
            counts = np.array([self._counts[s] for s in done], dtype=np.float64)
            part = rows[:, : self.params_end]
            np.divide(part, counts[:, None], out=part, where=counts[:, None] > 0)
            part[counts == 0] = 0.0
        if clip_norm > 0:
            rows = robust.clip(rows, clip_norm)
        weights = np.array([self.shard_sizes[s] for s in done], dtype=np.float64)
        return robust.combine(rows, weights, aggregator, byzantine).astype(np.float32)

    def complete_samples(self) -> int:
        """Samples of the shards whose whole gradient arrived."""
        return sum(self.shard_sizes[s] for s in self.shard_sizes if s not in self.missing())

    def partial_mean(self) -> np.ndarray:
        """Quorum close: each element averaged over the shards whose chunk for it arrived.

        Equals `mean()` when the round is complete; elements no shard delivered get 0.
        """
        weights = np.zeros(self.numel, dtype=np.float64)
        p = self.params_end
        for shard, seen in self._seen.items():
            for index in seen:
                start, stop = chunking.bounds(self.numel, self._chunk_counts[shard], index)
                weights[start : min(stop, p)] += self._counts[shard]
                weights[max(start, p) : stop] += self.shard_sizes[shard]
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
