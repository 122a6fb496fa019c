"""A worker's parameter follower, on the in-memory bus: whole versions only, newest first, in order."""

from __future__ import annotations

import asyncio

import numpy as np

from pangea.bus import subjects
from pangea.roles.follower import ParamsFollower
from pangea.wire import codec
from pangea.wire.chunking import split
from pangea.wire.messages import Params, Tensor
from tests.fakebus import FakeBus

N = 10


def _version(bus: FakeBus, version: int, values: np.ndarray, *, generation: int = 0, layout: str = "L", final=False):
    """The orchestrator's broadcast of one version, in chunks of 16 bytes (4 floats)."""
    return [
        (
            subjects.params(bus.job),
            codec.encode(
                Params(bus.job, "orchestrator", version, final, layout, chunk, Tensor.from_numpy(part), generation)
            ),
            f"params:{generation}:{version}:{chunk.index}",
        )
        for chunk, part in split(values, 16)
    ]


def _follower(bus: FakeBus) -> tuple[ParamsFollower, list[np.ndarray]]:
    applied: list[np.ndarray] = []
    follower = ParamsFollower(bus, "L", N, lambda flat: applied.append(flat.copy()))
    return follower, applied


def test_a_version_is_applied_once_whole_and_an_older_one_never():
    async def main():
        bus = FakeBus()
        follower, applied = _follower(bus)
        await follower.subscribe("params-w0", inactive_threshold=60)
        v0, v1 = np.arange(N, dtype=np.float32), np.arange(N, dtype=np.float32) + 100
        first, second = _version(bus, 0, v0), _version(bus, 1, v1)
        await bus.publish(first[:2])  # half of version 0: nothing to apply yet
        await follower.read(until=None, timeout=0)
        assert applied == [] and follower.stamp == (-1, -1)
        await bus.publish(first[2:] + second)
        await follower.read(until=(0, 1), timeout=0)
        assert [a.tolist() for a in applied] == [v0.tolist(), v1.tolist()] and follower.stamp == (0, 1)
        await bus.publish(_version(bus, 0, v0 * 0, generation=0)[:1])  # a late copy of an old chunk
        await follower.read(until=None, timeout=0)
        assert len(applied) == 2

    asyncio.run(main())


def test_a_new_generation_supersedes_a_higher_version_of_the_old_one():
    """A restarted orchestrator (generation 1) may go back to its checkpoint's round."""

    async def main():
        bus = FakeBus()
        follower, applied = _follower(bus)
        await follower.subscribe("params-w0", inactive_threshold=60)
        await bus.publish(_version(bus, 5, np.ones(N, np.float32)))
        await bus.publish(_version(bus, 3, np.full(N, 2, np.float32), generation=1))
        await follower.read(until=(1, 3), timeout=0)
        assert follower.stamp == (1, 3) and applied[-1].tolist() == [2.0] * N

    asyncio.run(main())


def test_parameters_of_another_layout_or_garbage_are_counted_and_skipped():
    async def main():
        bus = FakeBus()
        follower, applied = _follower(bus)
        await follower.subscribe("params-w0", inactive_threshold=60)
        await bus.publish(_version(bus, 0, np.ones(N, np.float32), layout="other", generation=9))
        await bus.publish([(subjects.params(bus.job), b"\x00" * 24, "junk")])
        await bus.publish(_version(bus, 0, np.zeros(N, np.float32), generation=10, final=True))
        await follower.read(until=(10, 0), timeout=0)
        assert follower.rejected == 3 + 1  # three chunks of another layout, one malformed message
        assert applied[-1].tolist() == [0.0] * N and follower.final

    asyncio.run(main())


def test_a_joiner_starts_two_versions_back_from_the_last_stored_chunk():
    """It need not read the whole stream: two versions' worth of chunks hold the latest whole one."""

    async def main():
        bus = FakeBus()
        for v in range(6):
            await bus.publish(_version(bus, v, np.full(N, v, np.float32)))
        follower, applied = _follower(bus)
        await follower.subscribe("params-w9", inactive_threshold=60)
        assert follower.consumer.next_seq == 6 * 3 - 2 * 3 + 1  # 3 chunks per version
        await follower.read(until=(0, 5), timeout=0)
        assert [a[0] for a in applied] == [4.0, 5.0]

    asyncio.run(main())
