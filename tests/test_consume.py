"""A restarted reader takes over its durable consumer: on a real nats-server, the messages the
dead reader had fetched but not acknowledged come to the new one at once, not after the ack
wait (30 s), and the acknowledged ones before them do not come again."""

from __future__ import annotations

import asyncio

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.bus.consume import ACK_WAIT
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
            fetched_plain, fetched_chunks = 1 + len(plain._buffer), 1 + len(chunks._buffer)
            assert fetched_plain == max(1, min(32, (8 << 20) // bus.max_payload))
            assert fetched_chunks == 32  # 8 MB holds 120 chunks of 64 KB: the batch is the bound
            assert fetched_plain * bus.max_payload <= 8 << 20 or fetched_plain == 1
        finally:
            await bus.delete_job()
            await bus.close()

    asyncio.run(main())
