"""Rounds planned one ahead: round r+1's batches are stored before round r closes (its
parameters are published), and a membership change between planning a round and opening it
re-issues the planned shards, every sample counted once.  A real nats-server, every role its
own process; the stored streams' server timestamps give the order."""

from __future__ import annotations

import asyncio
import signal
import threading

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import api

from pangea.bus import subjects
from pangea.wire import codec
from pangea.wire.messages import Batch, Params
from tests.cluster import metrics
from tests.yardstick import assert_verified

DIGITS_TRAIN = 1348  # digits' training split: 21 batches of 64 and one of 4


async def _stored(url: str, job: str, what: str, kind) -> list[tuple[object, float]]:
    """Every message of a job's stream, decoded, with the server's timestamp of storing it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = subjects.stream(job, what)
        total = (await js.stream_info(stream)).state.messages
        sub = await js.subscribe(
            ">", stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )  # fmt: skip
        found = []
        while len(found) < total:
            msg = await sub.next_msg(timeout=10)
            found.append((codec.decode(msg.data, kind), msg.metadata.timestamp.timestamp()))
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


class _Watch:
    """Every message stored on a job's stream while the run goes, with the server's timestamp of
    storing it, read live on a thread of its own: the parameter stream keeps only the last few
    versions, so by the end of a run the early ones are gone from it."""

    def __init__(self, url: str, job: str, what: str, kind) -> None:
        self.url, self.stream, self.kind = url, subjects.stream(job, what), kind
        self.found: list[tuple[object, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)
        self._thread.start()

    async def _read(self) -> None:
        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            while not self._stop.is_set():  # the orchestrator creates the stream when the job starts
                try:
                    await js.stream_info(self.stream)
                    break
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.05)
            sub = await js.subscribe(
                ">", stream=self.stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
            )
            while not self._stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                self.found.append((codec.decode(msg.data, self.kind), msg.metadata.timestamp.timestamp()))
        finally:
            await nc.close()

    def stop(self) -> list[tuple[object, float]]:
        """What was stored, once the stream has been quiet for a moment."""
        self._stop.wait(1.0)
        self._stop.set()
        self._thread.join(timeout=30)
        return self.found


def _run(cluster, out, workers: int, epochs: int = 1) -> None:
    cluster.start("pre", "preprocessor")
    cluster.start(
        "orch", "orchestrator", "--workers", str(workers), "--out", str(out), "--epochs", str(epochs),
        "--batch-size", "64", "--seed", "5",
    )  # fmt: skip


def test_next_rounds_batches_are_stored_before_the_round_closes(cluster, tmp_path, nats_url, job):
    """Stable membership: for every round r >= 1, its batches were stored before the parameters
    of version r, i.e. while round r-1 was still being reduced; and the run is exact."""
    out = tmp_path / "run"
    watch = _Watch(nats_url, job, "params", Params)
    for i in range(2):
        cluster.worker(f"w{i}", test_sample_delay=0.004)  # ~0.13 s per shard: rounds long enough to see
    _run(cluster, out, 2)
    cluster.wait("orch")
    params = watch.stop()
    assert_verified(out)
    batches = asyncio.run(_stored(nats_url, job, "batches", Batch))
    first_batch, first_params = {}, {}
    for batch, at in batches:
        first_batch[batch.round] = min(at, first_batch.get(batch.round, at))
    for p, at in params:
        first_params[p.version] = min(at, first_params.get(p.version, at))
    rounds = len(metrics(out)["samples"])
    assert rounds == 22
    early = [r for r in range(1, rounds) if first_batch[r] < first_params[r]]
    assert early == list(range(1, rounds)), (
        f"rounds whose batches came after their parameters: {set(range(1, rounds)) - set(early)}"
    )
    # Each round's batches were published once: one per shard (no re-plan, no re-issue).
    assert len(batches) == 2 * rounds


@pytest.mark.slow  # 28 s; joins and deaths under planning ahead are in the default run too (test_elastic)
def test_a_member_that_leaves_after_being_planned_ahead_has_its_shard_reissued(cluster, tmp_path):
    """3 workers; w2 leaves (SIGTERM) after round 4, w3 joins after round 8.  The round planned
    ahead with w2 has its shard re-issued (rows as planned), w3 is planned from a later round
    on: every round counts each of its rows once, and the run equals its single-process
    recomputation."""
    out = tmp_path / "run"
    for i in range(3):
        cluster.worker(f"w{i}", test_sample_delay=0.006)
    _run(cluster, out, 3, epochs=2)
    cluster.wait_for_round(4)
    cluster.signal("w2", signal.SIGTERM)
    cluster.wait_for_round(8)
    cluster.worker("w3", test_sample_delay=0.006)
    cluster.wait_for_planned("w3")
    cluster.wait("orch")
    assert_verified(out)
    m = metrics(out)
    rows = ([64] * 21 + [DIGITS_TRAIN - 21 * 64]) * 2
    assert m["samples"] == rows  # every round: each of its rows once, none twice, none lost
    log = cluster.log("orch")
    # Left before its round opened (re-issued at once), or while it was open (left the job).
    reasons = ("not plannable since it was planned", "left the job")
    assert any(f"of w2 ({why})" in log for why in reasons), log[-3000:]
    assert "joined: w3" in log and 3 in m["workers"][9:], m["workers"]  # w0, w1, w3
