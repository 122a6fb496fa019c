"""A Batch's named tensors beyond x and y (`extra`): round trips, zero copy, the name rules,
and batches written before the field existed."""

from __future__ import annotations

import dataclasses
import re
import struct

import capnp
import numpy as np
import pytest

from pangea.wire import codec
from pangea.wire import messages as m

RNG_SEED = 20240612


def _tensor(array: np.ndarray, name: str = "") -> m.Tensor:
    return m.Tensor.from_numpy(array, name)


def _batch(*extra: m.Tensor, rows: int = 4) -> m.Batch:
    rng = np.random.default_rng(RNG_SEED)
    return m.Batch(
        job="job-a",
        sender="preprocessor",
        round=3,
        epoch=0,
        step=3,
        worker="w1",
        shard=1,
        start=4,
        stop=4 + rows,
        x=_tensor(rng.integers(0, 50, size=(rows, 16)).astype(np.int64), "x"),
        y=_tensor(rng.integers(0, 50, size=(rows, 16)).astype(np.int64), "y"),
        extra=extra,
    )


def _masks(rows: int = 4, width: int = 16) -> tuple[m.Tensor, ...]:
    rng = np.random.default_rng(RNG_SEED + 1)
    return (
        _tensor(rng.random((rows, width)) < 0.8, "attention_mask"),
        _tensor(rng.random((rows, width)).astype(np.float32), "loss_mask"),
        _tensor(np.arange(width, dtype=np.int32), "positions"),
    )


def _assert_same_tensors(a: tuple[m.Tensor, ...], b: tuple[m.Tensor, ...]) -> None:
    assert len(a) == len(b)
    for ta, tb in zip(a, b):
        assert (tb.dtype, tb.shape, tb.name) == (ta.dtype, ta.shape, ta.name)
        assert bytes(tb.data) == bytes(ta.data)


def _inside(array: np.ndarray, payload) -> bool:
    start = np.frombuffer(payload, np.uint8).ctypes.data
    return start <= array.ctypes.data and array.ctypes.data + array.nbytes <= start + len(payload)


def _segment_count(payload: bytes) -> int:
    return struct.unpack_from("<I", payload)[0] + 1


# ---------------------------------------------------------------- round trips and zero copy


@pytest.mark.parametrize("count", [0, 1, 3])
def test_extras_round_trip(count):
    batch = _batch(*_masks()[:count])
    back = codec.decode(codec.encode(batch), m.Batch)
    _assert_same_tensors(batch.extra, back.extra)
    assert type(back.extra) is tuple
    assert dataclasses.replace(back, x=batch.x, y=batch.y, extra=batch.extra) == batch


def test_tensors_names_every_tensor_of_the_batch():
    batch = codec.decode(codec.encode(_batch(*_masks())), m.Batch)
    tensors = batch.tensors
    assert list(tensors) == ["x", "y", "attention_mask", "loss_mask", "positions"]
    assert tensors["x"] is batch.x and tensors["y"] is batch.y
    assert tensors["loss_mask"] is batch.extra[1]
    np.testing.assert_array_equal(tensors["positions"].numpy(), np.arange(16, dtype=np.int32))


def test_decoded_extras_are_views_into_the_payload():
    payload = codec.encode(_batch(*_masks()))
    back = codec.decode(payload, m.Batch)
    for tensor in back.extra:
        array = tensor.numpy()
        assert _inside(array, payload) and np.shares_memory(array, np.frombuffer(payload, np.uint8))
        assert not array.flags.writeable
        assert tensor.data.obj is payload


def test_many_extras_still_fit_one_segment():
    # The arena counts each tensor's struct, shape and name, not only its bytes.
    extra = tuple(_tensor(np.full((2, 3), i, np.int16), f"feature_with_a_long_name_{i:04d}") for i in range(500))
    batch = _batch(*extra, rows=2)
    payload = codec.encode(batch)
    assert _segment_count(payload) == 1
    _assert_same_tensors(extra, codec.decode(payload, m.Batch).extra)


def test_extras_in_later_segments_decode_zero_copy():
    # pycapnp's own builder with a tiny first segment puts big Data fields behind far pointers.
    big = _tensor(np.arange(300_000, dtype=np.float32).reshape(3, -1), "big")
    batch = _batch(big, _masks(rows=3)[0], rows=3)
    builder = codec.schema().Batch.new_message(num_first_segment_words=8)
    codec._fill(builder, batch)
    payload = builder.to_bytes()
    assert _segment_count(payload) > 1
    back = codec.decode(payload, m.Batch)
    _assert_same_tensors(batch.extra, back.extra)
    assert _inside(back.extra[0].numpy(), payload)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("names", [[""], ["x"], ["y"], ["mask", "mask"]], ids=["empty", "x", "y", "twice"])
def test_a_batch_with_a_bad_extra_name_cannot_be_built(names):
    with pytest.raises(ValueError, match="extra tensor name"):
        _batch(*(_tensor(np.zeros((4, 16), np.float32), name) for name in names))


@pytest.mark.parametrize("names", [[""], ["x"], ["y"], ["mask", "mask"]], ids=["empty", "x", "y", "twice"])
def test_bytes_with_a_bad_extra_name_are_refused(names):
    # Written by pycapnp directly: a Batch cannot even be built with these names.
    builder = codec.schema().Batch.new_message()
    codec._fill(builder, _batch(*_masks()[: len(names)]))
    for item, name in zip(builder.extra, names):
        item.name = name
    with pytest.raises(codec.CodecError, match="malformed Batch: extra tensor name"):
        codec.decode(builder.to_bytes(), m.Batch)


def test_an_extra_whose_bytes_do_not_match_its_shape_is_refused():
    builder = codec.schema().Batch.new_message()
    codec._fill(builder, _batch(*_masks()))
    builder.extra[1].shape[0] = 5
    with pytest.raises(codec.CodecError, match="loss_mask"):
        codec.decode(builder.to_bytes(), m.Batch)


# ---------------------------------------------------------------- older writers


def _write_without_extra(builder, batch: m.Batch) -> bytes:
    header = builder.init("header")
    header.schemaVersion, header.kind = m.SCHEMA_VERSION, "batch"
    header.job, header.sender = batch.job, batch.sender
    for f in codec._fields(m.Batch):
        if f.name != "extra":
            codec._set(builder, f, getattr(batch, f.name))
    return builder.to_bytes()


def test_a_batch_with_the_field_unset_decodes_with_no_extras():
    payload = _write_without_extra(codec.schema().Batch.new_message(), _batch())
    back = codec.decode(payload, m.Batch)
    assert back.extra == () and back == _batch()


@pytest.fixture(scope="module")
def schema_before_extra(tmp_path_factory):
    """tensor.capnp as it was before `extra`: a Batch of one pointer fewer (its own file id, so
    that pycapnp holds both schemas at once)."""
    text = codec.schema_path().read_text()
    text = text.replace("@0xf10c1a066822f431;", "@0xd2a5c0ffee123457;", 1)
    text, removed = re.subn(r"\n  # Named tensors beyond.*?extra @13 :List\(Tensor\);", "", text, flags=re.S)
    assert removed == 1
    path = tmp_path_factory.mktemp("schema") / "before_extra.capnp"
    path.write_text(text)
    return capnp.load(str(path), imports=[])


def test_a_batch_written_before_the_field_existed_decodes(schema_before_extra):
    payload = _write_without_extra(schema_before_extra.Batch.new_message(), _batch())
    with schema_before_extra.Batch.from_bytes(payload) as reader:
        root = struct.unpack_from("<Q", payload, 8)[0]
        assert root >> 48 == 4, "the old Batch has 4 pointers: header, worker, x, y"
        assert reader.worker == "w1"
    back = codec.decode(payload, m.Batch)
    assert back.extra == () and back == _batch()
