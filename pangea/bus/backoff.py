"""Doubling waits between retries of a bus operation, within a budget of seconds."""

from __future__ import annotations

import asyncio

RETRY_BUDGET = 300.0  # seconds of retries before an operation fails; well inside the duplicate window


class Backoff:
    """Sleeps of `first`, 2×`first`, ... up to `cap` seconds, until `give_up_at` (loop time).

    `await backoff.wait()` sleeps and returns True, or returns False at once when the next
    sleep would end past the deadline: the caller then raises, naming what failed.
    """

    def __init__(self, first: float, *, cap: float = 2.0, give_up_at: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.give_up_at = give_up_at if give_up_at is not None else loop.time() + RETRY_BUDGET
        self._delay = first
        self._cap = cap

    async def wait(self) -> bool:
        loop = asyncio.get_running_loop()
        if loop.time() + self._delay > self.give_up_at:
            return False
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, self._cap)
        return True
