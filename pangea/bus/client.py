"""The one place that talks to NATS: `Bus`, one connection of one role to one job.

Roles see bytes and `Delivery` objects; they never import nats.  Every JetStream publish
carries a `Nats-Msg-Id`, so a retried publish is stored once, and is retried until the
server acknowledges it: nothing is dropped silently, and a full stream or a slow
consumer slows the publisher down instead of losing data.

`Bus` is one object (a role holds one) made of one part per concern, each its own module:
`connection` (connect, credentials, one-line failures), `streams` (the job's topology),
`store` (KV and object-store buckets), `consume` (opening pull consumers), `puller` (reading
one), `publish` (the window of JetStream publishes, core events); `backoff` is the one retry
schedule they share.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from pangea.bus.connection import open_connection
from pangea.bus.consume import Consuming
from pangea.bus.errors import BusError, ConsumerLost
from pangea.bus.publish import PAYLOAD_HEADROOM, Publishing
from pangea.bus.puller import Delivery, Puller
from pangea.bus.store import Store
from pangea.bus.streams import DUPLICATE_WINDOW, Streams
from pangea.settings import BusSettings

__all__ = ["DUPLICATE_WINDOW", "PAYLOAD_HEADROOM", "Bus", "BusError", "ConsumerLost", "Delivery", "Puller"]


class Bus(Streams, Store, Consuming, Publishing):
    """A connection to NATS JetStream for one role of one job."""

    def __init__(self, settings: BusSettings, nc, js) -> None:
        self.settings = settings
        self.job = settings.job
        self.nc = nc
        self.js = js
        self.connected = nc is not None
        self.closing = False
        self.reconnects = 0
        self._kv_handles = {}  # Store: bucket -> KV handle

    @classmethod
    async def connect(cls, settings: BusSettings, name: str) -> Bus:
        """Connect, retrying until `connect_timeout`; BusError with the URL if nobody answers."""
        bus = cls(settings, None, None)
        bus.nc, bus.js = await open_connection(
            settings, name, bus, publish_pending=max(settings.publish_window * 4, 256)
        )
        bus.connected = True
        return bus

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(cls, settings: BusSettings, name: str) -> AsyncIterator[Bus]:
        """`async with Bus.opened(settings, name) as bus:` connected inside, closed after."""
        bus = await cls.connect(settings, name)
        try:
            yield bus
        finally:
            await bus.close()

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def chunk_bytes(self) -> int:
        """Largest tensor payload per message: the setting, capped by the server's max payload."""
        return max(1024, min(self.settings.chunk_bytes, self.max_payload - PAYLOAD_HEADROOM))

    async def close(self) -> None:
        """Flush what we sent (acks included) and close.  Not drain: pending pulls would stall it."""
        self.closing = True
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=5)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        await self.nc.close()
