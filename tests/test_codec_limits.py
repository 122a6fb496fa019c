"""The codec refuses hostile bytes cheaply and accepts any bytes-like payload."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pangea.wire import codec
from pangea.wire import messages as m
from pangea.wire.capnp_spans import list_data_spans

HUGE = 20_000_000


def _plan(shards: int = 1) -> m.RoundPlan:
    return m.RoundPlan(
        job="job-a",
        sender="orchestrator",
        round=7,
        epoch=0,
        step=3,
        batch_size=4 * shards,
        shards=tuple(m.Shard(f"w{i}", 4 * i, 4 * i + 4) for i in range(shards)),
        reissue=(0,),
    )


# ---------------------------------------------------------------- crafting bytes
#
# Just enough of the Cap'n Proto encoding to find one pointer: a single-segment message is
# a segment table, then words; word 0 is the root struct pointer.  A pointer's low 2 bits
# are its kind, bits 2..31 a signed word offset from the end of the pointer.  A struct
# pointer's upper half is (data words, pointer words); a composite list's elements are
# preceded by a tag word shaped like a struct pointer whose offset field is the element count.


def _segment_start(raw: bytes) -> int:
    count = struct.unpack_from("<I", raw, 0)[0] + 1
    assert count == 1, "the crafted messages are single-segment"
    return 8


def _word(raw: bytes, base: int, index: int) -> int:
    return struct.unpack_from("<Q", raw, base + 8 * index)[0]


def _offset(pointer: int) -> int:
    value = (pointer >> 2) & 0x3FFF_FFFF
    return value - (1 << 30) if value & (1 << 29) else value


def _tag_index(raw: bytes, field: int) -> int:
    """Word index (in the segment) of the tag word of the composite list that the root struct's
    pointer `field` points to."""
    base = _segment_start(raw)
    root = _word(raw, base, 0)
    assert root & 3 == 0, "root is a struct pointer"
    data_words = (root >> 32) & 0xFFFF
    list_index = 1 + _offset(root) + data_words + field
    pointer = _word(raw, base, list_index)
    assert pointer & 3 == 1 and (pointer >> 32) & 7 == 7, "a composite list"
    return list_index + 1 + _offset(pointer)


def _shards_tag_index(raw: bytes) -> int:
    """Word index of the tag word of the root RoundPlan's `shards` list."""
    return _tag_index(raw, 1)  # pointer section: header @0, shards @1, reissue @2


def _with_tag(raw: bytes, index: int, count: int, data_words: int, pointer_words: int) -> bytes:
    patched = bytearray(raw)
    tag = (count << 2) | (data_words << 32) | (pointer_words << 48)
    struct.pack_into("<Q", patched, _segment_start(raw) + 8 * index, tag)
    return bytes(patched)


def _with_shards_tag(raw: bytes, count: int, data_words: int, pointer_words: int) -> bytes:
    return _with_tag(raw, _shards_tag_index(raw), count, data_words, pointer_words)


def test_crafting_helper_finds_the_shards_tag():
    # Guards the helpers themselves: an unchanged tag written back decodes to the same plan,
    # and the tag read back says one Shard struct of 1 data word and 1 pointer.
    raw = codec.encode(_plan())
    tag = _word(raw, _segment_start(raw), _shards_tag_index(raw))
    assert (_offset(tag), (tag >> 32) & 0xFFFF, tag >> 48) == (1, 1, 1)
    assert codec.decode(_with_shards_tag(raw, 1, 1, 1), m.RoundPlan) == _plan()
    # Two elements of zero size still fit the word count: the patch is understood as meant.
    zero_size = codec.decode(_with_shards_tag(raw, 2, 0, 0), m.RoundPlan)
    assert zero_size.shards == (m.Shard("", 0, 0), m.Shard("", 0, 0))


def _refused(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(payload, m.RoundPlan)


# Unguarded, these take minutes and gigabytes: the timeout marks a hang as a failure.
@pytest.mark.timeout(60)
def test_zero_size_elements_claiming_a_huge_list_are_refused():
    # Amplification: 20 million zero-size structs take no bytes, so only the traversal limit
    # stops a 150-byte message from making the decoder build 20 million Shards.
    payload = _with_shards_tag(codec.encode(_plan()), HUGE, 0, 0)
    assert len(payload) < 200
    _refused(payload)


@pytest.mark.timeout(60)
def test_elements_overrunning_the_list_are_refused():
    _refused(_with_shards_tag(codec.encode(_plan()), HUGE, 1, 1))


def test_a_large_honest_list_still_decodes():
    # The traversal limit grows with the payload: a real message never hits it.
    plan = _plan(100_000)
    back = codec.decode(codec.encode(plan), m.RoundPlan)
    assert len(back.shards) == 100_000
    assert back == plan


# A Batch's `extra` tensors are found by capnp_spans' own walk of the list, so the same claims
# are refused there too, before a Tensor is built.


def _batch_with_extra() -> m.Batch:
    def tensor(name: str) -> m.Tensor:
        return m.Tensor.from_numpy(np.zeros((2, 3), np.float32), name)

    return m.Batch(
        job="job-a",
        sender="preprocessor",
        round=7,
        epoch=0,
        step=3,
        worker="w0",
        shard=0,
        start=0,
        stop=2,
        x=tensor("x"),
        y=tensor("y"),
        extra=(tensor("mask"),),
    )


def _with_extra_tag(count: int, data_words: int, pointer_words: int) -> bytes:
    raw = codec.encode(_batch_with_extra())
    index = _tag_index(raw, codec._list_path("Batch", "extra")[0][0])
    return _with_tag(raw, index, count, data_words, pointer_words)


def test_crafting_helper_finds_the_extra_tag():
    # A Tensor struct: 1 data word (dtype), 3 pointers (shape, data, name); written back as is.
    assert codec.decode(_with_extra_tag(1, 1, 3), m.Batch) == _batch_with_extra()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [(0, 0), (1, 3)], ids=["zero-size", "overrunning"])
def test_extra_tensors_claiming_a_huge_list_are_refused(sizes):
    payload = _with_extra_tag(HUGE, *sizes)
    with pytest.raises(codec.CodecError):
        codec.decode(payload, m.Batch)
    with pytest.raises(ValueError, match="does not fit"):
        list_data_spans(payload, *codec._list_path("Batch", "extra"))


# ---------------------------------------------------------------- bytes-like payloads


def _gradient() -> m.Gradient:
    values = np.arange(33, dtype=np.float32) / 7
    return m.Gradient(
        job="job-a",
        sender="w1",
        round=9,
        shard=3,
        num_samples=21,
        loss=0.5,
        params_version=2,
        chunk=m.Chunk(index=0, count=1, offset=0, total=33),
        values=m.Tensor.from_numpy(values, "g"),
    )


@pytest.mark.parametrize("wrap", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_decode_plan_from_bytes_like_payload(wrap):
    assert codec.decode(wrap(codec.encode(_plan(3))), m.RoundPlan) == _plan(3)


@pytest.mark.parametrize("wrap", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_decode_tensor_from_bytes_like_payload(wrap):
    grad = _gradient()
    back = codec.decode(wrap(codec.encode(grad)), m.Gradient)
    np.testing.assert_array_equal(back.values.numpy(), grad.values.numpy())
    assert back.chunk == grad.chunk and back.loss == grad.loss


def test_decode_from_memoryview_slice_of_a_larger_buffer():
    # A message received inside a bigger buffer (e.g. after a frame header), 8-byte aligned.
    payload = codec.encode(_gradient())
    buffer = bytearray(16) + bytearray(payload) + bytearray(8)
    back = codec.decode(memoryview(buffer)[16 : 16 + len(payload)], m.Gradient)
    np.testing.assert_array_equal(back.values.numpy(), _gradient().values.numpy())


def test_tensor_decoded_from_bytearray_is_a_view_that_keeps_it_alive():
    payload = bytearray(codec.encode(_gradient()))
    back = codec.decode(payload, m.Gradient)
    # Zero-copy: a change to the received buffer shows through the decoded tensor ...
    where = bytes(payload).find(np.float32(1 / 7).tobytes())
    assert where > 0
    payload[where : where + 4] = np.float32(99.0).tobytes()
    assert back.values.numpy()[1] == 99.0
    # ... and the tensor holds the buffer itself, so dropping the caller's reference is safe.
    assert back.values.data.obj is payload


def test_decode_from_unaligned_memoryview():
    # A well-formed message that happens to start at an odd address is still well-formed.
    payload = codec.encode(_gradient())
    buffer = bytearray(1) + bytearray(payload)
    back = codec.decode(memoryview(buffer)[1:], m.Gradient)
    np.testing.assert_array_equal(back.values.numpy(), _gradient().values.numpy())
