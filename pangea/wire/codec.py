"""Messages <-> Cap'n Proto bytes.  The only module that imports capnp.

Decoding is zero-copy: tensor payloads, those in lists of tensors (a Batch's `extra`)
included, come back as views into the received buffer (found by `capnp_spans`), which the
returned message keeps alive.  Encoding copies a tensor twice: into the one segment capnp
writes, and out to `bytes` (see `_Arena`).  Anything that is not a well-formed message of
the expected kind raises `CodecError` with a short reason.

Why one module of ~350 lines: encoding and decoding are two walks of the same per-class field
plan (`_fields`) over the same schema, and this is the only place capnp is imported.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import typing
from functools import cache
from importlib import resources
from pathlib import Path

import capnp
import numpy as np

from pangea.errors import Reason
from pangea.wire import messages as m
from pangea.wire.capnp_spans import data_span, list_data_spans

# The traversal limit guards against a few bytes claiming a huge list (amplification):
# a valid message never needs to traverse more than about its own size.
_NESTING_LIMIT = 16
# Words of a message beyond its tensors that one segment is sized for: headers, short
# texts and short lists fit with room to spare.
_SMALL_WORDS = 1024
# A Tensor struct's own words (1 data, 3 pointers) and its list's tag word: counted per
# tensor, with its shape, name and bytes, so that any number of extras fits one segment.
_TENSOR_WORDS = 5

_STRUCTS: dict[type, str] = {
    m.Batch: "Batch",
    m.Gradient: "Gradient",
    m.Params: "Params",
    m.RoundPlan: "RoundPlan",
    m.Heartbeat: "Heartbeat",
    m.JobSpec: "JobSpec",
    m.RoundDone: "RoundDone",
}
_KINDS: dict[type, str] = {
    m.Batch: "batch",
    m.Gradient: "gradient",
    m.Params: "params",
    m.RoundPlan: "roundPlan",
    m.Heartbeat: "heartbeat",
    m.JobSpec: "jobSpec",
    m.RoundDone: "roundDone",
}
_CLASSES: dict[str, type] = {kind: cls for cls, kind in _KINDS.items()}
_HEADER_FIELDS = ("job", "sender")


class CodecError(ValueError):
    """Bytes that are not a valid Pangea message of the expected kind."""

    reason = Reason.MALFORMED


class WrongKind(CodecError):
    """A well-formed Pangea message, but not of the kind expected here."""

    reason = Reason.WRONG_TYPE


def schema_path() -> Path:
    """Path of `tensor.capnp`: installed package data, or the repository's `schemas/`."""
    try:
        packaged = resources.files("pangea.schemas") / "tensor.capnp"
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "schemas" / "tensor.capnp"


@cache
def schema():
    """The loaded Cap'n Proto schema module."""
    return capnp.load(str(schema_path()), imports=[])


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclasses.dataclass(frozen=True)
class _Field:
    """A message field past the header, as the codec handles it."""

    name: str  # of the dataclass field
    schema_name: str  # of the Cap'n Proto field (camel case)
    hint: typing.Any  # its type
    item: typing.Any = None  # a tuple's item type


@cache
def _fields(cls: type) -> tuple[_Field, ...]:
    """`cls`'s fields, names and types worked out once per class (per message, this reflection
    was ~40% of encoding or decoding a small message)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in _HEADER_FIELDS:
            continue
        hint = hints[f.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        out.append(_Field(f.name, _camel(f.name), hint, item))
    return tuple(out)


# ---------------------------------------------------------------- encoding


def encode(message: m.Message) -> bytes:
    """Serialize one message to Cap'n Proto bytes (unpacked, single frame)."""
    cls = type(message)
    if cls not in _STRUCTS:
        raise TypeError(f"cannot encode {cls.__name__}")
    arena = _Arena(_SMALL_WORDS + sum(_tensor_words(t) for t in _tensors(message)))
    builder = getattr(schema(), _STRUCTS[cls]).new_message(arena.words, arena.allocate)
    _fill(builder, message)
    return arena.to_bytes(builder)


def _fill(builder, message: m.Message) -> None:
    """Set every field of a new root `builder` from `message`."""
    cls = type(message)
    header = builder.init("header")
    header.schemaVersion = m.SCHEMA_VERSION
    header.kind = _KINDS[cls]
    header.job = message.job
    header.sender = message.sender
    for f in _fields(cls):
        _set(builder, f, getattr(message, f.name))


def _tensors(message: m.Message) -> list[m.Tensor]:
    """Every tensor of `message`: its Tensor fields and the items of its tensor lists."""
    out = []
    for f in _fields(type(message)):
        if f.hint is m.Tensor:
            out.append(getattr(message, f.name))
        elif f.item is m.Tensor:
            out.extend(getattr(message, f.name))
    return out


def _tensor_words(tensor: m.Tensor) -> int:
    """Words a tensor takes in a message: struct, shape, name (with its NUL) and bytes."""
    name = len(tensor.name.encode()) + 1
    return _TENSOR_WORDS + len(tensor.shape) + _words(name) + _words(len(tensor.data))


def _words(nbytes: int) -> int:
    return (nbytes + 7) // 8


def _set(builder, f: _Field, value) -> None:
    name = f.schema_name
    if f.hint is m.Tensor:
        _set_tensor(builder.init(name), value)
    elif f.hint is m.Chunk:
        chunk = builder.init(name)
        chunk.index, chunk.count = value.index, value.count
        chunk.offset, chunk.total = value.offset, value.total
    elif f.item is not None:
        items = builder.init(name, len(value))
        if f.item is m.Shard:
            for item, shard in zip(items, value):
                item.worker, item.start, item.stop = shard.worker, shard.start, shard.stop
        elif f.item is m.Tensor:
            for item, tensor in zip(items, value):
                _set_tensor(item, tensor)
        else:
            for i, v in enumerate(value):
                items[i] = v
    else:
        setattr(builder, name, value)


def _set_tensor(builder, tensor: m.Tensor) -> None:
    builder.dtype = tensor.dtype
    builder.name = tensor.name
    shape = builder.init("shape", len(tensor.shape))
    for i, s in enumerate(tensor.shape):
        shape[i] = s
    builder.data = tensor.data


class _Arena:
    """One segment of our own for capnp to write a message into, with room in front for its table.

    Why: with pycapnp's own builder a tensor was copied three times: into segments it
    sizes itself, out again by `to_segments()`, and once more by the join that frames
    them (`to_bytes()` is no faster).  Sized for the whole message, one segment holds
    it all and, with its 8-byte table written in front, leaves as one slice: two copies
    (into the segment, out to `bytes`).  pycapnp cannot reserve a Data field without
    copying it (`init` returns a copy of the new bytes), so two is its floor.

    If the size guess is short (many small items and no tensor, e.g. a plan naming
    thousands of workers), capnp asks for more segments: they are handed out, and the
    message is framed from `to_segments()`.
    """

    def __init__(self, words: int):
        self.words = words  # of the first segment
        # Zeroed memory, as capnp requires; numpy's calloc leaves untouched pages unmapped.
        self.buffer = np.zeros(8 + 8 * words, np.uint8)
        self.segments = 0
        self.allocated = 0  # words, all segments

    def allocate(self, minimum_words: int):
        """capnp's callback for a new segment of at least `minimum_words` words."""
        if self.segments == 0:
            segment = memoryview(self.buffer)[8:]
        else:
            # Each new segment as big as all before, like capnp's own builder: few segments.
            segment = bytearray(8 * max(minimum_words, self.allocated))
        self.segments += 1
        self.allocated += len(segment) // 8
        return segment

    def to_bytes(self, builder) -> bytes:
        """The framed message: segment table, then the segments."""
        if self.segments > 1:
            return _frame(builder.to_segments())
        # One segment holds exactly the root pointer and what it reaches: each field is
        # set once, so no orphaned space is left behind.
        used = 1 + builder.total_size.word_count
        struct.pack_into("<II", self.buffer, 0, 0, used)
        return self.buffer[: 8 + 8 * used].tobytes()


def _frame(segments: list[bytes]) -> bytes:
    count = len(segments)
    table = struct.pack(f"<I{count}I", count - 1, *(len(s) // 8 for s in segments))
    if count % 2 == 0:
        table += b"\0\0\0\0"
    return b"".join([table, *segments])


# ---------------------------------------------------------------- decoding


def decode(payload: bytes | memoryview, expected: type | None = None) -> m.Message:
    """Parse bytes into a message; `expected` restricts the kind (else any kind is accepted)."""
    kind = peek_kind(payload)
    cls = _CLASSES.get(kind)
    if cls is None:
        raise CodecError(f"unknown message kind {kind!r}")
    if expected is not None and cls is not expected:
        raise WrongKind(f"expected {expected.__name__}, got {cls.__name__}")
    try:
        with _reader(payload, _STRUCTS[cls]) as reader:
            fields = {"job": reader.header.job, "sender": reader.header.sender}
            for f in _fields(cls):
                fields[f.name] = _get(reader, f, payload, _STRUCTS[cls])
        # Inside the try: a message's own checks (a Batch's extra tensor names) refuse it too.
        return cls(**fields)
    except CodecError:
        raise
    # RuntimeError: pycapnp's answer to an enum value the schema does not define.
    except (capnp.KjException, ValueError, UnicodeDecodeError, AttributeError, RuntimeError) as exc:
        raise CodecError(f"malformed {cls.__name__}: {_short(exc)}") from None


def peek_kind(payload: bytes | memoryview) -> str:
    """The `kind` named in a message's header (every Pangea struct starts with one)."""
    if len(payload) < 8 or len(payload) % 8:
        raise CodecError(f"not a Cap'n Proto message ({len(payload)} bytes)")
    try:
        with _reader(payload, "Batch") as reader:
            header = reader.header
            version, kind = header.schemaVersion, str(header.kind)
    except (capnp.KjException, ValueError, RuntimeError) as exc:
        raise CodecError(f"not a Cap'n Proto message: {_short(exc)}") from None
    if version != m.SCHEMA_VERSION:
        raise CodecError(f"schema version {version}, expected {m.SCHEMA_VERSION}")
    return kind


def _reader(payload, struct_name: str):
    if isinstance(payload, (memoryview, bytearray)) and np.frombuffer(payload, np.uint8).ctypes.data % 8:
        payload = bytes(payload)  # capnp refuses unaligned buffers; `bytes` data is aligned
    limit = 2 * (len(payload) // 8) + 1024
    return getattr(schema(), struct_name).from_bytes(
        payload, traversal_limit_in_words=limit, nesting_limit=_NESTING_LIMIT
    )


def _get(reader, f: _Field, payload, struct_name: str):
    value = getattr(reader, f.schema_name)
    hint = f.hint
    if hint is m.Tensor:
        return _get_tensor(value, payload, data_span(payload, _data_path(struct_name, f.schema_name)))
    if hint is m.Chunk:
        return m.Chunk(value.index, value.count, value.offset, value.total)
    if f.item is m.Tensor:
        path, data = _list_path(struct_name, f.schema_name)
        spans = list_data_spans(payload, path, data)
        if len(spans) != len(value):
            raise ValueError(f"{f.name}: {len(spans)} tensors found, pycapnp reads {len(value)}")
        return tuple(_get_tensor(item, payload, span) for item, span in zip(value, spans))
    if f.item is not None:
        if f.item is m.Shard:
            return tuple(m.Shard(s.worker, s.start, s.stop) for s in value)
        return tuple(f.item(v) for v in value)
    return hint(value) if hint in (int, float, bool, str) else value


def _get_tensor(reader, payload, span: tuple[int, int]) -> m.Tensor:
    """The tensor `reader` describes, its bytes the slice `span` = (offset, length) of `payload`."""
    dtype = str(reader.dtype)
    if dtype not in m.DTYPES:
        raise CodecError(f"unknown dtype {dtype!r}")
    shape = tuple(int(s) for s in reader.shape)
    # Not `reader.get_data_as_view("data")`: it leaks the message buffer (see capnp_spans).
    offset, length = span
    expected = math.prod(shape) * m.DTYPES[dtype].itemsize
    if length != expected:
        raise CodecError(f"tensor {reader.name!r}: {length} bytes for shape {shape} {dtype}")
    return m.Tensor(dtype, shape, memoryview(payload).cast("B")[offset : offset + length], str(reader.name))


@cache
def _data_path(struct_name: str, field: str) -> tuple[int, int]:
    """Pointer-section indices from a root struct to its Tensor field's `data`."""
    structs = schema()
    tensor = getattr(structs, struct_name).schema.fields[field].proto.slot.offset
    return tensor, structs.Tensor.schema.fields["data"].proto.slot.offset


@cache
def _list_path(struct_name: str, field: str) -> tuple[tuple[int], int]:
    """Pointer-section indices of a root struct's List(Tensor) field, and of a Tensor's `data`."""
    structs = schema()
    tensors = getattr(structs, struct_name).schema.fields[field].proto.slot.offset
    return (tensors,), structs.Tensor.schema.fields["data"].proto.slot.offset


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "description", None) or exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__
