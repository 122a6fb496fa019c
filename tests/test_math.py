"""Unit tests of the averaging and chunking math on plain arrays: no bus, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from pangea.errors import Rejected
from pangea.train import aggregate
from pangea.train.aggregate import RoundAccumulator, split_batch
from pangea.wire import chunking
from pangea.wire.messages import Chunk

SEED = 7


# ---------------------------------------------------------------- RoundAccumulator


def _shard_gradients(rng, numel: int, sizes: dict[int, int]) -> dict[int, np.ndarray]:
    return {s: rng.standard_normal(numel).astype(np.float32) for s in sizes}


def _chunks(grad: np.ndarray, max_bytes: int) -> list[tuple[Chunk, np.ndarray]]:
    return list(chunking.split(grad, max_bytes))


def _feed_all(acc, grads, losses, sizes, rng, max_bytes_of=lambda shard: 40):
    """Every chunk of every shard, interleaved in random order."""
    items = [
        (shard, chunk, values) for shard, grad in grads.items() for chunk, values in _chunks(grad, max_bytes_of(shard))
    ]
    for i in rng.permutation(len(items)):
        shard, chunk, values = items[i]
        acc.add(shard, sizes[shard], losses[shard], chunk, values)


@pytest.mark.parametrize("trial", range(5))
def test_mean_is_the_sample_weighted_mean_in_any_order(trial):
    rng = np.random.default_rng([SEED, trial])
    numel = int(rng.integers(1, 200))
    sizes = {s: int(rng.integers(1, 50)) for s in range(int(rng.integers(1, 7)))}
    grads = _shard_gradients(rng, numel, sizes)
    losses = {s: float(rng.uniform(0, 3)) for s in sizes}
    acc = RoundAccumulator(3, numel, sizes)
    # Each shard cuts its vector with its own chunk size: counts differ between shards.
    _feed_all(acc, grads, losses, sizes, rng, max_bytes_of=lambda shard: 4 * (5 + 7 * shard))
    assert acc.complete and acc.missing() == []
    expected = np.average(np.stack([grads[s] for s in sizes]), axis=0, weights=list(sizes.values()))
    mean = acc.mean()
    assert mean.dtype == np.float32 and mean.shape == (numel,)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-6)
    assert acc.loss() == pytest.approx(np.average(list(losses.values()), weights=list(sizes.values())), abs=1e-12)


@pytest.mark.parametrize("numel", [1, 2, 3, 7, 8, 9, 64, 65])
def test_the_mean_is_the_float64_sum_cast_once_in_its_own_memory(monkeypatch, numel):
    """mean() converts to float32 inside the sum's memory, a block at a time (blocks of 4 here, so
    every boundary case of the overlap is crossed): bit for bit `(sum / n).astype(float32)`."""
    monkeypatch.setattr(aggregate, "_DOWNCAST_ELEMENTS", 4)
    rng = np.random.default_rng([SEED, numel])
    sizes = {0: 3, 1: 5, 2: 2}
    grads = _shard_gradients(rng, numel, sizes)
    acc = RoundAccumulator(0, numel, sizes)
    for s, g in grads.items():
        acc.add(s, sizes[s], 1.0, Chunk(0, 1, 0, numel), g)
    expected = (sum(grads[s].astype(np.float64) * sizes[s] for s in sizes) / 10).astype(np.float32)
    mean = acc.mean()
    assert mean.dtype == np.float32 and mean.shape == (numel,) and mean.flags.c_contiguous and mean.flags.writeable
    assert np.array_equal(mean, expected)
    assert mean.base is not None and mean.base.nbytes == 8 * ((numel + 1) // 2)  # the float32 half only
    with pytest.raises(RuntimeError, match="already taken"):
        acc.mean()


def test_equal_sizes_give_the_plain_mean():
    rng = np.random.default_rng(SEED)
    sizes = {0: 4, 1: 4, 2: 4}
    grads = _shard_gradients(rng, 50, sizes)
    acc = RoundAccumulator(0, 50, sizes)
    _feed_all(acc, grads, {s: 1.0 for s in sizes}, sizes, rng)
    np.testing.assert_allclose(acc.mean(), np.mean([grads[s] for s in sizes], axis=0), atol=1e-6)


def _setup(numel=30, sizes=None):
    sizes = sizes or {0: 5, 1: 3}
    rng = np.random.default_rng(SEED)
    grads = _shard_gradients(rng, numel, sizes)
    return RoundAccumulator(1, numel, sizes), grads, sizes, rng


def _reason(call) -> str:
    with pytest.raises(Rejected) as info:
        call()
    assert info.value.reason in str(info.value)
    return info.value.reason


def test_duplicate_chunk_is_rejected_and_not_counted_twice():
    acc, grads, sizes, rng = _setup()
    chunk, values = _chunks(grads[0], 40)[0]
    acc.add(0, 5, 0.5, chunk, values)
    assert _reason(lambda: acc.add(0, 5, 0.5, chunk, values)) == "duplicate"
    _feed_rest(acc, grads, sizes, skip={(0, chunk.index)})
    expected = np.average(np.stack([grads[0], grads[1]]), axis=0, weights=[5, 3])
    np.testing.assert_allclose(acc.mean(), expected, atol=1e-6)


def _feed_rest(acc, grads, sizes, skip=frozenset(), loss=0.5):
    for shard, grad in grads.items():
        for chunk, values in _chunks(grad, 40):
            if (shard, chunk.index) not in skip:
                acc.add(shard, sizes[shard], loss, chunk, values)


def test_unknown_shard_is_rejected():
    acc, grads, _, _ = _setup()
    chunk, values = _chunks(grads[0], 40)[0]
    assert _reason(lambda: acc.add(9, 5, 0.5, chunk, values)) == "unknown_shard"


def test_wrong_sample_count_is_rejected():
    acc, grads, _, _ = _setup()
    chunk, values = _chunks(grads[0], 40)[0]
    assert _reason(lambda: acc.add(0, 4, 0.5, chunk, values)) == "wrong_samples"


@pytest.mark.parametrize(
    "poison",
    ["nan_value", "inf_value", "nan_loss", "inf_loss"],
)
def test_non_finite_contribution_is_rejected_and_leaves_the_mean_clean(poison):
    acc, grads, sizes, _ = _setup()
    chunk, values = _chunks(grads[0], 40)[0]
    bad, loss = values.copy(), 0.5
    if poison == "nan_value":
        bad[0] = np.nan
    elif poison == "inf_value":
        bad[-1] = np.inf
    elif poison == "nan_loss":
        loss = float("nan")
    else:
        loss = float("-inf")
    assert _reason(lambda: acc.add(0, 5, loss, chunk, bad)) == "non_finite"
    assert 0 in acc.missing()
    _feed_rest(acc, grads, sizes)
    expected = np.average(np.stack([grads[0], grads[1]]), axis=0, weights=[5, 3])
    np.testing.assert_allclose(acc.mean(), expected, atol=1e-6)
    assert np.isfinite(acc.loss())


def test_wrong_chunk_geometry_is_rejected():
    acc, grads, _, _ = _setup(numel=30)
    chunk, values = _chunks(grads[0], 40)[1]  # 30 floats in 3 chunks of 10
    cases = {
        "offset": (Chunk(chunk.index, chunk.count, chunk.offset + 1, chunk.total), values),
        "total": (Chunk(chunk.index, chunk.count, chunk.offset, chunk.total + 1), values),
        "size": (chunk, values[:-1]),
        "index": (Chunk(chunk.count, chunk.count, chunk.offset, chunk.total), values),
        "count": (Chunk(0, 0, 0, chunk.total), values),
        "2-d": (chunk, values.reshape(2, -1)),
    }
    for name, (bad_chunk, bad_values) in cases.items():
        assert _reason(lambda c=bad_chunk, v=bad_values: acc.add(0, 5, 0.5, c, v)) == "wrong_shape", name
    assert acc.missing() == [0, 1]


def test_changing_chunk_count_within_a_shard_is_rejected():
    acc, grads, _, _ = _setup(numel=30)
    first, values = _chunks(grads[0], 40)[0]  # count 3
    acc.add(0, 5, 0.5, first, values)
    other, other_values = _chunks(grads[0], 80)[1]  # count 2: a valid slice, but of another cut
    assert other.count != first.count
    assert _reason(lambda: acc.add(0, 5, 0.5, other, other_values)) == "wrong_shape"


def test_a_refused_chunk_leaves_no_trace():
    acc, grads, sizes, _ = _setup(numel=30)
    chunk, values = _chunks(grads[0], 80)[0]  # a valid slice of a 2-chunk cut
    bad = values.copy()
    bad[0] = np.nan
    assert _reason(lambda: acc.add(0, 5, 0.5, chunk, bad)) == "non_finite"
    _feed_rest(acc, grads, sizes)  # the shard resent whole, in a 3-chunk cut
    assert acc.complete


def test_mean_before_complete_raises_and_missing_lists_incomplete_shards():
    acc, grads, sizes, _ = _setup(sizes={0: 2, 1: 3, 2: 4})
    assert acc.missing() == [0, 1, 2]
    assert not acc.complete
    chunks0 = _chunks(grads[0], 40)
    for chunk, values in chunks0:
        acc.add(0, 2, 0.1, chunk, values)
    chunk, values = _chunks(grads[2], 40)[0]
    acc.add(2, 4, 0.1, chunk, values)
    assert acc.missing() == [1, 2]
    with pytest.raises(RuntimeError, match=r"\[1, 2\]"):
        acc.mean()


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("total", [0, 1, 2, 9, 10, 11, 100, 1023])
@pytest.mark.parametrize("max_bytes", [4, 12, 40, 400, 1 << 20])
def test_split_covers_the_vector_with_chunks_under_the_limit(total, max_bytes):
    flat = np.arange(total, dtype=np.float32)
    pieces = list(chunking.split(flat, max_bytes))
    count = len(pieces)
    assert count == chunking.chunk_count(total, flat.itemsize, max_bytes)
    offset = 0
    for index, (chunk, values) in enumerate(pieces):
        assert chunk == Chunk(index, count, offset, total)
        assert values.nbytes <= max_bytes
        assert chunking.check(chunk, values.shape[0], total) is None
        assert np.shares_memory(values, flat) or values.size == 0
        offset += values.shape[0]
    assert offset == total
    np.testing.assert_array_equal(np.concatenate([v for _, v in pieces]), flat)
    # No more chunks than needed: one fewer would overflow the limit.
    if count > 1:
        assert -(-total // (count - 1)) * flat.itemsize > max_bytes


@pytest.mark.parametrize("total", range(0, 40))
@pytest.mark.parametrize("count", range(1, 9))
def test_bounds_are_contiguous_and_balanced(total, count):
    spans = [chunking.bounds(total, count, i) for i in range(count)]
    assert spans[0][0] == 0 and spans[-1][1] == total
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop == start
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1


def test_check_refuses_chunks_that_are_not_their_slice():
    total, count = 25, 4
    for index in range(count):
        start, stop = chunking.bounds(total, count, index)
        good = Chunk(index, count, start, total)
        assert chunking.check(good, stop - start, total) is None
        assert chunking.check(Chunk(index, count, start + 1, total), stop - start, total)
        assert chunking.check(good, stop - start + 1, total)
        assert chunking.check(good, stop - start, total + 1)
    assert chunking.check(Chunk(count, count, 0, total), 6, total)
    assert chunking.check(Chunk(-1, count, 0, total), 6, total)
    assert chunking.check(Chunk(0, 0, 0, total), 6, total)
    assert chunking.check(Chunk(0, total + 1, 0, total), 1, total)


def _versioned(flat, max_bytes):
    return list(chunking.split(flat, max_bytes))


def test_assembler_reassembles_in_any_order():
    rng = np.random.default_rng(SEED)
    flat = rng.standard_normal(103).astype(np.float32)
    pieces = _versioned(flat, 40)
    asm = chunking.Assembler(flat.size)
    assert not asm.complete
    for i in rng.permutation(len(pieces)):
        assert not asm.complete
        asm.add(5, *pieces[i])
    assert asm.complete and asm.version == 5
    np.testing.assert_array_equal(asm.buffer, flat)


def test_assembler_ignores_a_repeated_chunk():
    flat = np.arange(30, dtype=np.float32)
    pieces = _versioned(flat, 40)
    asm = chunking.Assembler(30)
    asm.add(1, *pieces[0])
    asm.add(1, *pieces[0])
    assert not asm.complete
    for piece in pieces[1:]:
        asm.add(1, *piece)
    assert asm.complete


def test_newer_version_discards_an_unfinished_older_one():
    old = np.full(30, -1, dtype=np.float32)
    new = np.arange(30, dtype=np.float32)
    old_pieces, new_pieces = _versioned(old, 40), _versioned(new, 40)
    asm = chunking.Assembler(30)
    asm.add(1, *old_pieces[0])
    asm.add(1, *old_pieces[1])
    asm.add(2, *new_pieces[2])
    # Had the old chunks been kept, chunks 0, 1, 2 would look complete.
    assert not asm.complete and asm.version == 2
    asm.add(2, *new_pieces[0])
    assert not asm.complete
    asm.add(2, *new_pieces[1])
    assert asm.complete
    np.testing.assert_array_equal(asm.buffer, new)


def test_assembler_refuses_foreign_chunks():
    asm = chunking.Assembler(30)
    values = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        asm.add(1, Chunk(0, 3, 1, 30), values)
    with pytest.raises(ValueError):
        asm.add(1, Chunk(0, 3, 0, 31), values)
    asm.add(1, Chunk(0, 3, 0, 30), values)
    with pytest.raises(ValueError):
        asm.add(1, Chunk(1, 2, 15, 30), np.zeros(15, np.float32))
    assert not asm.complete


# ---------------------------------------------------------------- split_batch


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 8, 64, 65])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 8, 100])
def test_split_batch_is_contiguous_and_balanced(batch_size, num_workers):
    workers = [f"w{i}" for i in range(num_workers)]
    shards = split_batch(batch_size, workers)
    assert len(shards) == min(num_workers, batch_size)
    assert [w for w, _, _ in shards] == workers[: len(shards)]
    assert shards[0][1] == 0 and shards[-1][2] == batch_size
    for (_, _, stop), (_, start, _) in zip(shards, shards[1:]):
        assert stop == start
    sizes = [b - a for _, a, b in shards]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    covered = np.concatenate([np.arange(a, b) for _, a, b in shards])
    np.testing.assert_array_equal(covered, np.arange(batch_size))


def test_split_batch_workers_beyond_the_batch_get_nothing():
    shards = split_batch(3, ["a", "b", "c", "d", "e"])
    assert [w for w, _, _ in shards] == ["a", "b", "c"]
    assert [(a, b) for _, a, b in shards] == [(0, 1), (1, 2), (2, 3)]
