"""The orchestrator's consumers: workers' gradients and the shards' reduced slices."""

from __future__ import annotations

from dataclasses import dataclass

from pangea.bus import subjects
from pangea.bus.client import Bus, Puller


@dataclass
class Inbox:
    grads: Puller
    reduced: Puller | None  # with --shards > 1 only

    @classmethod
    async def open(cls, bus: Bus, sliced: bool) -> Inbox:
        job = bus.job
        grads = await bus.pull("grads", subjects.grads(job), durable="orchestrator", batch=256, chunked=True)
        reduced = None
        if sliced:
            reduced = await bus.pull(
                "grads", subjects.reduced(job), durable="orchestrator-reduced", batch=256, chunked=True
            )
        return cls(grads, reduced)

    async def reopen(self) -> None:
        """Create the consumers again (a restarted server lost them with their stream)."""
        for puller in (self.grads, self.reduced):
            if puller is not None:
                await puller.reopen()
