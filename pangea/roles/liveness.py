"""Which members may be planned into a round: liveness from what workers report, not only a TTL.

A member is in the members bucket until its key expires (PANGEA_MEMBER_TTL after its last
heartbeat).  That is too slow a signal to plan by: a worker whose heartbeats stopped (a cut
link, a stopped process) would be planned into every round until then, and a worker that
heartbeats but does no work (a hung GPU, a deadlocked loader) forever.  So a member is
*plannable* only when

- it is **ready**: its batch consumer exists and it holds a parameter version;
- its heartbeat is not **overdue**: the orchestrator saw it change within `overdue_beats` of the
  worker's own heartbeat period (measured on the orchestrator's clock: no clock skew);
- it is not **quarantined**: a worker that missed a round's deadline stays out until its
  heartbeat shows progress (shards done or parameter version moved on since).

It stays a member throughout: a quarantined or overdue worker that recovers is planned in
again without a restart.  Pure: no I/O; the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Beat:
    """What liveness needs of one heartbeat."""

    sent_at: float  # the worker's clock: compared only for change, never against ours
    shards_done: int
    params_version: int
    ready: bool
    period: float  # the worker's heartbeat period, seconds


@dataclass
class _Member:
    beat: Beat
    seen: float  # our clock, when its heartbeat last changed
    quarantine: str | None = None  # why it is kept out
    baseline: tuple[int, int] = (0, 0)  # (shards_done, params_version) when quarantined


def _progressed(beat: Beat, baseline: tuple[int, int]) -> bool:
    """Shards done or parameters moved on since the quarantine, each counter on its own: a
    restarted worker (same id, a new process) counts its shards from 0 again, and compared as a
    pair with the old process's count its newer parameters would never show."""
    shards, version = baseline
    return beat.shards_done > shards or beat.params_version > version


class Liveness:
    """Tracks every member's heartbeats and quarantines; says who may be planned."""

    def __init__(self, overdue_beats: float = 3.0, slack: float = 0.5) -> None:
        self.overdue_beats = overdue_beats
        self.slack = slack  # how stale our own view may be (we poll the bucket about this often)
        self._members: dict[str, _Member] = {}

    def observe(self, worker: str, beat: Beat, now: float) -> str | None:
        """Take a heartbeat read from the bucket; returns a line when it ends a quarantine."""
        member = self._members.get(worker)
        if member is None:
            self._members[worker] = _Member(beat, now)
            return None
        if beat.sent_at != member.beat.sent_at:
            member.seen = now
        member.beat = beat
        if member.quarantine and _progressed(beat, member.baseline):
            why, member.quarantine = member.quarantine, None
            return f"{worker} is back (shards done {beat.shards_done}, parameters {beat.params_version}) after: {why}"
        return None

    def forget_all_but(self, live: set[str]) -> None:
        """Members whose key expired or was deleted are gone (a new key starts afresh)."""
        for worker in [w for w in self._members if w not in live]:
            del self._members[worker]

    def quarantine(self, worker: str, why: str) -> bool:
        """Keep `worker` out of new rounds until its heartbeat shows progress; False if it already is."""
        member = self._members.get(worker)
        if member is None or member.quarantine:
            return False
        member.quarantine = why
        member.baseline = (member.beat.shards_done, member.beat.params_version)
        return True

    def overdue(self, worker: str, now: float) -> bool:
        member = self._members.get(worker)
        if member is None:
            return True
        return now - member.seen > self.overdue_beats * member.beat.period + self.slack

    def state(self, worker: str, now: float) -> str:
        """'ok', 'starting' (not ready), 'overdue' or 'quarantined: <why>'."""
        member = self._members.get(worker)
        if member is None:
            return "gone"
        if member.quarantine:
            return f"quarantined: {member.quarantine}"
        if self.overdue(worker, now):
            return "overdue"
        return "ok" if member.beat.ready else "starting"

    def plannable(self, members: list[str], now: float) -> list[str]:
        """The members (in the given order) that may be planned into a new round."""
        return [w for w in members if self.state(w, now) == "ok"]

    def excluded(self, members: list[str], now: float) -> dict[str, str]:
        """{worker: state} for the members that may not be planned now."""
        return {w: s for w in members if (s := self.state(w, now)) != "ok"}
