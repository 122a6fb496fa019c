"""Hostile and broken messages on a job's real subjects during a real run: every one refused,
counted by reason, and the run still ends with exact parameters (DESIGN.md invariant 5)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import nats
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.roles.gradients import GradientIntake
from pangea.settings import BusSettings
from pangea.train.aggregate import RoundAccumulator
from pangea.wire import codec
from pangea.wire.messages import Batch, Chunk, Gradient, RoundPlan, Shard, Tensor
from tests.cluster import Cluster, metrics
from tests.yardstick import assert_verified

EXPECTED = {
    "malformed",
    "wrong_type",
    "oversized",
    "wrong_job",
    "stale_generation",
    "unknown_sender",
    "stale_round",
    "future_round",
    "not_their_shard",
    "wrong_name",
    "wrong_dtype",
    "wrong_shape",
    "non_finite",
    "duplicate",
}


def _grad(
    job: str,
    sender: str,
    round_: int,
    shard: int,
    values: np.ndarray,
    *,
    name: str = "grad",
    total: int | None = None,
    generation: int = 0,
    num_samples: int = 1,
) -> bytes:
    flat = values.reshape(-1)
    chunk = Chunk(0, 1, 0, total if total is not None else flat.size)
    return codec.encode(
        Gradient(
            job,
            sender,
            round_,
            shard,
            num_samples,
            0.5,
            round_,
            chunk,
            Tensor.from_numpy(values, name),
            generation,
            count=float(num_samples),
        )
    )


async def _attack(nats_url: str, job: str, numel: int, stop: asyncio.Event) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "attacker")
    n = 0

    async def send(subject: str, payload: bytes) -> None:
        nonlocal n
        n += 1
        await js.publish(subject, payload, headers={"Nats-Msg-Id": f"attack-{os.getpid()}-{n}"})

    grads = subjects.grads(job)

    async def replay_genuine(msg) -> None:  # a verbatim copy of a worker's real chunk: a duplicate
        if not stop.is_set() and (msg.headers or {}).get("Nats-Msg-Id", "").startswith("grad:"):
            await send(grads, msg.data)

    await nc.subscribe(grads, cb=replay_genuine)
    rng = np.random.default_rng(0)
    good = np.zeros(numel, np.float32)
    # Not about the round: garbage, wrong kind, oversized, foreign job/generation/sender, far rounds.
    await send(grads, rng.bytes(803))
    await send(grads, rng.bytes(800))
    await send(grads, _grad(job, "w0", 1, 0, good)[:-24])
    batch = Batch(
        job, "w0", 1, 0, 0, "w0", 0, 0, 1, Tensor.from_numpy(good[:4]), Tensor.from_numpy(np.zeros(1, np.int64))
    )
    await send(grads, codec.encode(batch))
    await bus.publish([(grads, rng.bytes(3 << 20), "attack-oversized")])  # arrives in frames
    await send(grads, _grad("another-job", "w0", 1, 0, good))
    await send(grads, _grad(job, "w0", 1, 0, good, generation=7))
    await send(grads, _grad(job, "mallory", 1, 0, good))
    await send(grads, _grad(job, "w0", 0, 0, good))
    await send(grads, _grad(job, "w0", 10**6, 0, good))
    # Other roles' subjects: garbage for a worker, the preprocessor and the params readers.
    await send(subjects.batches(job, "w0"), rng.bytes(96))
    await send(subjects.plans(job), rng.bytes(96))
    await send(subjects.params(job), rng.bytes(96))
    # About the open round: aim at its plan while the slow worker keeps it open.  The last plan
    # stored is the next round's, planned ahead; the open round's is the one before it (planned
    # ahead too, or the opening plan of round 0, or a re-issue).
    while not stop.is_set():
        stored = await js.get_last_msg(subjects.stream(job, "plans"), subjects.plans(job))
        plan, latest = None, None
        while stored is not None:
            try:
                plan = codec.decode(stored.data, RoundPlan)
            except codec.CodecError:  # our own garbage plan, until the next real one
                plan = None
            if plan is None or stored.seq <= 1:
                break
            latest = latest or plan
            if not latest.ahead or plan.round < latest.round:
                break
            stored = await js.get_msg(subjects.stream(job, "plans"), stored.seq - 1)
        if plan and not plan.final and plan.shards:
            r, owner, size = plan.round, plan.shards[0].worker, plan.shards[0].size
            other = 1 if len(plan.shards) > 1 else 0
            await send(grads, _grad(job, owner, r, other, good, num_samples=size))  # someone else's shard
            await send(grads, _grad(job, owner, r, 0, good, name="weights", num_samples=size))
            await send(grads, _grad(job, owner, r, 0, good.astype(np.float64), num_samples=size))
            await send(grads, _grad(job, owner, r, 0, good[: numel // 2], total=numel, num_samples=size))
            nan = good.copy()
            nan[3] = np.nan  # on the slow worker's shard, still open: refused as non-finite
            slow = plan.shards[-1]
            await send(grads, _grad(job, slow.worker, r, len(plan.shards) - 1, nan, num_samples=slow.size))
        await asyncio.sleep(0.7)
    await bus.close()
    await nc.close()


def test_bad_input_is_refused_and_counted_while_the_run_stays_exact(nats_url, job, tmp_path):
    cluster = Cluster(nats_url, job, tmp_path)
    out = tmp_path / "run"
    try:
        cluster.worker("w0")
        cluster.worker("w1", test_delay=0.4)
        cluster.start("pre", "preprocessor")
        cluster.start(
            "orch",
            "orchestrator",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--seed",
            "3",
            "--out",
            str(out),
        )
        cluster.wait_for_round(1)
        numel = 64 * 128 + 128 + 128 * 10 + 10

        async def attack_until_done() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(_attack(nats_url, job, numel, stop))
            deadline = time.monotonic() + 240
            while cluster.procs["orch"].poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            stop.set()
            await task

        asyncio.run(attack_until_done())
        cluster.wait("orch")
        for name in ("pre", "w0", "w1"):
            assert cluster.wait(name) == 0, cluster.log(name)[-2000:]
    finally:
        cluster.close()
    assert_verified(out)  # what was counted of each round, recomputed: none of the attack
    rejected = metrics(out)["rejected"]
    assert EXPECTED <= set(rejected), f"missing {EXPECTED - set(rejected)}; counted {rejected}"
    assert "rejected (malformed): batch" in cluster.log("w0")
    assert "rejected (malformed): params" in cluster.log("w0")
    assert "rejected (malformed): plan" in cluster.log("pre")


def _intake() -> tuple[GradientIntake, Counter]:
    """The orchestrator's gradient intake alone (no bus, no model): round 3's plan, shard 0 is w0's."""
    refused: Counter = Counter()

    def refuse(reason, detail) -> bool:
        refused[reason] += 1
        return False

    gradients = GradientIntake("j", "none", 1 << 20, refuse)
    gradients.new_round(PLAN3)
    return gradients, refused


PLAN3 = RoundPlan("j", "orchestrator", 3, 0, 3, 4, (Shard("w0", 0, 4),))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=2048))
def test_intake_never_raises_on_arbitrary_bytes(payload):
    """Whatever arrives on the gradient subject, intake answers accepted/refused and counts it."""
    gradients, refused = _intake()
    acc = RoundAccumulator(3, 8, {0: 4})
    accepted = gradients.take(PLAN3, acc, payload, generation=0, members=["w0"])
    assert not accepted and sum(refused.values()) == 1
    assert not acc.complete


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=8, max_size=8),
    round_=st.integers(0, 6),
    sender=st.sampled_from(["w0", "w1", "mallory"]),
)
def test_intake_accepts_exactly_the_valid_chunk(values, round_, sender):
    gradients, refused = _intake()
    acc = RoundAccumulator(3, 8, {0: 4})
    array = np.array(values, np.float32)
    payload = _grad("j", sender, round_, 0, array, num_samples=4)
    accepted = gradients.take(PLAN3, acc, payload, generation=0, members=["w0", "w1"])
    valid = round_ == 3 and sender == "w0" and bool(np.isfinite(array).all())
    assert accepted == valid
    if valid:
        np.testing.assert_allclose(acc.mean(), array, rtol=1e-6)
        assert gradients.counted == {0: {"w0"}}
    else:
        assert sum(refused.values()) == 1
