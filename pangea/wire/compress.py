"""Gradient compression: none, fp16, bf16, int8 (one scale per chunk), top-k; error feedback.

Pure numpy, no I/O: what travels is decided elsewhere.  Error bounds (per element, x the
input): fp16 and bf16 round to nearest (relative error <= 2^-11 and 2^-8 for normal
numbers); int8 |error| <= scale / 2 with scale = max|x| / 127; top-k is exact on the kept
elements and drops the rest.  With `ErrorFeedback` what a lossy step drops is carried into
the next step, so the sum of what was sent differs from the sum of the inputs by at most the
last step's residual: nothing is lost for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("none", "fp16", "bf16", "int8", "topk")


@dataclass(frozen=True)
class Compressed:
    """A compressed float32 vector of `size` elements."""

    kind: str
    values: np.ndarray  # float32 (none, topk), float16, uint16 (bf16 bits) or int8
    size: int
    scale: float = 1.0  # int8
    indices: np.ndarray | None = None  # topk: uint32 positions of `values`

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.indices.nbytes if self.indices is not None else 0)


def compress(x: np.ndarray, kind: str, fraction: float = 0.01) -> Compressed:
    """Compress a 1-d float32 array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "none":
        return Compressed(kind, x, x.size)
    if kind == "fp16":
        return Compressed(kind, x.astype(np.float16), x.size)
    if kind == "bf16":
        return Compressed(kind, _to_bf16_bits(x), x.size)
    if kind == "int8":
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        return Compressed(kind, np.clip(np.rint(x / scale), -127, 127).astype(np.int8), x.size, scale)
    if kind == "topk":
        if not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        k = min(x.size, max(1, math.ceil(fraction * x.size)))
        idx = (
            np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype(np.uint32)
            if x.size
            else np.zeros(0, np.uint32)
        )
        return Compressed(kind, x[idx], x.size, indices=idx)
    raise ValueError(f"unknown compression {kind!r} (one of {', '.join(KINDS)})")


def decompress(c: Compressed) -> np.ndarray:
    """The float32 vector a Compressed stands for."""
    if c.kind == "none":
        return c.values.astype(np.float32, copy=False)
    if c.kind == "fp16":
        return c.values.astype(np.float32)
    if c.kind == "bf16":
        return (c.values.astype(np.uint32) << 16).view(np.float32)
    if c.kind == "int8":
        return (c.values.astype(np.float64) * c.scale).astype(np.float32)  # float64: tiny scales stay exact
    if c.kind == "topk":
        out = np.zeros(c.size, np.float32)
        out[c.indices] = c.values
        return out
    raise ValueError(f"unknown compression {c.kind!r}")


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x40)
    return out


class ErrorFeedback:
    """Carries what compression dropped into the next step (one per worker, per vector)."""

    def __init__(self, kind: str, fraction: float = 0.01) -> None:
        self.kind, self.fraction = kind, fraction
        self.residual: np.ndarray | None = None

    def compress(self, x: np.ndarray) -> Compressed:
        return self.compress_slices(x, [(0, x.size)])[0]

    def compress_slices(self, x: np.ndarray, slices: list[tuple[int, int]]) -> list[Compressed]:
        """Compress each [start, stop) of x + residual on its own (e.g. one int8 scale per chunk)."""
        target = x.astype(np.float32) if self.residual is None else x + self.residual
        out = [compress(target[a:b], self.kind, self.fraction) for a, b in slices]
        sent = np.empty_like(target)
        for (a, b), c in zip(slices, out):
            sent[a:b] = decompress(c)
        self.residual = target - sent
        return out
