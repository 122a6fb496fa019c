"""The job's members as the orchestrator sees them: who is in the members bucket, who of them may
be planned (`liveness`), what kernels and how many gradient bytes each reports, and every change
of that as an event.  One part of the orchestrator, buildable alone with a bus that has a members
bucket (or a fake with `kv_items`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from pangea.bus import subjects
from pangea.errors import Reason
from pangea.roles.liveness import Beat, Liveness
from pangea.train import kernels
from pangea.wire import codec
from pangea.wire.messages import Heartbeat

log = logging.getLogger(__name__)
Event = Callable[[int, str, str], None]  # (round, kind, detail)
Refuse = Callable[[Reason, str], bool]
RESYNC_SECONDS = 5.0  # a watched bucket is listed again this often


class MembersBucket:
    """The members bucket as the orchestrator reads it: listed, or followed by a watch."""

    def __init__(self, bus, bucket: str) -> None:
        self.bus, self.bucket = bus, bucket
        self._following: asyncio.Task | None = None  # `watch`: the task that follows the bucket
        self._watcher = None
        self._seen: dict[str, tuple[bytes, float]] = {}  # watched: key -> (latest value, when it came)
        self._ttl = 0.0
        self._listed = 0.0  # when the bucket was last listed

    async def watch(self, ttl: float) -> None:
        """Follow the bucket as heartbeats are written, instead of listing it for every round (a
        listing costs a request per member: measured ~3.6 ms of a 15 ms round at K=2).

        A key the server expires (`ttl` after its last write) leaves no trace in a watch, so a
        member seen last more than `ttl` ago counts as gone here too; and the bucket is still
        listed every RESYNC_SECONDS, so that a watch that stopped delivering costs at most that."""
        self._ttl = ttl
        self._watcher = await self.bus.kv_watch(self.bucket)
        self._following = asyncio.create_task(self._follow(self._watcher))

    async def _follow(self, watcher) -> None:
        async for entry in watcher:
            if entry is None:  # the latest values are through
                continue
            if entry.operation in ("DEL", "PURGE"):
                self._seen.pop(entry.key, None)
            else:
                self._seen[entry.key] = (entry.value, time.monotonic())

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
            await self._watcher.stop()
            self._following = None

    async def items(self) -> dict[str, bytes]:
        """The bucket's live keys: from the watch (listed again every RESYNC_SECONDS), or listed."""
        now = time.monotonic()
        if self._following is None or self._following.done() or now - self._listed > RESYNC_SECONDS:
            items = await self.bus.kv_items(self.bucket)
            self._listed = now
            if self._following is not None:
                self._seen = {key: (raw, now) for key, raw in items.items()}
            return items
        return {key: raw for key, (raw, seen) in self._seen.items() if now - seen < self._ttl}


class Membership:
    """Live members from their heartbeats; `plannable` and `for_round` say whom to give shards."""

    def __init__(
        self, bus, job: str, *, heartbeat_seconds: float, overdue_beats: float, event: Event, refuse: Refuse
    ) -> None:
        self.bucket, self.job = MembersBucket(bus, subjects.members_bucket(job)), job
        self.heartbeat_seconds = heartbeat_seconds  # a heartbeat that does not say its own period
        self.liveness = Liveness(overdue_beats)
        self.known: list[str] = []  # the members as of the last round planned (or the start)
        self.kernels: dict[str, dict] = {}  # worker -> the kernels its heartbeat reports
        self._bytes: dict[tuple[str, int], int] = {}  # (worker, pid) -> gradient bytes it published
        self._excluded: dict[str, str] = {}  # worker -> why it was not planned, as last logged
        self._event, self._refuse = event, refuse
        self.round = 0  # the round in hand, for events

    async def watch(self, ttl: float) -> None:
        """Follow the members bucket as heartbeats are written (see `MembersBucket.watch`)."""
        await self.bucket.watch(ttl)

    async def close(self) -> None:
        await self.bucket.close()

    async def live(self) -> list[str]:
        """Live workers, sorted by id: a key in the members bucket, which the server expires
        PANGEA_MEMBER_TTL seconds after the last heartbeat (the server's clock, not the workers').
        Their heartbeats feed `liveness`, which says who of them may be planned."""
        items = await self.bucket.items()
        live = []
        now = time.monotonic()
        for worker, raw in items.items():
            try:
                beat = codec.decode(raw, Heartbeat)
            except codec.CodecError as exc:
                self._refuse(Reason.MALFORMED, f"heartbeat {worker}: {exc}")
                continue
            if beat.worker != worker or beat.job != self.job:
                continue
            live.append(worker)
            self._observe(worker, beat, now)
        self.liveness.forget_all_but(set(live))
        return sorted(live)

    def _observe(self, worker: str, beat: Heartbeat, now: float) -> None:
        self._bytes[worker, beat.pid] = max(self._bytes.get((worker, beat.pid), 0), beat.bytes_sent)
        if beat.torch_version:
            self.kernels[worker] = kernels.Kernels(
                torch=beat.torch_version, device=beat.device, threads=beat.torch_threads, cpu=beat.cpu
            ).as_dict()
        seen = Beat(
            sent_at=beat.sent_at,
            shards_done=beat.shards_done,
            params_version=beat.params_version,
            ready=beat.ready,
            period=beat.heartbeat_seconds or self.heartbeat_seconds,
        )
        back = self.liveness.observe(worker, seen, now)
        if back:
            self._event(self.round, "recover", back)

    def plannable(self, members: list[str]) -> list[str]:
        """The members that may take a shard of a new round: ready, beating, not quarantined."""
        return self.liveness.plannable(members, time.monotonic())

    def overdue(self, worker: str) -> bool:
        return self.liveness.overdue(worker, time.monotonic())

    def excluded(self) -> dict[str, str]:
        """{worker: why} for the known members that may not be planned now."""
        return self.liveness.excluded(self.known, time.monotonic())

    async def wait(self, minimum: int) -> list[str]:
        """Wait until `minimum` members are plannable (ready: a consumer and parameters); those."""
        announced = 0.0
        while True:
            live = await self.live()
            members = self.plannable(live)
            if len(members) >= minimum:
                return members
            if time.monotonic() - announced > 5:
                excluded = self.liveness.excluded(live, time.monotonic())
                why = "".join(f"; {w} {reason}" for w, reason in excluded.items())
                log.info("waiting for workers: %d of %d ready%s", len(members), minimum, why)
                announced = time.monotonic()
            await asyncio.sleep(0.1)

    async def for_round(self, r: int) -> list[str]:
        """The members to plan round r over (waiting for one if none may be planned).

        Joins and leaves (of the members bucket) are events, and so is every change in who is
        excluded and why (overdue heartbeat, not ready yet); quarantines log themselves."""
        self.round = r
        live = await self.live()
        members = self.plannable(live) or await self.wait(1)
        live = sorted(set(live) | set(members))
        joined = sorted(set(live) - set(self.known))
        left = sorted(set(self.known) - set(live))
        if self.known and joined:
            self._event(r, "join", f"joined: {', '.join(joined)}")
        if left:
            self._event(r, "leave", f"left: {', '.join(left)}")
        self.known = live
        excluded = self.liveness.excluded(live, time.monotonic())
        for worker, why in excluded.items():
            if self._excluded.get(worker) != why and not why.startswith("quarantined"):
                self._event(r, "exclude", f"{worker} not planned: {why}")
        self._excluded = excluded
        return members

    def quarantine(self, r: int, worker: str, why: str) -> None:
        """Plan `worker` into no new round until its heartbeat shows progress (an event, once)."""
        if self.liveness.quarantine(worker, why):
            self._event(r, "quarantine", f"{worker} quarantined: {why} (planned again once it shows progress)")

    async def bytes_sent(self, before: dict[str, int]) -> dict[str, int]:
        """Gradient bytes each worker sent, from their heartbeats: after one more beat each, so that
        the last round's bytes are in (a restarted worker process counts from 0 again)."""
        await asyncio.sleep(1.5 * self.heartbeat_seconds)
        await self.live()
        per_worker: Counter[str] = Counter(before)  # from before a resume
        for (worker, _), sent in self._bytes.items():
            per_worker[worker] += sent
        return dict(sorted(per_worker.items()))
