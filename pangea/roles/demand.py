"""How many workers a job should have, from what its rounds measured: the autoscaling signal.

The orchestrator is the only role that sees both the work left and the speed, so it decides;
autoscalers (KEDA through `/metrics`, `pangea status`) only read the number.  The rule, pure:

- before round 0 the job wants the workers it waits for (`--workers`); finished, it wants 0;
- once `settle` rounds ran at the desired count K, compare K's samples/s with K-1's: if the
  last worker added at least `efficiency` of what one worker gave at K-1 (linear scaling
  would add all of it), ask for K+1 (up to `--max-workers`); if not, step back to K-1 and
  hold there for `cooldown` rounds before probing up again (hysteresis: no flapping);
- never outside [`--min-workers`, `--max-workers`].

What it does not capture (Pollux, OSDI'21, scales on goodput): that a larger K changes the
statistical efficiency of a step (here the global batch is fixed, so it does not), the cost
of a worker, or other jobs competing for the same machines; samples/s of a round include its
waits, so a slow network and a slow worker look alike.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    desired: int
    why: str


class Demand:
    """Desired worker count of one job, updated once per round from that round's speed."""

    def __init__(
        self, start: int, minimum: int, maximum: int, *, efficiency: float = 0.7, settle: int = 5, cooldown: int = 50
    ) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.efficiency, self.settle, self.cooldown = efficiency, settle, cooldown
        self.rates: dict[int, deque[float]] = {}  # K -> samples/s of the last `settle` rounds on K workers
        self.held_until = -1  # no probing up before this round
        self.decision = Decision(min(max(start, minimum), maximum), f"waiting for the first {start} workers")
        self.published: Decision | None = None  # the last decision made known (see `news`)

    def rate(self, k: int) -> float | None:
        seen = self.rates.get(k, ())
        return statistics.median(seen) if len(seen) >= self.settle else None

    def observe(self, round_: int, workers: int, samples: int, seconds: float) -> Decision:
        """A round of `samples` on `workers` took `seconds` (evaluations not included)."""
        if seconds > 0 and workers > 0:
            self.rates.setdefault(workers, deque(maxlen=self.settle)).append(samples / seconds)
        k = self.decision.desired
        here = self.rate(k) if workers == k else None
        if here is None:
            why = f"measuring {k} workers" if workers == k else f"waiting for {k} workers ({workers} present)"
            self.decision = Decision(k, why)
            return self.decision
        below = self.rate(k - 1) if k - 1 >= 1 else None
        if below is not None and k > self.minimum:
            gain = (here - below) / (below / (k - 1))  # of one worker's share at k-1
            if gain < self.efficiency:
                self.held_until = round_ + self.cooldown
                self.decision = Decision(
                    k - 1,
                    f"worker {k} added {gain:.2f} of a worker's samples/s at {k - 1} "
                    f"(< {self.efficiency:g}): back to {k - 1}",
                )
                return self.decision
        if round_ < self.held_until:
            self.decision = Decision(k, f"holding at {k} workers until round {self.held_until}")
        elif k < self.maximum:
            self.rates.pop(k + 1, None)  # measured afresh
            self.decision = Decision(k + 1, f"{k} workers give {here:,.0f} samples/s: trying {k + 1}")
        else:
            self.decision = Decision(k, f"at --max-workers {self.maximum}")
        return self.decision

    def news(self) -> Decision | None:
        """The decision, if it changed since the last call (to publish it only then)."""
        if self.decision == self.published:
            return None
        self.published = self.decision
        return self.decision

    def finished(self) -> Decision:
        self.decision = Decision(0, "the job is finished")
        return self.decision
