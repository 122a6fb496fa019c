"""Messages larger than the server's max payload, sent as frames and put back together.

Frames of one message carry `Pangea-Frame: <index>/<count>` and `Pangea-Frame-Of: <msg id>`.
They may arrive in any order (a retried publish is stored after later ones), interleaved
with other messages, or twice (redelivery); reassembly is keyed by message id and index.
Malformed or never-completed frames are refused, never fatal.  No nats import: frames are
any objects with `.headers` and `.data`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

FRAME = "Pangea-Frame"
FRAME_OF = "Pangea-Frame-Of"
MAX_FRAMES = 1 << 16
_FRAME_RE = re.compile(r"^(\d{1,6})/(\d{1,6})$")


class FrameError(ValueError):
    """A frame that cannot belong to any message."""


def split(payload: bytes, limit: int, msg_id: str) -> list[tuple[bytes, dict[str, str]]]:
    """(data, headers) per frame; a payload within `limit` is one plain message."""
    if len(payload) <= limit:
        return [(payload, {"Nats-Msg-Id": msg_id})]
    view = memoryview(payload)
    count = -(-len(payload) // limit)
    if count > MAX_FRAMES:
        raise ValueError(f"message of {len(payload)} bytes needs {count} frames (max {MAX_FRAMES})")
    return [
        (
            bytes(view[i * limit : (i + 1) * limit]),
            {"Nats-Msg-Id": f"{msg_id}#{i}", FRAME: f"{i}/{count}", FRAME_OF: msg_id},
        )
        for i in range(count)
    ]


def is_frame(msg) -> bool:
    return bool(msg.headers) and FRAME in msg.headers


@dataclass
class _Partial:
    count: int
    started: float
    parts: dict[int, object] = field(default_factory=dict)


class Reassembler:
    """Collects frames until a message is complete; stale partial messages expire."""

    def __init__(self, max_age: float = 120.0) -> None:
        self.max_age = max_age
        self._partial: dict[str, _Partial] = {}

    def add(self, msg) -> tuple[bytes, list] | None:
        """The whole payload and its frames once `msg` completes a message, else None.

        Raises FrameError for a frame that is malformed or contradicts earlier frames.
        A duplicate frame returns None and is left to the caller via `duplicates`.
        """
        header = msg.headers.get(FRAME, "")
        match = _FRAME_RE.match(header)
        of = msg.headers.get(FRAME_OF, "")
        if not match or not of:
            raise FrameError(f"bad frame header {header!r} of {of!r}")
        index, count = int(match[1]), int(match[2])
        if not 0 <= index < count <= MAX_FRAMES:
            raise FrameError(f"frame {index}/{count} out of range")
        partial = self._partial.setdefault(of, _Partial(count, time.monotonic()))
        if partial.count != count:
            raise FrameError(f"frame {index}/{count} of {of!r}, which has {partial.count} frames")
        if index in partial.parts:
            raise FrameError(f"duplicate frame {index}/{count} of {of!r}")
        partial.parts[index] = msg
        if len(partial.parts) < count:
            return None
        del self._partial[of]
        frames = [partial.parts[i] for i in range(count)]
        return b"".join(f.data for f in frames), frames

    def expire(self) -> list:
        """Frames of messages that stayed incomplete longer than `max_age`: drop (and ack) them."""
        now = time.monotonic()
        stale = [of for of, p in self._partial.items() if now - p.started > self.max_age]
        return [msg for of in stale for msg in self._partial.pop(of).parts.values()]
