"""What each round computed: which rows of which global batches each shard covered, and who.

The orchestrator records one `RoundRecord` per optimizer step it took; a run writes them to
`plans.jsonl`; `pangea verify` recomputes exactly those rounds in one process.  The same
functions cut a round into shards for the orchestrator, the preprocessor and the reference,
so the three can never disagree on the rows.  Pure: no torch, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pangea.train.data import position
from pangea.wire.chunking import bounds


def batch_rows(num_samples: int, batch_size: int, step: int) -> int:
    """Rows of global batch `step` of an epoch (the last batch of an epoch may be short)."""
    return min(batch_size, num_samples - step * batch_size)


def shard_count(num_samples: int, batch_size: int, first_step: int, workers: int) -> int:
    """Shards of a round: one per worker, but never more than the first global batch has rows."""
    _, step = position(first_step, num_samples, batch_size)
    return max(1, min(workers, batch_rows(num_samples, batch_size, step)))


def shard_rows(num_samples: int, batch_size: int, global_step: int, shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `shards` within global batch `global_step` (may be empty)."""
    _, step = position(global_step, num_samples, batch_size)
    return bounds(batch_rows(num_samples, batch_size, step), shards, shard)


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One shard of a round: its rows in each global batch the round covers, and who computed it."""

    rows: tuple[tuple[int, int], ...]
    workers: tuple[str, ...] = ()  # whose gradient chunks were counted (one, unless a re-issue raced)
    threads: int = 0  # their torch intra-op threads (0: not known)

    @property
    def samples(self) -> int:
        return sum(b - a for a, b in self.rows)


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One optimizer step: round `round` over the global batches from `first_step` on."""

    round: int
    first_step: int
    shards: tuple[ShardRecord, ...]

    @property
    def steps(self) -> range:
        return range(self.first_step, self.first_step + len(self.shards[0].rows))

    def to_dict(self) -> dict:
        shards = [
            {"rows": [list(r) for r in s.rows], "workers": list(s.workers), "threads": s.threads} for s in self.shards
        ]
        return {"round": self.round, "first_step": self.first_step, "shards": shards}

    @classmethod
    def from_dict(cls, data: dict) -> RoundRecord:
        try:
            shards = tuple(
                ShardRecord(
                    rows=tuple((int(a), int(b)) for a, b in s["rows"]),
                    workers=tuple(str(w) for w in s.get("workers", ())),
                    threads=int(s.get("threads", 0)),
                )
                for s in data["shards"]
            )
            record = cls(round=int(data["round"]), first_step=int(data["first_step"]), shards=shards)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a round record ({exc.__class__.__name__}: {exc})") from None
        if not shards or len({len(s.rows) for s in shards}) != 1:
            raise ValueError(f"round {record.round}: every shard must cover the same global batches")
        return record


def cut(
    num_samples: int, batch_size: int, steps: range, workers: Sequence[str]
) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """A round's shards over `workers` (in order): (worker, rows in each covered global batch)."""
    count = shard_count(num_samples, batch_size, steps[0], len(workers))
    return [(workers[i], tuple(shard_rows(num_samples, batch_size, g, count, i) for g in steps)) for i in range(count)]


def partition_problem(record: RoundRecord, num_samples: int, batch_size: int) -> str | None:
    """Why a round's shards do not count each row of each of its global batches exactly once
    (None: they do).  The invariant every round must keep, checked on what a run recorded."""
    for h, g in enumerate(record.steps):
        _, step = position(g, num_samples, batch_size)
        expected = batch_rows(num_samples, batch_size, step)
        spans = sorted(s.rows[h] for s in record.shards if s.rows[h][0] != s.rows[h][1])
        cursor = 0
        for a, b in spans:
            if a != cursor or b < a:
                return (
                    f"round {record.round}: the shards cover rows {spans} of global batch {g}, not 0..{expected} once"
                )
            cursor = b
        if cursor != expected:
            return f"round {record.round}: the shards cover rows {spans} of global batch {g}, not 0..{expected} once"
    return None


def write_jsonl(records: Iterable[dict], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_jsonl(path) -> list[RoundRecord]:
    """The round records of a run's plans.jsonl, in order; ValueError naming the bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(RoundRecord.from_dict(json.loads(line)))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return records
