"""An in-memory stand-in for `pangea.bus.client.Bus`, for unit tests of a role's logic.

It keeps the Bus's surface that roles use (publish, pull, last message, KV) with JetStream's
semantics where a role depends on them: streams keep every message in order with a sequence
number, a msg id is stored once, a pull consumer starts at the sequence it is given and reads
the subjects it filters on.  It never proves the system works: it has no network, no limits,
no redelivery, no server restarts, and the end-to-end tests stay on a real nats-server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from dataclasses import dataclass, field

IDLE_LIMIT = 20.0

# Which stream stores a subject, as Bus.ensure_job_streams configures them.
_STREAMS = {"batches": "batches", "plans": "plans", "grads": "grads", "reduced": "grads", "params": "params"}


@dataclass
class Stored:
    seq: int
    subject: str
    payload: bytes


@dataclass
class FakeDelivery:
    payload: bytes
    subject: str
    acked: bool = False

    async def ack(self) -> None:
        self.acked = True

    async def in_progress(self) -> None:
        pass


@dataclass
class FakePuller:
    bus: FakeBus
    what: str
    subject: str
    next_seq: int
    handed: list[FakeDelivery] = field(default_factory=list)
    refused: int = 0
    idle_since: float | None = None
    closed: bool = False

    async def next(self, timeout: float) -> FakeDelivery | None:
        """The next message on the subject, or None after a moment; a reader that polls in vain for
        IDLE_LIMIT seconds is waiting for something the test never publishes, and fails."""
        for msg in self.bus.streams.get(self.what, []):
            if msg.seq >= self.next_seq and fnmatch.fnmatchcase(msg.subject, self.subject.replace(">", "*")):
                self.next_seq = msg.seq + 1
                delivery = FakeDelivery(msg.payload, msg.subject)
                self.handed.append(delivery)
                self.idle_since = None
                return delivery
        now = time.monotonic()
        self.idle_since = self.idle_since or now
        if now - self.idle_since > IDLE_LIMIT:
            raise AssertionError(f"waited {IDLE_LIMIT:g}s on {self.subject} for a message nobody published")
        await asyncio.sleep(min(timeout, 0.002))
        return None

    async def close(self) -> None:
        self.closed = True


class FakeBus:
    """One job's streams and buckets, in memory."""

    def __init__(self, job: str = "job", chunk_bytes: int = 1 << 20, max_payload: int = 8 << 20) -> None:
        self.job = job
        self.chunk_bytes = chunk_bytes
        self.max_payload = max_payload
        self.streams: dict[str, list[Stored]] = {}
        self.msg_ids: set[str] = set()
        self.kvs: dict[str, dict[str, bytes]] = {}
        self.closing = False

    def _stream_of(self, subject: str) -> str:
        token = subject.split(".")[2]  # pangea.<job>.<what>[...]
        return _STREAMS[token]

    async def publish(self, items) -> list[int]:
        sequences = []
        for subject, payload, msg_id in items:
            if msg_id in self.msg_ids:  # stored once, as JetStream's duplicate window does
                continue
            self.msg_ids.add(msg_id)
            stream = self.streams.setdefault(self._stream_of(subject), [])
            stream.append(Stored(len(stream) + 1, subject, bytes(payload)))
            sequences.append(len(stream))
        return sequences

    async def pull(self, what: str, subject: str, durable: str | None, *, start_sequence: int | None = None, **_):
        return FakePuller(self, what, subject, start_sequence or 1)

    async def reclaim(self, what: str, durable: str) -> int | None:
        return None  # no consumer outlives its reader here

    async def delete_consumer(self, what: str, durable: str, job: str | None = None) -> None:
        pass  # a consumer here is its puller

    async def last_sequence_and_payload(self, what: str, subject: str) -> tuple[int, bytes] | None:
        found = [m for m in self.streams.get(what, []) if m.subject == subject]
        return (found[-1].seq, found[-1].payload) if found else None

    async def kv(self, bucket: str, ttl: float | None = None) -> FakeKV:
        return FakeKV(self.kvs.setdefault(bucket, {}))

    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        return self.kvs.get(bucket, {}).get(key)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        self.kvs.setdefault(bucket, {})[key] = value

    async def kv_items(self, bucket: str) -> dict[str, bytes]:
        return dict(self.kvs.get(bucket, {}))


@dataclass
class FakeKV:
    values: dict[str, bytes]

    async def put(self, key: str, value: bytes) -> None:
        self.values[key] = value

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)
