"""Round planning decisions, pure: straggler deadlines and who takes over an unfinished shard."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def adaptive_deadline(
    recent: Sequence[float],
    factor: float,
    floor: float,
    cap: float,
    arrived: Sequence[float] = (),
) -> float:
    """Seconds a round may wait for a shard: `factor` x the median recent clean round, within [floor, cap].

    With no clean round yet (round 0, or every round so far re-issued), `factor` x the median
    time the round in hand's completed shards took, within the same bounds: one hung worker
    must not make every round wait the cap.  With neither, the cap.
    """
    basis = recent or arrived
    if not basis:
        return cap
    return min(cap, max(floor, factor * statistics.median(basis)))


def pick_replacements(
    shards: dict[int, str], live: Sequence[str], idle: Sequence[str], tried: dict[int, set[str]]
) -> dict[int, str]:
    """A new worker for each shard in `shards` (shard -> its current worker).

    Prefers idle live workers (finished this round), then any live worker, never one that
    already had the shard, spreading the shards round-robin.  Shards with no candidate are
    left out (they keep waiting).
    """
    choice: dict[int, str] = {}
    load: dict[str, int] = {w: 0 for w in live}
    for shard in sorted(shards):
        candidates = [w for w in live if w not in tried.get(shard, set())]
        if not candidates:
            continue
        rank = {w: (0 if w in idle else 1, load[w], w) for w in candidates}
        best = min(candidates, key=rank.__getitem__)
        choice[shard] = best
        load[best] += 1
    return choice


class Deadlines:
    """How long a round waits for a shard: the configured deadline, or one learned from the
    rounds that needed no re-issue (a round stretched by a deadline must not stretch the next:
    that would grow without bound)."""

    def __init__(self, fixed: float, factor: float, floor: float, cap: float) -> None:
        self.fixed, self.factor, self.floor, self.cap = fixed, factor, floor, cap
        self.clean_seconds: list[float] = []  # durations of rounds that needed no re-issue
        self.attempt = 0  # re-issues of the round in hand

    def __call__(self, arrived: Sequence[float] = ()) -> float:
        """Seconds to wait; `arrived`: how long the round's complete shards took."""
        if self.fixed > 0:
            return self.fixed
        return adaptive_deadline(self.clean_seconds[-10:], self.factor, self.floor, self.cap, arrived)

    def round_ended(self, seconds: float, complete: bool) -> None:
        if self.attempt == 0 and complete:
            self.clean_seconds.append(seconds)
