"""Unit tests of round planning decisions: straggler deadlines and replacement workers."""

from __future__ import annotations

import random
import statistics

import pytest

from pangea.roles.planning import adaptive_deadline, pick_replacements

RNG_SEED = 20240611


# ---------------------------------------------------------------- adaptive_deadline


@pytest.mark.parametrize("recent", [[], ()])
def test_deadline_without_history_is_the_cap(recent):
    assert adaptive_deadline(recent, factor=3.0, floor=1.0, cap=60.0) == 60.0


@pytest.mark.parametrize(
    "recent",
    [[2.0], [1.0, 3.0], [5.0, 1.0, 2.0], [2.0, 2.5, 100.0, 1.5], [1.2, 0.9, 1.1, 1.0, 30.0]],
)
def test_deadline_is_factor_times_median_within_bounds(recent):
    got = adaptive_deadline(recent, factor=3.0, floor=0.5, cap=1000.0)
    assert got == pytest.approx(3.0 * statistics.median(recent))


def test_deadline_uses_the_median_not_the_mean():
    # One slow round (start-up, a hiccup) must not stretch every later deadline.
    recent = [1.0, 1.0, 1.0, 1.0, 50.0]
    assert adaptive_deadline(recent, factor=2.0, floor=0.1, cap=1000.0) == pytest.approx(2.0)


def test_deadline_of_random_histories_matches_reference():
    rng = random.Random(RNG_SEED)
    for _ in range(200):
        recent = [rng.uniform(0.01, 20.0) for _ in range(rng.randint(1, 12))]
        factor, floor = rng.uniform(1.0, 5.0), rng.uniform(0.0, 5.0)
        cap = floor + rng.uniform(0.0, 60.0)
        expected = min(cap, max(floor, factor * statistics.median(recent)))
        got = adaptive_deadline(recent, factor, floor, cap)
        assert got == pytest.approx(expected)
        assert floor <= got <= cap


def test_deadline_clamps_at_the_floor():
    assert adaptive_deadline([0.01, 0.02, 0.03], factor=3.0, floor=5.0, cap=60.0) == 5.0


def test_deadline_clamps_at_the_cap():
    assert adaptive_deadline([40.0, 50.0, 45.0], factor=3.0, floor=5.0, cap=60.0) == 60.0


def test_deadline_at_the_bounds_exactly():
    assert adaptive_deadline([2.0], factor=2.5, floor=5.0, cap=60.0) == 5.0
    assert adaptive_deadline([24.0], factor=2.5, floor=5.0, cap=60.0) == 60.0


# ---------------------------------------------------------------- pick_replacements


def test_replacement_prefers_an_idle_worker():
    # w3 sorts last by name; it is chosen because it is idle.
    choice = pick_replacements({0: "w1"}, live=["w1", "w2", "w3"], idle=["w3"], tried={0: {"w1"}})
    assert choice == {0: "w3"}


def test_replacement_falls_back_to_a_busy_live_worker():
    choice = pick_replacements({0: "w1"}, live=["w1", "w2"], idle=[], tried={0: {"w1"}})
    assert choice == {0: "w2"}


def test_idle_worker_that_is_not_live_is_never_chosen():
    choice = pick_replacements({0: "w1"}, live=["w1", "w2"], idle=["gone"], tried={0: {"w1"}})
    assert choice == {0: "w2"}


def test_replacement_never_one_that_already_had_the_shard():
    live = ["w1", "w2", "w3", "w4"]
    tried = {0: {"w1", "w3"}, 1: {"w2"}, 2: {"w4", "w2", "w3"}}
    shards = {0: "w3", 1: "w2", 2: "w4"}
    for idle in ([], ["w1"], ["w3"], live):
        choice = pick_replacements(shards, live, idle, tried)
        assert set(choice) == {0, 1, 2}
        for shard, worker in choice.items():
            assert worker in live
            assert worker not in tried[shard]


def test_shards_spread_round_robin_over_candidates():
    shards = {s: "dead" for s in range(6)}
    tried = {s: {"dead"} for s in shards}
    choice = pick_replacements(shards, live=["w1", "w2", "w3"], idle=[], tried=tried)
    assert set(choice) == set(shards)
    loads = [list(choice.values()).count(w) for w in ("w1", "w2", "w3")]
    assert loads == [2, 2, 2]
    assert [choice[s] for s in sorted(choice)] == ["w1", "w2", "w3", "w1", "w2", "w3"]


def test_spreading_over_idle_workers_first():
    shards = {s: "dead" for s in range(4)}
    tried = {s: {"dead"} for s in shards}
    choice = pick_replacements(shards, live=["a", "b", "c", "d"], idle=["c", "d"], tried=tried)
    assert sorted(choice.values()) == ["c", "c", "d", "d"]


def test_more_shards_than_workers_never_pile_on_one():
    rng = random.Random(RNG_SEED)
    live = [f"w{i}" for i in range(5)]
    shards = {s: rng.choice(live) for s in range(23)}
    tried = {s: {w} for s, w in shards.items()}
    choice = pick_replacements(shards, live, idle=[], tried=tried)
    assert set(choice) == set(shards)
    loads = [list(choice.values()).count(w) for w in live]
    assert max(loads) - min(loads) <= 1


def test_shard_without_candidate_is_left_out():
    shards = {0: "w1", 1: "w2", 2: "w1"}
    tried = {0: {"w1", "w2"}, 1: {"w2"}, 2: {"w1"}}
    choice = pick_replacements(shards, live=["w1", "w2"], idle=[], tried=tried)
    assert choice == {1: "w1", 2: "w2"}


def test_no_live_workers_means_no_replacements():
    assert pick_replacements({0: "w1", 1: "w2"}, live=[], idle=[], tried={}) == {}


def test_shard_missing_from_tried_may_go_to_anyone():
    choice = pick_replacements({4: "w1"}, live=["w1"], idle=[], tried={})
    assert choice == {4: "w1"}


def test_pick_replacements_is_deterministic_and_ignores_input_order():
    rng = random.Random(RNG_SEED)
    live = [f"w{i}" for i in range(7)]
    shards = {s: rng.choice(live) for s in range(15)}
    tried = {s: set(rng.sample(live, rng.randint(1, 6))) for s in shards}
    idle = rng.sample(live, 3)
    first = pick_replacements(shards, live, idle, tried)
    assert pick_replacements(shards, live, idle, tried) == first
    # Shuffled inputs (dict order, live order, idle order) give the same answer.
    reordered = dict(sorted(shards.items(), reverse=True))
    assert pick_replacements(reordered, list(reversed(live)), sorted(idle), tried) == first


def test_pick_replacements_does_not_mutate_its_inputs():
    shards, live, idle, tried = {0: "w1", 1: "w2"}, ["w1", "w2", "w3"], ["w3"], {0: {"w1"}, 1: {"w2"}}
    pick_replacements(shards, live, idle, tried)
    assert shards == {0: "w1", 1: "w2"}
    assert live == ["w1", "w2", "w3"] and idle == ["w3"]
    assert tried == {0: {"w1"}, 1: {"w2"}}
