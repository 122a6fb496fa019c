"""Unit tests of framing: splitting big payloads and putting frames back together, no bus."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import pytest

from pangea.bus import frames
from pangea.bus.frames import FRAME, FRAME_OF, FrameError, Reassembler, split

RNG_SEED = 20240611


@dataclass
class FakeMsg:
    """Stands in for a nats message: frames only need `.headers`, `.data` and `.subject`."""

    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    subject: str = "pangea.test"


def _payload(size: int, seed: int = RNG_SEED) -> bytes:
    return random.Random(seed).randbytes(size)


def _frames(payload: bytes, limit: int, msg_id: str) -> list[FakeMsg]:
    return [FakeMsg(data, headers) for data, headers in split(payload, limit, msg_id)]


def _feed(reassembler: Reassembler, msgs: list[FakeMsg]):
    """Add every frame; the one result that is not None (exactly one must complete)."""
    results = [reassembler.add(msg) for msg in msgs]
    done = [r for r in results if r is not None]
    assert len(done) == 1, f"{len(done)} completions for {len(msgs)} frames"
    assert results[-1] is not None, "completed before the last frame arrived"
    return done[0]


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("size", [0, 1, 99, 100])
def test_split_payload_within_limit_is_one_plain_message(size):
    payload = _payload(size)
    parts = split(payload, 100, "m-1")
    assert parts == [(payload, {"Nats-Msg-Id": "m-1"})]


@pytest.mark.parametrize("size, limit", [(101, 100), (200, 100), (201, 100), (1000, 7), (4096, 1024)])
def test_split_large_payload_into_numbered_frames_within_limit(size, limit):
    payload = _payload(size)
    parts = split(payload, limit, "m-1")
    count = math.ceil(size / limit)
    assert len(parts) == count
    for i, (data, headers) in enumerate(parts):
        assert 0 < len(data) <= limit
        assert headers == {"Nats-Msg-Id": f"m-1#{i}", FRAME: f"{i}/{count}", FRAME_OF: "m-1"}
    assert b"".join(data for data, _ in parts) == payload


def test_split_frames_are_full_except_the_last():
    parts = split(_payload(250), 100, "m-1")
    assert [len(data) for data, _ in parts] == [100, 100, 50]


def test_split_frames_are_bytes_not_views():
    # A frame is handed to the client for publishing, possibly after the payload is gone.
    parts = split(bytearray(_payload(300)), 100, "m-1")
    assert all(type(data) is bytes for data, _ in parts)


def test_split_refuses_a_payload_needing_too_many_frames():
    with pytest.raises(ValueError, match="frames"):
        split(bytes(frames.MAX_FRAMES + 1), 1, "m-1")


def test_split_marks_frames_and_plain_messages_apart():
    plain = FakeMsg(*split(b"small", 100, "a")[0])
    framed = _frames(_payload(300), 100, "b")
    assert not frames.is_frame(plain)
    assert all(frames.is_frame(f) for f in framed)
    assert not frames.is_frame(FakeMsg(b"", headers=None))


# ---------------------------------------------------------------- reassembly


def test_frames_in_order_give_back_payload_and_frames():
    payload = _payload(1000)
    msgs = _frames(payload, 64, "m-1")
    data, got = _feed(Reassembler(), msgs)
    assert data == payload
    assert got == msgs


def test_frames_reversed_give_back_payload_and_frames_in_index_order():
    payload = _payload(1000)
    msgs = _frames(payload, 64, "m-1")
    data, got = _feed(Reassembler(), list(reversed(msgs)))
    assert data == payload
    assert [f.headers[FRAME] for f in got] == [f.headers[FRAME] for f in msgs]
    assert got == msgs


@pytest.mark.parametrize("seed", range(5))
def test_frames_shuffled_give_back_payload_and_frames_in_index_order(seed):
    payload = _payload(5000, seed)
    msgs = _frames(payload, 97, "m-1")
    shuffled = msgs[:]
    random.Random(RNG_SEED + seed).shuffle(shuffled)
    assert shuffled != msgs  # the shuffle must actually reorder something
    data, got = _feed(Reassembler(), shuffled)
    assert data == payload
    assert got == msgs


def test_interleaved_messages_both_complete():
    first, second = _payload(700, 1), _payload(900, 2)
    a, b = _frames(first, 100, "m-a"), _frames(second, 100, "m-b")
    mixed = [msg for pair in zip(b, a) for msg in pair] + b[len(a) :]
    random.Random(RNG_SEED).shuffle(mixed)
    reassembler = Reassembler()
    done = {}
    for msg in mixed:
        result = reassembler.add(msg)
        if result is not None:
            done[msg.headers[FRAME_OF]] = result
    assert set(done) == {"m-a", "m-b"}
    assert done["m-a"] == (first, a)
    assert done["m-b"] == (second, b)
    assert reassembler.expire() == [] and reassembler._partial == {}


def test_same_message_id_can_be_reassembled_again_after_completing():
    # A redelivery of every frame after completion starts a fresh message, not a duplicate.
    payload = _payload(300)
    msgs = _frames(payload, 100, "m-1")
    reassembler = Reassembler()
    assert _feed(reassembler, msgs)[0] == payload
    assert _feed(reassembler, msgs)[0] == payload


def test_duplicate_frame_is_refused_and_message_still_completes():
    payload = _payload(500)
    msgs = _frames(payload, 100, "m-1")
    reassembler = Reassembler()
    assert reassembler.add(msgs[0]) is None
    assert reassembler.add(msgs[2]) is None
    duplicate = FakeMsg(b"X" * 100, dict(msgs[2].headers))  # same frame, other bytes
    with pytest.raises(FrameError, match="duplicate"):
        reassembler.add(duplicate)
    with pytest.raises(FrameError, match="duplicate"):
        reassembler.add(msgs[0])
    results = [reassembler.add(m) for m in (msgs[1], msgs[3], msgs[4])]
    assert results[:2] == [None, None]
    assert results[2] == (payload, msgs)


@pytest.mark.parametrize(
    "header", ["", "x", "0/x", "5/3", "3/3", "0/0", "-1/3", "0/100000000", "1/65537", " 0/3", "0/3 "]
)
def test_malformed_frame_header_is_refused(header):
    with pytest.raises(FrameError):
        Reassembler().add(FakeMsg(b"data", {FRAME: header, FRAME_OF: "m-1"}))


@pytest.mark.parametrize("headers", [{FRAME: "0/3"}, {FRAME: "0/3", FRAME_OF: ""}, {}])
def test_frame_without_message_id_is_refused(headers):
    with pytest.raises(FrameError):
        Reassembler().add(FakeMsg(b"data", headers))


def test_refused_frame_leaves_no_partial_message():
    reassembler = Reassembler(max_age=0)
    for header in ("5/3", "0/0", "x"):
        with pytest.raises(FrameError):
            reassembler.add(FakeMsg(b"data", {FRAME: header, FRAME_OF: "m-1"}))
    time.sleep(0.01)
    assert reassembler.expire() == []


def test_largest_frame_count_is_accepted():
    last = f"{frames.MAX_FRAMES - 1}/{frames.MAX_FRAMES}"
    assert Reassembler().add(FakeMsg(b"d", {FRAME: last, FRAME_OF: "m-1"})) is None


def test_frame_count_disagreeing_with_earlier_frames_is_refused():
    payload = _payload(300)
    msgs = _frames(payload, 100, "m-1")
    reassembler = Reassembler()
    assert reassembler.add(msgs[0]) is None
    with pytest.raises(FrameError):
        reassembler.add(FakeMsg(b"y" * 100, {FRAME: "1/4", FRAME_OF: "m-1"}))
    # The refused frame did not replace or count towards the real message.
    assert reassembler.add(msgs[1]) is None
    assert reassembler.add(msgs[2]) == (payload, msgs)


def test_one_frame_message_completes_at_once():
    msg = FakeMsg(b"only", {FRAME: "0/1", FRAME_OF: "m-1"})
    assert Reassembler().add(msg) == (b"only", [msg])


# ---------------------------------------------------------------- expiry


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(frames.time, "monotonic", fake)
    return fake


def test_expire_returns_frames_of_stale_messages_and_forgets_them(clock):
    msgs = _frames(_payload(500), 100, "m-1")
    reassembler = Reassembler(max_age=10)
    for msg in msgs[:3]:
        assert reassembler.add(msg) is None
    clock.now += 10  # exactly max_age: not yet stale
    assert reassembler.expire() == []
    clock.now += 0.5
    stale = reassembler.expire()
    assert sorted(stale, key=msgs.index) == msgs[:3]
    assert reassembler.expire() == []
    # Forgotten: the remaining frames start a new message instead of completing the old one,
    # and the expired frames, redelivered, are not duplicates.
    for msg in (msgs[3], msgs[4], msgs[0], msgs[1]):
        assert reassembler.add(msg) is None
    assert reassembler.add(msgs[2]) == (_payload(500), msgs)


def test_expire_keeps_fresh_messages(clock):
    old, new = _frames(_payload(300, 1), 100, "old"), _frames(_payload(300, 2), 100, "new")
    reassembler = Reassembler(max_age=10)
    reassembler.add(old[0])
    clock.now += 6
    reassembler.add(new[0])
    reassembler.add(new[1])
    clock.now += 6  # old: 12 s, new: 6 s
    assert reassembler.expire() == [old[0]]
    assert reassembler.add(new[2]) == (_payload(300, 2), new)


def test_age_counts_from_the_first_frame(clock):
    msgs = _frames(_payload(300), 100, "m-1")
    reassembler = Reassembler(max_age=10)
    reassembler.add(msgs[0])
    clock.now += 8
    reassembler.add(msgs[1])  # a later frame does not refresh the age
    clock.now += 8
    assert sorted(reassembler.expire(), key=msgs.index) == msgs[:2]


def test_expire_with_zero_max_age_and_real_clock():
    msgs = _frames(_payload(300), 100, "m-1")
    reassembler = Reassembler(max_age=0)
    reassembler.add(msgs[1])
    time.sleep(0.01)
    assert reassembler.expire() == [msgs[1]]
    assert reassembler.expire() == []
