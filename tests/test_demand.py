"""The autoscaling signal's rule, on measured-looking speeds: grow while it pays, back off when not."""

from __future__ import annotations

from pangea.roles.demand import Demand


def _drive(demand: Demand, speed, rounds: int) -> list[int]:
    """Run `rounds` rounds whose membership follows the signal at once; samples/s = speed(K)."""
    seen = []
    k = demand.decision.desired
    for r in range(rounds):
        demand.observe(r, k, 64, 64 / speed(k))
        k = demand.decision.desired
        seen.append(k)
    return seen


def test_workers_are_added_while_each_pays_and_the_signal_stops_where_it_stops_paying():
    # Linear to 4 workers, then flat: 5 brings nothing, so the signal settles back at 4.
    demand = Demand(1, 1, 8, settle=3, cooldown=1000)
    seen = _drive(demand, lambda k: 100.0 * min(k, 4), 60)
    assert max(seen) == 5 and seen[-1] == 4 and seen[-20:] == [4] * 20
    assert "back to 4" in demand.decision.why or "holding at 4" in demand.decision.why


def test_when_more_workers_do_not_help_it_stays_at_the_minimum():
    demand = Demand(1, 1, 8, settle=3, cooldown=1000)
    seen = _drive(demand, lambda k: 100.0 / k**0.1, 40)  # latency-bound: a second worker slows it
    assert max(seen) == 2 and seen[-1] == 1


def test_the_signal_never_leaves_its_bounds_and_is_zero_when_the_job_is_done():
    demand = Demand(2, 2, 3, settle=2)
    seen = _drive(demand, lambda k: 100.0 * k, 30)  # would grow for ever
    assert set(seen) <= {2, 3} and seen[-1] == 3 and "max-workers" in demand.decision.why
    assert Demand(5, 1, 3).decision.desired == 3  # a start beyond the bounds is clamped
    assert demand.finished().desired == 0


def test_after_backing_off_it_probes_again_only_after_the_cooldown():
    demand = Demand(1, 1, 4, settle=2, cooldown=10)
    seen = _drive(demand, lambda k: 100.0 if k == 1 else 105.0, 40)
    ups = [r for r in range(1, len(seen)) if seen[r] > seen[r - 1]]
    assert len(ups) >= 2 and all(b - a > 10 for a, b in zip(ups, ups[1:]))


def test_while_membership_lags_the_signal_waits_and_says_so():
    demand = Demand(1, 1, 4, settle=2)
    for r in range(3):
        demand.observe(r, 1, 64, 0.5)
    assert demand.decision.desired == 2
    demand.observe(3, 1, 64, 0.5)  # the second worker has not joined yet
    assert demand.decision.desired == 2 and "waiting for 2 workers (1 present)" in demand.decision.why
