"""The transport ceiling: nats-py core publish -> nats-server -> nats-py subscriber, next to
Pangea's own path (JetStream publish with acks, window in flight -> pull consumer), same bytes.

    python -m benchmarks.pipe
"""

from __future__ import annotations

import asyncio
import time

import nats

from benchmarks.common import record
from pangea.bus.client import Bus
from pangea.bus.server import EmbeddedServer
from pangea.settings import BusSettings


async def core_pipe(url: str, size: int, count: int, in_flight: int = 32 << 20) -> float:
    """GB/s through core NATS with at most `in_flight` bytes on the way (in one process the
    subscriber's callback releases the publisher), so the server never cuts the reader off."""
    sub_nc, pub_nc = await nats.connect(url), await nats.connect(url)
    done = asyncio.Event()
    slots = asyncio.Semaphore(max(2, in_flight // size))
    received = 0

    async def on_msg(msg) -> None:
        nonlocal received
        received += 1
        slots.release()
        if received == count:
            done.set()

    await sub_nc.subscribe("bench.pipe", cb=on_msg, pending_bytes_limit=1 << 30)
    await sub_nc.flush()
    payload = bytes(size)
    start = time.perf_counter()
    for _ in range(count):
        await slots.acquire()
        await pub_nc.publish("bench.pipe", payload)
    await asyncio.wait_for(done.wait(), 120)
    seconds = time.perf_counter() - start
    await pub_nc.close()
    await sub_nc.close()
    return size * count / seconds / 1e9


async def pangea_pipe(url: str, size: int, count: int) -> float:
    """GB/s through Pangea's bus: acknowledged JetStream publishes, read by a pull consumer."""
    settings = BusSettings(nats_url=url, job="bench", storage="memory", chunk_bytes=size)
    pub, sub = await Bus.connect(settings, "pub"), await Bus.connect(settings, "sub")
    await pub.ensure_job_streams(1 << 20)
    puller = await sub.pull("grads", "pangea.bench.grads", durable="bench", batch=64, chunked=True)
    payload = bytes(size)

    async def consume() -> None:
        got = 0
        while got < count:
            delivery = await puller.next(timeout=5)
            if delivery is not None:
                got += 1
                await delivery.ack()

    start = time.perf_counter()
    reader = asyncio.create_task(consume())
    await pub.publish(("pangea.bench.grads", payload, f"m{size}-{i}") for i in range(count))
    await reader
    seconds = time.perf_counter() - start
    await pub.close()
    await sub.close()
    return size * count / seconds / 1e9


def run() -> list[dict]:
    rows = []
    with EmbeddedServer(max_payload=8 << 20) as server:
        for size, count in ((64 << 10, 2000), (1 << 20, 400), (4 << 20, 100)):
            core = asyncio.run(core_pipe(server.url, size, count))
            ours = asyncio.run(pangea_pipe(server.url, size, count))
            rows.append(
                {
                    "message KB": size >> 10,
                    "nats-py core GB/s": core,
                    "pangea bus GB/s": ours,
                    "pangea / ceiling": ours / core,
                }
            )
    return rows


if __name__ == "__main__":
    record("pipe", run())
