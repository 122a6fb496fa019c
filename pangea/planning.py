"""Round planning decisions, pure: straggler deadlines and who takes over an unfinished shard."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def adaptive_deadline(recent: Sequence[float], factor: float, floor: float, cap: float) -> float:
    """Seconds a round may wait for a shard: `factor` x the median recent round, within [floor, cap].

    With no history yet the cap applies: the first rounds include process start-up.
    """
    if not recent:
        return cap
    return min(cap, max(floor, factor * statistics.median(recent)))


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
