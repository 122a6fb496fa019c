"""Consumers on a real nats-server: a restarted reader takes over its durable consumer (the
messages the dead reader had fetched but not acknowledged come to the new one at once, not after
the ack wait, 30 s, and the acknowledged ones before them do not come again); a pull asks for at
most 8 MB; a consumer lost with a restarted server is reported and reopened."""

from __future__ import annotations

import asyncio

import pytest

from pangea.bus import subjects
from pangea.bus.client import Bus, ConsumerLost
from pangea.bus.consume import ACK_WAIT
from pangea.bus.server import EmbeddedServer
from pangea.settings import BusSettings


async def _payloads(puller, timeout: float) -> list[bytes]:
    got = []
    while (delivery := await puller.next(timeout=timeout)) is not None:
        got.append(delivery.payload)
        await delivery.ack()
    return got


def test_a_restarted_reader_gets_what_the_dead_one_held_at_once(nats_url, job):
    async def main() -> None:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "test")
        try:
            await bus.ensure_job_streams(params_bytes=1024)
            subject, durable = subjects.batches(job, "w9"), subjects.worker_consumer("w9")
            await bus.publish([(subject, f"batch {i}".encode(), f"{job}-{i}") for i in range(6)])
            assert await bus.reclaim("batches", durable) is None  # no consumer yet: nothing to take over

            first = await bus.pull("batches", subject, durable=durable, batch=4)
            acked = await first.next(timeout=5)
            await acked.ack()
            await bus.nc.flush()  # an ack is a plain publish: let the server have it
            held = [await first.next(timeout=5) for _ in range(3)]  # fetched, never acknowledged
            assert [d.payload for d in held] == [b"batch 1", b"batch 2", b"batch 3"]
            # The reader dies: its subscription goes without a nak (SIGKILL sends nothing).
            await first._sub.unsubscribe()

            start = await bus.reclaim("batches", durable)
            assert start is not None
            second = await bus.pull("batches", subject, durable=durable, start_sequence=start, batch=4)
            got = await _payloads(second, timeout=min(3.0, ACK_WAIT / 4))
            assert got == [f"batch {i}".encode() for i in range(1, 6)]
            assert await bus.consumer_backlog("batches", durable) == (0, 0)
            assert await bus.reclaim("batches", durable) is None  # all acknowledged: used as it is
        finally:
            await bus.delete_job()
            await bus.close()

    asyncio.run(main())


def test_one_fetch_stays_under_the_servers_max_pending(nats_url, job):
    """A pull asks for at most 8 MB (beyond ~64 MB in flight nats-server cuts a reader as a slow
    consumer, and what it held comes back only after the ack wait): counted in messages of the
    server's max payload, or, for tensor chunks, of `chunk_bytes` (a batch per pull, not one)."""

    async def main() -> None:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job, chunk_bytes=64 << 10), "test")
        try:
            await bus.ensure_job_streams(params_bytes=1 << 20)
            # Two subjects: the gradient stream is a work queue, one consumer per subject.
            one, two = subjects.grads(job), subjects.grads(job, 1)
            await bus.publish([(s, bytes(60 << 10), f"{s}-{i}") for s in (one, two) for i in range(40)])
            plain = await bus.pull("grads", one, durable="plain", batch=32)
            chunks = await bus.pull("grads", two, durable="chunks", batch=32, chunked=True)
            for puller in (plain, chunks):
                assert await puller.next(timeout=5) is not None
            await asyncio.sleep(0.5)  # the rest of each pull's messages arrive
            fetched_plain, fetched_chunks = (1 + p._sub.pending_msgs for p in (plain, chunks))
            assert (plain._batch, chunks._batch) == (fetched_plain, fetched_chunks)
            assert fetched_plain == max(1, min(32, (8 << 20) // bus.max_payload))
            assert fetched_chunks == 32  # 8 MB holds 120 chunks of 64 KB: the batch is the bound
            assert fetched_plain * bus.max_payload <= 8 << 20 or fetched_plain == 1
        finally:
            await bus.delete_job()
            await bus.close()

    asyncio.run(main())


def test_a_stream_lost_with_its_server_is_made_again_and_its_consumer_reopened(job, tmp_path):
    """Gradients and parameters live in memory (the default): a server restart loses their
    streams.  After the reconnection a reader learns at once that its consumer is gone
    (ConsumerLost, not an idle stream); the role that created the streams makes them again
    when it publishes there (or by `restore_job_streams`), and the reader reopens its consumer
    and reads what comes next.  The batch log, on file, keeps what it had."""

    async def main(server: EmbeddedServer) -> None:
        settings = BusSettings(nats_url=server.url, job=job)
        owner, reader = await Bus.connect(settings, "owner"), await Bus.connect(settings, "reader")
        try:
            await owner.ensure_job_streams(params_bytes=1 << 10)
            await owner.publish([(subjects.batches(job, "w0"), b"batch 0", "b0")])
            grads = await reader.pull("grads", subjects.grads(job), durable="orchestrator")
            await owner.publish([(subjects.grads(job), b"before", "g0")])
            assert (await grads.next(timeout=5)).payload == b"before"

            server.kill()
            server.restart()
            while not (owner.reconnects and reader.reconnects):
                await asyncio.sleep(0.05)
            with pytest.raises(ConsumerLost, match="is gone"):  # at once, not after 10 s of quiet
                for _ in range(20):
                    await grads.next(timeout=0.1)
            await owner.publish([(subjects.params(job), b"params again", "p1")])  # the owner makes them again
            await grads.reopen(budget=10)
            await owner.publish([(subjects.grads(job), b"after", "g1")])
            assert (await grads.next(timeout=5)).payload == b"after"
            batches = await reader.pull("batches", subjects.batches(job, "w0"), durable="w0")
            assert (await batches.next(timeout=5)).payload == b"batch 0"
        finally:
            await owner.close()
            await reader.close()

    with EmbeddedServer(tmp_path / "store") as server:
        asyncio.run(main(server))
