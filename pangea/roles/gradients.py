"""The orchestrator's gradient intake for the round in hand: which worker each shard was given,
what arrived from whom, and every chunk checked, counted or refused.  One part of the
orchestrator, buildable alone (a test gives it bytes and a `RoundAccumulator`, no bus, no model).
The reducer takes its chunks through it too, and the async trainer decodes with it.
"""

from __future__ import annotations

from collections.abc import Callable

from pangea.errors import Reason, Rejected
from pangea.roles import intake
from pangea.train.aggregate import RoundAccumulator
from pangea.wire import codec
from pangea.wire.messages import Gradient, RoundPlan

Refuse = Callable[[Reason, str], bool]


class GradientIntake:
    """Checks each gradient chunk against the round's plan and adds the good ones to its sum."""

    def __init__(self, job: str, compression: str, max_payload: int, refuse: Refuse) -> None:
        self.job, self.compression, self.max_payload, self._refuse = job, compression, max_payload, refuse
        self.assigned: dict[int, set[str]] = {}  # shard -> every worker it was given this round
        self.late: set[tuple[int, int]] = set()  # (round, shard) re-issued or dropped: late copies expected
        self.non_finite: dict[int, set[str]] = {}  # shard -> senders of NaN/Inf gradients this round
        self.counted: dict[int, set[str]] = {}  # shard -> senders whose chunks were counted this round

    def new_round(self, plan: RoundPlan) -> None:
        self.assigned = {i: {s.worker} for i, s in enumerate(plan.shards)}
        self.non_finite, self.counted = {}, {}

    def give(self, shard: int, worker: str) -> None:
        """`shard` is given to `worker` too (a re-issue): its chunks are now welcome, and a late
        copy from the first owner is expected."""
        self.assigned[shard].add(worker)

    def decode(self, payload: bytes) -> Gradient | None:
        """The chunk's message, or None when it is oversized or malformed (refused and counted)."""
        if len(payload) > self.max_payload:
            self._refuse(Reason.OVERSIZED, f"{len(payload)} bytes on the gradient subject")
            return None
        try:
            return codec.decode(payload, Gradient)
        except codec.CodecError as exc:
            self._refuse(exc.reason, str(exc))
            return None

    def add(self, plan: RoundPlan, acc: RoundAccumulator, grad: Gradient, *, generation: int, members) -> bool:
        """Check a decoded chunk against the round and add it to `acc`; False when refused.

        Checked in order: kind, job, generation, sender, round, shard ownership, parameter
        version, tensor name/dtype/shape, finiteness, duplicates.
        """
        try:
            intake.check(
                grad, plan, job=self.job, generation=generation, compression=self.compression,
                assigned=self.assigned, members=members, late=self.late,
            )  # fmt: skip
            acc.add(grad.shard, grad.num_samples, grad.loss, grad.chunk, intake.values(grad), grad.count)
        except Rejected as exc:
            if exc.reason == Reason.NON_FINITE:
                self.non_finite.setdefault(grad.shard, set()).add(grad.sender)
            return self.refuse(grad, exc)
        self.counted.setdefault(grad.shard, set()).add(grad.sender)
        return True

    def refuse(self, grad: Gradient, exc: Rejected) -> bool:
        """Count a refused chunk (a re-issued shard's second copy as expected, not as a duplicate)."""
        reason = exc.reason
        if reason == Reason.DUPLICATE and (grad.round, grad.shard) in self.late:
            reason = Reason.STRAGGLER_LATE
        return self._refuse(reason, f"from {grad.sender!r}: {exc.detail}")

    def take(self, plan: RoundPlan, acc: RoundAccumulator, payload: bytes, *, generation: int, members) -> bool:
        """Size, decode, check and add one chunk: True when it was counted."""
        grad = self.decode(payload)
        return grad is not None and self.add(plan, acc, grad, generation=generation, members=members)
