"""The orchestrator's side of `--shards S`: slice 0 of the gradient is its own, slices
1..S-1 arrive averaged from the orchestrator shards (see `pangea.roles.reducer`).

Pure: bytes in, refusals out; no bus.
"""

from __future__ import annotations

import numpy as np

from pangea.errors import Reason, Rejected
from pangea.wire import codec
from pangea.wire.chunking import Assembler, bounds
from pangea.wire.messages import GRADIENT_TENSOR, Gradient, RoundPlan


def shard_name(shard: int) -> str:
    """The sender name of orchestrator shard `shard` on the reduced subject."""
    return f"shard-{shard}"


class Slices:
    def __init__(self, numel: int, count: int) -> None:
        self.numel = numel
        self.count = count
        self.bounds = [bounds(numel, count, s) for s in range(count)]
        self.round = -1
        self._parts: dict[int, Assembler] = {}

    def size(self, s: int) -> int:
        lo, hi = self.bounds[s]
        return hi - lo

    def new_round(self, r: int) -> None:
        self.round = r
        self._parts = {s: Assembler(self.size(s)) for s in range(1, self.count)}

    @property
    def complete(self) -> bool:
        return all(part.complete for part in self._parts.values())

    def missing_names(self) -> list[str]:
        return [shard_name(s) for s, part in self._parts.items() if not part.complete]

    def add(self, plan: RoundPlan, generation: int, payload: bytes, max_payload: int) -> None:
        """Take one chunk of a shard's mean slice; `Rejected` if it is refused (nothing taken)."""
        if len(payload) > max_payload:
            raise Rejected(Reason.OVERSIZED, f"{len(payload)} bytes on the reduced subject")
        try:
            grad = codec.decode(payload, Gradient)
        except codec.CodecError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        if grad.job != plan.job:
            raise Rejected(Reason.WRONG_JOB, f"reduced slice for job {grad.job!r}")
        if grad.generation != generation:
            raise Rejected(
                Reason.STALE_GENERATION, f"reduced slice of generation {grad.generation}, current {generation}"
            )
        if grad.shard not in self._parts or grad.sender != shard_name(grad.shard):
            raise Rejected(
                Reason.UNKNOWN_SENDER, f"{grad.sender!r} sent slice {grad.shard} (shards 1..{self.count - 1} exist)"
            )
        if grad.round != plan.round:
            late = grad.round < plan.round
            raise Rejected(
                Reason.STALE_ROUND if late else Reason.FUTURE_ROUND,
                f"reduced slice of round {grad.round}, current {plan.round}",
            )
        if grad.num_samples != plan.batch_size:
            raise Rejected(
                Reason.WRONG_SAMPLES,
                f"slice {grad.shard} averaged {grad.num_samples} samples, the round has {plan.batch_size}",
            )
        if grad.values.name != GRADIENT_TENSOR or grad.values.dtype != "float32":
            raise Rejected(Reason.WRONG_DTYPE, f"reduced slice {grad.values.name!r} of {grad.values.dtype}")
        values = grad.values.numpy()
        if values.ndim != 1:
            raise Rejected(Reason.WRONG_SHAPE, f"reduced slice values of shape {values.shape}")
        if not np.isfinite(values).all():
            raise Rejected(Reason.NON_FINITE, f"reduced slice {grad.shard} of round {grad.round} has NaN/Inf")
        try:
            self._parts[grad.shard].add(plan.round, grad.chunk, values)
        except ValueError as exc:
            raise Rejected(Reason.WRONG_SHAPE, f"reduced slice {grad.shard}: {exc}") from None

    def join(self, own: np.ndarray) -> np.ndarray:
        """The whole mean gradient: our slice 0, then the shards' slices in order."""
        if self.count == 1:
            return own
        return np.concatenate([own, *(self._parts[s].buffer for s in range(1, self.count))])
