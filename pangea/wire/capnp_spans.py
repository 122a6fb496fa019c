"""Where a Data field's bytes lie inside a Cap'n Proto message: a bounds-checked pointer walk.

Why not pycapnp's `get_data_as_view`: in pycapnp 2.2.4 every such view leaks one
reference to the message buffer (fixed upstream after 2.2.4, capnproto/pycapnp#406), so a
process that decodes N MB of tensors keeps N MB for ever; measured: 100 decodes of a
1 MB Params message kept 101 MB.  The wire format is simple and documented
(https://capnproto.org/encoding.html); this follows the pointers from the root to one
Data field and returns (offset, length) in the payload, so the tensor is a slice of the
payload: zero copy, and no reference anywhere but in the slice.

`data_span` finds one Data field behind a path of struct pointers; `list_data_spans` finds
the Data field of every element of a List(struct) field (a Batch's `extra` tensors).
Handles multi-segment messages and single- and double-far pointers (pycapnp's own builder
puts a large Data field in a segment of its own).  Any inconsistency raises ValueError.
"""

from __future__ import annotations

import struct

_WORD = 8


def _segments(payload: memoryview) -> list[tuple[int, int]]:
    """(byte offset, byte length) of each segment."""
    if len(payload) < 8:
        raise ValueError("shorter than a segment table")
    count = struct.unpack_from("<I", payload, 0)[0] + 1
    table = 4 + 4 * count
    table += (8 - table % 8) % 8
    if count > 512 or table > len(payload):
        raise ValueError(f"segment table of {count} segments does not fit")
    sizes = struct.unpack_from(f"<{count}I", payload, 4)
    out, at = [], table
    for words in sizes:
        out.append((at, words * _WORD))
        at += words * _WORD
    if at > len(payload):
        raise ValueError("segments extend past the end of the message")
    return out


def _word(payload: memoryview, segments, seg: int, index: int) -> int:
    start, length = segments[seg]
    if not 0 <= index < length // _WORD:
        raise ValueError("pointer outside its segment")
    return struct.unpack_from("<Q", payload, start + index * _WORD)[0]


def _signed30(value: int) -> int:
    return value - (1 << 30) if value & (1 << 29) else value


def _resolve(payload, segments, seg: int, index: int) -> tuple[int, int, int] | None:
    """Follow far pointers: (segment, word index where the target's content starts, tag pointer),
    or None for a null pointer.  `index` is the word of the pointer itself."""
    pointer = _word(payload, segments, seg, index)
    if pointer == 0:
        return None
    if pointer & 3 != 2:  # a near struct or list pointer: content right after it plus offset
        return seg, index + 1 + _signed30((pointer >> 2) & 0x3FFFFFFF), pointer
    target = pointer >> 32
    pad = (pointer >> 3) & 0x1FFFFFFF
    if target >= len(segments):
        raise ValueError("far pointer to a missing segment")
    landing = _word(payload, segments, target, pad)
    if not (pointer >> 2) & 1:  # single far: the landing pad is a normal pointer
        if landing & 3 == 2:
            raise ValueError("far pointer lands on another far pointer")
        return target, pad + 1 + _signed30((landing >> 2) & 0x3FFFFFFF), landing
    # Double far: the pad is a far pointer to the content, then a tag describing it.
    if landing & 3 != 2 or (landing >> 2) & 1:
        raise ValueError("malformed double-far landing pad")
    content_seg, content_at = landing >> 32, (landing >> 3) & 0x1FFFFFFF
    if content_seg >= len(segments):
        raise ValueError("far pointer to a missing segment")
    return content_seg, content_at, _word(payload, segments, target, pad + 1)


def _field(payload, segments, seg: int, at: int, index: int) -> tuple[int, int] | None:
    """(segment, word) of pointer `index` of the struct that the pointer at (seg, at) points to,
    or None when that struct is null or older than the field (both read as the default)."""
    resolved = _resolve(payload, segments, seg, at)
    if resolved is None:
        return None
    seg, content, pointer = resolved
    if pointer & 3 != 0:
        raise ValueError("expected a struct pointer")
    data_words, pointer_words = (pointer >> 32) & 0xFFFF, pointer >> 48
    if index >= pointer_words:
        return None  # an older writer without this field
    return seg, content + data_words + index


def _walk(payload, segments, path: tuple[int, ...]) -> tuple[int, int] | None:
    """(segment, word) of the pointer reached from the root through the struct pointer indices
    `path`, or None when a struct on the way is null or lacks the field."""
    at: tuple[int, int] | None = (0, 0)  # the root pointer
    for index in path:
        at = _field(payload, segments, *at, index)
        if at is None:
            return None
    return at


def _data(payload, segments, seg: int, at: int) -> tuple[int, int]:
    """(offset, length) in `payload` of the Data value that the pointer at (seg, at) points to."""
    resolved = _resolve(payload, segments, seg, at)
    if resolved is None:
        return 0, 0
    seg, content, pointer = resolved
    if pointer & 3 != 1 or (pointer >> 32) & 7 != 2:
        raise ValueError("expected a list of bytes")
    length = pointer >> 35
    start, seg_len = segments[seg]
    if content < 0 or content * _WORD + length > seg_len:
        raise ValueError("Data field extends past its segment")
    return start + content * _WORD, length


def data_span(payload: bytes | memoryview, path: tuple[int, ...]) -> tuple[int, int]:
    """(offset, length) in `payload` of the Data field reached from the root struct through
    the pointer-section indices `path` (all but the last lead to structs)."""
    view = memoryview(payload).cast("B")
    segments = _segments(view)
    at = _walk(view, segments, path)
    return (0, 0) if at is None else _data(view, segments, *at)


def list_data_spans(payload: bytes | memoryview, path: tuple[int, ...], field: int) -> list[tuple[int, int]]:
    """(offset, length) in `payload` of Data field `field` (a pointer-section index) of each
    element of the List(struct) reached from the root struct through the struct pointer
    indices `path`; [] for a null or absent list."""
    view = memoryview(payload).cast("B")
    segments = _segments(view)
    at = _walk(view, segments, path)
    resolved = None if at is None else _resolve(view, segments, *at)
    if resolved is None:
        return []
    seg, content, pointer = resolved
    # A struct list is a composite list: a tag word shaped like a struct pointer whose offset
    # field is the element count, then the elements, each of the tag's (data, pointer) words.
    if pointer & 3 != 1 or (pointer >> 32) & 7 != 7:
        raise ValueError("expected a composite list")
    words = pointer >> 35  # of all elements, not counting the tag
    if content < 0 or content + 1 + words > segments[seg][1] // _WORD:
        raise ValueError("list extends past its segment")
    tag = _word(view, segments, seg, content)
    if tag & 3 != 0:
        raise ValueError("malformed composite list tag")
    count, data_words, pointer_words = (tag >> 2) & 0x3FFFFFFF, (tag >> 32) & 0xFFFF, tag >> 48
    size = data_words + pointer_words
    # Zero-size elements take no bytes: charge each a word, as capnp's own amplification
    # guard does, so that a few bytes cannot claim a billion elements.
    if count * size > words or count > len(view) // _WORD:
        raise ValueError(f"composite list of {count} elements does not fit its {words} words")
    if field >= pointer_words:  # an older writer's elements, without this field: empty
        return [(0, 0)] * count
    first = content + 1 + data_words + field
    return [_data(view, segments, seg, first + i * size) for i in range(count)]
