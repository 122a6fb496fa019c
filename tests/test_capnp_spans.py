"""The Data-field pointer walk (pangea.wire.capnp_spans) against pycapnp's own reading of the same
bytes, on messages pycapnp lays out itself (several segments, far pointers), for single Tensor
fields and for a list of them (a Batch's extras), plus the property that decoding keeps no
reference to the payload (the pycapnp 2.2.4 leak it avoids)."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pangea.wire import codec
from pangea.wire.capnp_spans import data_span, list_data_spans
from pangea.wire.messages import Batch, Chunk, Gradient, Params, Tensor


def _gradient(n: int) -> Gradient:
    values = np.arange(n, dtype=np.float32)
    return Gradient(
        "j",
        "w0",
        3,
        1,
        8,
        0.5,
        3,
        Chunk(0, 1, 0, n),
        Tensor.from_numpy(values, "grad"),
        0,
        "topk",
        1.0,
        Tensor.from_numpy(np.arange(n, dtype=np.uint32)),
    )


def _batch(n: int, extras: int) -> Batch:
    """A batch with `extras` named tensors of n, n+1, ... float32 elements."""
    extra = tuple(Tensor.from_numpy(np.arange(n + i, dtype=np.float32), f"e{i}") for i in range(extras))
    x = Tensor.from_numpy(np.ones((1, 3), np.float32), "x")
    return Batch("j", "p", 1, 0, 0, "w0", 0, 0, 1, x, Tensor.from_numpy(np.zeros(1, np.int64), "y"), extra=extra)


def _extra_spans(payload) -> list[tuple[int, int]]:
    return list_data_spans(payload, *codec._list_path("Batch", "extra"))


def _pycapnp_layout(message, first_segment_words: int) -> bytes:
    """`message` as pycapnp's own builder lays it out: small first segment, so large Data
    fields land in later segments behind far pointers."""
    builder = getattr(codec.schema(), codec._STRUCTS[type(message)]).new_message(
        num_first_segment_words=first_segment_words
    )
    codec._fill(builder, message)
    return builder.to_bytes()


@pytest.mark.parametrize("first_segment_words", [8, 64, 1 << 16])
@pytest.mark.parametrize("n", [0, 1, 5, 1000, 300_000])
def test_span_matches_pycapnp_on_its_own_layouts(first_segment_words, n):
    payload = _pycapnp_layout(_gradient(n), first_segment_words)
    with codec.schema().Gradient.from_bytes(payload, traversal_limit_in_words=1 << 30) as reader:
        for field in ("values", "indices"):
            expected = bytes(getattr(reader, field).data)
            offset, length = data_span(payload, codec._data_path("Gradient", field))
            assert payload[offset : offset + length] == expected
    decoded = codec.decode(payload, Gradient)
    np.testing.assert_array_equal(decoded.values.numpy(), np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(decoded.indices.numpy(), np.arange(n, dtype=np.uint32))


def test_several_segments_really_occur():
    """The layouts above do exercise far pointers: pycapnp made more than one segment."""
    payload = _pycapnp_layout(_gradient(300_000), 8)
    assert int.from_bytes(payload[:4], "little") + 1 > 1


def test_decoding_keeps_no_reference_to_the_payload():
    payload = codec.encode(
        Params("j", "o", 1, False, "h", Chunk(0, 1, 0, 1000), Tensor.from_numpy(np.ones(1000, np.float32)))
    )
    gc.collect()
    before = sys.getrefcount(payload)
    for _ in range(20):
        message = codec.decode(payload, Params)
        assert message.values.numpy().sum() == 1000.0
        del message
    gc.collect()
    assert sys.getrefcount(payload) == before


@pytest.mark.parametrize("first_segment_words", [8, 64, 1 << 16])
@pytest.mark.parametrize("n", [0, 1, 1000, 300_000])
@pytest.mark.parametrize("extras", [0, 1, 3])
def test_list_spans_match_pycapnp_on_its_own_layouts(first_segment_words, n, extras):
    payload = _pycapnp_layout(_batch(n, extras), first_segment_words)
    with codec.schema().Batch.from_bytes(payload, traversal_limit_in_words=1 << 30) as reader:
        expected = [bytes(item.data) for item in reader.extra]
    spans = _extra_spans(payload)
    assert [payload[offset : offset + length] for offset, length in spans] == expected
    decoded = codec.decode(payload, Batch)
    whole = np.frombuffer(payload, np.uint8)
    for i, tensor in enumerate(decoded.extra):
        np.testing.assert_array_equal(tensor.numpy(), np.arange(n + i, dtype=np.float32))
        assert tensor.numel == 0 or np.shares_memory(tensor.numpy(), whole)  # zero copy


def test_list_spans_of_large_extras_cross_segments():
    """The layouts above do put extras behind far pointers in later segments."""
    payload = _pycapnp_layout(_batch(300_000, 3), 8)
    assert int.from_bytes(payload[:4], "little") + 1 > 1
    first_segment_end = 8 + 8 * int.from_bytes(payload[4:8], "little")
    assert all(offset >= first_segment_end for offset, _ in _extra_spans(payload))


def test_list_spans_of_a_null_or_empty_list_are_none():
    assert _extra_spans(codec.schema().Batch.new_message().to_bytes()) == []  # null pointer
    builder = codec.schema().Batch.new_message()
    builder.init("extra", 0)
    assert _extra_spans(builder.to_bytes()) == []  # an empty composite list: a tag, no elements
    assert codec._list_path("Batch", "extra") == ((4,), 1)


def test_list_spans_of_elements_without_data_are_empty():
    builder = codec.schema().Batch.new_message()
    builder.init("extra", 2)[1].data = b"abc"
    payload = builder.to_bytes()
    (_, empty), (offset, length) = _extra_spans(payload)
    assert empty == 0 and payload[offset : offset + length] == b"abc"


def test_list_spans_refuse_a_list_that_is_not_composite():
    builder = codec.schema().Batch.new_message()
    builder.worker = "not a list"
    payload = builder.to_bytes()
    worker = codec.schema().Batch.schema.fields["worker"].proto.slot.offset
    with pytest.raises(ValueError, match="composite"):
        list_data_spans(payload, (worker,), 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=256), path=st.sampled_from([(2, 1), (3, 1), (0,), (5, 2, 1)]))
def test_span_on_arbitrary_bytes_is_in_bounds_or_a_value_error(data, path):
    try:
        offset, length = data_span(data, path)
    except ValueError:
        return
    assert 0 <= offset and offset + length <= len(data)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 5000), flip=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_span_of_a_corrupted_message_stays_in_bounds(n, flip, bit):
    payload = bytearray(codec.encode(_gradient(n)))
    payload[flip % len(payload)] ^= 1 << bit
    try:
        offset, length = data_span(bytes(payload), codec._data_path("Gradient", "values"))
    except ValueError:
        return
    assert 0 <= offset and offset + length <= len(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=256), path=st.sampled_from([(4,), (0,), (2, 1)]), field=st.integers(0, 3))
def test_list_spans_on_arbitrary_bytes_are_in_bounds_or_a_value_error(data, path, field):
    try:
        spans = list_data_spans(data, path, field)
    except ValueError:
        return
    assert len(spans) <= len(data) // 8
    assert all(0 <= offset and offset + length <= len(data) for offset, length in spans)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), extras=st.integers(0, 3), flip=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_list_spans_of_a_corrupted_message_stay_in_bounds(n, extras, flip, bit):
    payload = bytearray(codec.encode(_batch(n, extras)))
    payload[flip % len(payload)] ^= 1 << bit
    try:
        spans = _extra_spans(bytes(payload))
    except ValueError:
        return
    assert all(0 <= offset and offset + length <= len(payload) for offset, length in spans)
