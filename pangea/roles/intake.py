"""Checking one gradient chunk against the round it claims to belong to: shared by the
orchestrator and its shards (reducers).  No I/O; every refusal raises `Rejected`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from pangea.errors import Reason, Rejected
from pangea.wire.chunking import bounds
from pangea.wire.compress import Compressed, decompress
from pangea.wire.messages import GRADIENT_TENSOR, Gradient, RoundPlan

# The dtype each compression mode puts on the wire.
WIRE_DTYPES = {"none": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "topk": "float32"}


def check(
    grad: Gradient,
    plan: RoundPlan,
    *,
    job: str,
    generation: int,
    compression: str,
    assigned: Mapping[int, Collection[str]],
    members: Collection[str],
    late: Collection[tuple[int, int]],
) -> None:
    """Refuse a chunk that is not for this job, generation, round, sender and format.

    `assigned` maps each shard of the round to every worker it was given (re-issues add
    workers), `late` holds the (round, shard) pairs re-issued or dropped, whose late copies
    are expected and refused quietly as `straggler_late`.
    """
    if grad.job != job:
        raise Rejected(Reason.WRONG_JOB, f"gradient for job {grad.job!r}")
    if grad.generation != generation:
        raise Rejected(Reason.STALE_GENERATION, f"generation {grad.generation}, current {generation}")
    if grad.sender not in members and not any(grad.sender in a for a in assigned.values()):
        raise Rejected(Reason.UNKNOWN_SENDER, f"{grad.sender!r} is not a member of the job")
    if grad.round < plan.round:
        if (grad.round, grad.shard) in late:
            raise Rejected(Reason.STRAGGLER_LATE, f"round {grad.round} shard {grad.shard} was re-issued or dropped")
        raise Rejected(Reason.STALE_ROUND, f"round {grad.round}, current {plan.round}")
    if grad.round > plan.round:
        raise Rejected(Reason.FUTURE_ROUND, f"round {grad.round}, current {plan.round}")
    if grad.sender not in assigned.get(grad.shard, ()):
        raise Rejected(Reason.NOT_THEIR_SHARD, f"shard {grad.shard} of round {plan.round} is not theirs")
    if grad.params_version != plan.round:
        raise Rejected(Reason.STALE_PARAMS, f"computed on version {grad.params_version}, need {plan.round}")
    if grad.values.name != GRADIENT_TENSOR:
        raise Rejected(Reason.WRONG_NAME, f"tensor {grad.values.name!r}, expected {GRADIENT_TENSOR!r}")
    if grad.compression != compression:
        raise Rejected(Reason.WRONG_COMPRESSION, f"{grad.compression!r}, the job uses {compression!r}")
    if grad.values.dtype != WIRE_DTYPES[grad.compression]:
        raise Rejected(Reason.WRONG_DTYPE, f"{grad.values.dtype}, expected {WIRE_DTYPES[grad.compression]}")


def values(grad: Gradient) -> np.ndarray:
    """The chunk's float32 values, decompressed; malformed compressed data is refused."""
    if grad.compression == "none":
        return grad.values.numpy()
    count = max(1, grad.chunk.count)
    start, stop = bounds(grad.chunk.total, count, min(grad.chunk.index, count - 1))
    size = stop - start
    raw = grad.values.numpy().reshape(-1)
    if grad.compression == "bf16":
        raw = raw.view(np.uint16)
    indices = grad.indices.numpy().reshape(-1) if grad.compression == "topk" else None
    if indices is not None:
        if grad.indices.dtype != "uint32" or indices.shape != raw.shape or (indices.size and indices.max() >= size):
            raise Rejected(Reason.WRONG_SHAPE, "top-k indices do not match the values or the chunk")
    elif raw.size != size:
        raise Rejected(Reason.WRONG_SHAPE, f"{raw.size} compressed values for a chunk of {size}")
    if grad.compression == "int8" and not (np.isfinite(grad.scale) and grad.scale > 0):
        raise Rejected(Reason.NON_FINITE, f"int8 scale {grad.scale}")
    return decompress(Compressed(grad.compression, raw, size, grad.scale, indices))
