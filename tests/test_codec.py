"""Unit tests of the wire format: messages <-> Cap'n Proto bytes, no bus involved."""

from __future__ import annotations

import dataclasses
import gc
import math
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pangea.wire import codec
from pangea.wire import messages as m

RNG_SEED = 20240611


# ---------------------------------------------------------------- helpers


def _tensor(array: np.ndarray, name: str = "") -> m.Tensor:
    return m.Tensor.from_numpy(array, name)


def _batch(extra: tuple[m.Tensor, ...] = ()) -> m.Batch:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((5, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=5).astype(np.int64)
    # round beyond 32 bits: a UInt64 field must not be truncated.
    return m.Batch(
        job="job-a",
        sender="preprocessor",
        round=2**40 + 3,
        epoch=4,
        step=17,
        worker="host-123",
        shard=2,
        start=10,
        stop=15,
        x=_tensor(x, "x"),
        y=_tensor(y, "y"),
        extra=extra,
    )


def _batch_with_extras() -> m.Batch:
    rng = np.random.default_rng(RNG_SEED + 3)
    return _batch(
        extra=(
            _tensor(rng.random((5, 8)) < 0.5, "attention_mask"),
            _tensor(rng.random(5).astype(np.float32), "loss_mask"),
        )
    )


def _gradient(values: np.ndarray | None = None) -> m.Gradient:
    if values is None:
        values = np.random.default_rng(RNG_SEED + 1).standard_normal(33).astype(np.float32)
    return m.Gradient(
        job="job-a",
        sender="w1",
        round=9,
        shard=3,
        num_samples=21,
        loss=0.123456789012345,
        params_version=2**35,
        chunk=m.Chunk(index=1, count=4, offset=33, total=4 * 33),
        values=_tensor(values, "g"),
        count=21.0,
    )


def _all_messages() -> list:
    vec = np.linspace(-1, 1, 17, dtype=np.float32)
    return [
        _batch(),
        _batch_with_extras(),
        _gradient(),
        m.Params(
            job="job-a",
            sender="orchestrator",
            version=2**33 + 1,
            final=True,
            layout_hash="0123456789abcdef",
            chunk=m.Chunk(0, 1, 0, 17),
            values=_tensor(vec, "p"),
        ),
        m.RoundPlan(
            job="job-a",
            sender="orchestrator",
            round=12,
            epoch=1,
            step=5,
            batch_size=9,
            shards=(m.Shard("w1", 0, 5), m.Shard("w2", 5, 9)),
            final=True,
        ),
        m.Heartbeat(
            job="job-a",
            sender="w2",
            worker="w2",
            host="node-7",
            pid=4242,
            sent_at=1718000000.123456,
            shards_done=2**34,
            params_version=77,
        ),
        m.JobSpec(
            job="job-a",
            sender="orchestrator",
            model="pkg.mod:factory",
            hidden=(256, 128),
            input_shape=(1, 28, 28),
            num_classes=10,
            num_params=2**33,
            layout_hash="fedcba9876543210",
            total_rounds=3000,
            seed=2**40,
            dataset="/data/mnist.npz",
            batch_size=512,
            epochs=7,
            optimizer="pickle:" + "ab" * 32,
            step="pkg.steps:masked_lm",
            micro_batch=64,
            precision="bf16",
            param_numel=2**33 - 100,
        ),
        m.RoundDone(
            job="job-a",
            sender="orchestrator",
            round=41,
            total_rounds=100,
            epoch=3,
            loss=2.302585,
            seconds=0.25,
            num_samples=64,
            test_accuracy=0.875,
            workers=("w1", "w2", "w3"),
        ),
    ]


def _assert_same_tensor(a: m.Tensor, b: m.Tensor, what: str) -> None:
    assert (b.dtype, b.shape, b.name) == (a.dtype, a.shape, a.name), what
    assert bytes(b.data) == bytes(a.data), what


def _assert_same(a, b) -> None:
    """Field-by-field equality; tensors (lists of them too) compared by dtype, shape, name and
    exact bytes."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, m.Tensor):
            _assert_same_tensor(va, vb, f.name)
        elif isinstance(va, tuple) and va and isinstance(va[0], m.Tensor):
            assert type(vb) is tuple and len(vb) == len(va), f.name
            for ta, tb in zip(va, vb):
                _assert_same_tensor(ta, tb, f.name)
        else:
            assert vb == va, f.name
            assert type(vb) is type(va), f.name


def _round_trip(message):
    return codec.decode(codec.encode(message), expected=type(message))


def _big_params(megabytes: int = 3) -> m.Params:
    n = megabytes * (1 << 20) // 4
    values = np.random.default_rng(RNG_SEED + 2).standard_normal(n).astype(np.float32)
    return m.Params(
        job="job-a",
        sender="orchestrator",
        version=5,
        final=False,
        layout_hash="0123456789abcdef",
        chunk=m.Chunk(0, 1, 0, n),
        values=_tensor(values, "p"),
    )


def _many_shards_plan(shards: int = 3000) -> m.RoundPlan:
    return m.RoundPlan(
        job="job-a",
        sender="orchestrator",
        round=1,
        epoch=0,
        step=1,
        batch_size=shards,
        shards=tuple(m.Shard(f"worker-{i}", i, i + 1) for i in range(shards)),
    )


def _segment_count(payload: bytes) -> int:
    return struct.unpack_from("<I", payload)[0] + 1


def _capnp_tool_decode(struct_name: str, payload: bytes) -> str:
    """The reference `capnp decode` tool's text for `payload` (skips the test if it is missing)."""
    tool = shutil.which("capnp")
    if tool is None:
        pytest.skip("the `capnp` tool is missing: install the Debian package capnproto")
    result = subprocess.run(
        [tool, "decode", str(codec.schema_path()), struct_name],
        input=payload,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", _all_messages(), ids=lambda msg: type(msg).__name__)
def test_every_message_kind_round_trips(message):
    _assert_same(message, _round_trip(message))


@pytest.mark.parametrize("message", _all_messages(), ids=lambda msg: type(msg).__name__)
def test_decode_without_expected_returns_the_encoded_kind(message):
    assert type(codec.decode(codec.encode(message))) is type(message)


def test_round_done_default_accuracy_nan_survives():
    done = m.RoundDone("j", "orchestrator", 1, 2, 0, 0.5, 0.1, 4)
    back = _round_trip(done)
    assert math.isnan(back.test_accuracy)
    assert back.workers == ()


def test_batch_tensors_come_back_as_arrays_with_the_original_values():
    batch = _batch()
    back = _round_trip(batch)
    np.testing.assert_array_equal(back.x.numpy(), batch.x.numpy())
    np.testing.assert_array_equal(back.y.numpy(), batch.y.numpy())
    assert back.x.numpy().dtype == np.float32 and back.y.numpy().dtype == np.int64


@pytest.mark.parametrize("payload_type", [bytes, bytearray, memoryview])
def test_decode_accepts_any_bytes_like_payload(payload_type):
    grad = _gradient()
    back = codec.decode(payload_type(codec.encode(grad)), m.Gradient)
    _assert_same(grad, back)


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_torch_tensor_round_trip_is_exact(dtype):
    gen = torch.Generator().manual_seed(RNG_SEED)
    if dtype.is_floating_point:
        source = (torch.randn(4, 3, 5, generator=gen) * 100).to(dtype)
    else:
        source = torch.randint(0, 250, (4, 3, 5), generator=gen).to(dtype)
    grad = _gradient()
    grad = dataclasses.replace(grad, values=m.Tensor.from_torch(source, "t"))
    back = _round_trip(grad).values.torch()
    assert back.dtype == dtype
    assert back.shape == source.shape
    assert torch.equal(back, source)


@pytest.mark.parametrize(
    "dtype, array",
    [
        ("float32", np.float32(3.25).tobytes()),
        ("int64", np.int64(-7).tobytes()),
    ],
)
def test_zero_dim_tensor_round_trips(dtype, array):
    scalar = m.Tensor(dtype, (), memoryview(array), "scalar")
    back = _round_trip(dataclasses.replace(_gradient(), values=scalar)).values
    assert back.shape == ()
    assert back.numpy().shape == ()
    assert back.numpy() == np.frombuffer(array, m.DTYPES[dtype])[0]
    assert back.torch().shape == torch.Size([])


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_tensor_round_trips(shape):
    empty = m.Tensor("float32", shape, memoryview(b""), "empty")
    back = _round_trip(dataclasses.replace(_gradient(), values=empty)).values
    assert back.shape == shape
    assert back.numpy().shape == shape
    assert back.torch().shape == torch.Size(shape)


def test_from_numpy_of_an_empty_1d_array_round_trips():
    back = _round_trip(dataclasses.replace(_gradient(), values=_tensor(np.zeros(0, np.float32)))).values
    assert back.shape == (0,)


def test_from_numpy_keeps_a_zero_dim_shape():
    assert _tensor(np.array(3.5, np.float32)).shape == ()


@pytest.mark.parametrize(
    "make",
    [
        lambda: m.Tensor.from_numpy(np.zeros((3, 0), np.float32)),
        lambda: m.Tensor.from_torch(torch.zeros(3, 0)),
        lambda: m.Tensor.from_torch(torch.zeros(3, 0, dtype=torch.bfloat16)),
    ],
    ids=["numpy", "torch", "torch-bfloat16"],
)
def test_from_numpy_and_from_torch_accept_an_empty_2d_array(make):
    assert make().shape == (3, 0)


def test_big_endian_and_non_contiguous_arrays_are_normalised():
    base = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    tensor = _tensor(base)
    assert tensor.dtype == "float32"
    np.testing.assert_array_equal(_round_trip(dataclasses.replace(_gradient(), values=tensor)).values.numpy(), base)


def test_unsupported_numpy_dtype_is_refused():
    with pytest.raises(TypeError):
        _tensor(np.zeros(3, np.complex64))


# ---------------------------------------------------------------- zero copy


def test_decoded_tensor_is_a_view_into_the_payload():
    payload = codec.encode(_gradient())
    arr = codec.decode(payload, m.Gradient).values.numpy()
    whole = np.frombuffer(payload, np.uint8)
    start = whole.ctypes.data
    assert start <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= start + len(payload)
    assert np.shares_memory(arr, whole)
    assert not arr.flags.writeable


def test_decoded_tensor_keeps_the_payload_alive():
    grad = _gradient()
    expected = grad.values.numpy().copy()
    payload = codec.encode(grad)
    payload_id = id(payload)
    decoded = codec.decode(payload, m.Gradient)
    del payload, grad
    gc.collect()
    # Churn the allocator so freed memory would be reused and overwritten.
    junk = [bytes([i % 256]) * 256 for i in range(2000)]
    assert decoded.values.data.obj is not None and id(decoded.values.data.obj) == payload_id
    np.testing.assert_array_equal(decoded.values.numpy(), expected)
    np.testing.assert_array_equal(decoded.values.torch().numpy(), expected)
    del junk


# ---------------------------------------------------------------- refusals


def test_wrong_kind_is_refused():
    payload = codec.encode(_batch())
    with pytest.raises(codec.CodecError, match="Gradient"):
        codec.decode(payload, expected=m.Gradient)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 13, 100])
def test_empty_or_unaligned_bytes_are_refused(length):
    with pytest.raises(codec.CodecError):
        codec.decode(bytes(range(length)))


def test_valid_message_with_a_stray_tail_byte_is_refused():
    with pytest.raises(codec.CodecError):
        codec.decode(codec.encode(_gradient()) + b"\0")


def test_random_bytes_are_refused():
    """Random bytes never pass for a message (a header's schema version and kind would have to
    match by chance), and never raise anything but CodecError."""
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(300):
        payload = rng.bytes(8 * int(rng.integers(1, 40)))
        with pytest.raises(codec.CodecError):
            codec.decode(payload)


def test_truncated_messages_are_refused():
    payload = codec.encode(_batch())
    for cut in range(0, len(payload), 3):
        with pytest.raises(codec.CodecError):
            codec.decode(payload[:cut])


def test_tensor_with_data_not_matching_its_shape_is_refused():
    bad = m.Tensor("float32", (5,), memoryview(bytes(8)), "bad")
    payload = codec.encode(dataclasses.replace(_gradient(), values=bad))
    with pytest.raises(codec.CodecError, match="bad"):
        codec.decode(payload, m.Gradient)


def test_wrong_schema_version_is_refused(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(m, "SCHEMA_VERSION", m.SCHEMA_VERSION + 1)
        payload = codec.encode(_gradient())
    with pytest.raises(codec.CodecError, match="schema version"):
        codec.decode(payload)


def test_every_single_byte_corruption_gives_a_message_or_codec_error():
    payload = codec.encode(_gradient(np.arange(3, dtype=np.float32)))
    for position in range(len(payload)):
        for value in (0x00, 0x63, 0xFF):
            corrupted = bytearray(payload)
            corrupted[position] = value
            try:
                codec.decode(bytes(corrupted))
            except codec.CodecError:
                pass


def test_encoding_a_foreign_object_is_a_type_error():
    with pytest.raises(TypeError):
        codec.encode(object())


# ---------------------------------------------------------------- reference tool


def test_reference_capnp_tool_reads_a_batch_written_by_pangea():
    batch = _batch()
    text = _capnp_tool_decode("Batch", codec.encode(batch))
    assert f"round = {batch.round}" in text
    assert f'worker = "{batch.worker}"' in text
    assert "kind = batch" in text
    assert f"shape = [{', '.join(map(str, batch.x.shape))}]" in text


def test_reference_capnp_tool_reads_a_batch_with_extra_tensors():
    batch = _batch_with_extras()
    text = _capnp_tool_decode("Batch", codec.encode(batch))
    assert "extra = [" in text
    for tensor in batch.extra:
        assert f'name = "{tensor.name}"' in text
        assert f"shape = [{', '.join(map(str, tensor.shape))}]" in text
    assert "dtype = bool" in text


def test_reference_capnp_tool_reads_the_new_gradient_and_job_spec_fields():
    gradient, spec = (next(msg for msg in _all_messages() if type(msg) is cls) for cls in (m.Gradient, m.JobSpec))
    assert "count = 21" in _capnp_tool_decode("Gradient", codec.encode(gradient))
    text = _capnp_tool_decode("JobSpec", codec.encode(spec))
    assert 'step = "pkg.steps:masked_lm"' in text and "microBatch = 64" in text
    assert 'precision = "bf16"' in text and f"paramNumel = {2**33 - 100}" in text


def test_reference_capnp_tool_reads_a_multi_megabyte_tensor():
    params = _big_params()
    text = _capnp_tool_decode("Params", codec.encode(params))
    assert "kind = params" in text and "version = 5" in text
    assert f"shape = [{params.values.shape[0]}]" in text


def test_reference_capnp_tool_reads_a_message_of_several_segments():
    plan = _many_shards_plan()
    payload = codec.encode(plan)
    assert _segment_count(payload) > 1
    text = _capnp_tool_decode("RoundPlan", payload)
    assert f'worker = "worker-{len(plan.shards) - 1}"' in text


# ---------------------------------------------------------------- framing
#
# encode() has capnp write into one segment of its own and frames it itself, cutting the
# segment at the size capnp reports; a wrong cut would show as bytes unlike pycapnp's.


def _pycapnp_bytes(message) -> bytes:
    """`message` serialised by pycapnp itself, in one segment big enough for it."""
    struct_type = getattr(codec.schema(), codec._STRUCTS[type(message)])
    builder = struct_type.new_message(num_first_segment_words=1 << 20)
    codec._fill(builder, message)
    return builder.to_bytes()


@pytest.mark.parametrize("message", [*_all_messages(), _big_params()], ids=lambda msg: type(msg).__name__)
def test_encode_writes_the_same_bytes_as_pycapnp(message):
    payload = codec.encode(message)
    assert _segment_count(payload) == 1
    assert payload == _pycapnp_bytes(message)


def test_multi_megabyte_tensor_round_trips():
    params = _big_params()
    _assert_same(params, _round_trip(params))


def test_message_outgrowing_its_first_segment_round_trips():
    plan = _many_shards_plan()
    payload = codec.encode(plan)
    assert _segment_count(payload) > 1
    assert codec.decode(payload, m.RoundPlan) == plan


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_message_or_codec_error(payload):
    try:
        message = codec.decode(payload)
    except codec.CodecError:
        return
    assert isinstance(message, (m.Batch, m.Gradient, m.Params, m.RoundPlan, m.Heartbeat, m.JobSpec, m.RoundDone))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=16),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
def test_random_float32_arrays_round_trip_bit_exact(array):
    back = _round_trip(dataclasses.replace(_gradient(), values=_tensor(array))).values.numpy()
    assert back.shape == array.shape
    assert back.tobytes() == np.ascontiguousarray(array).tobytes()
