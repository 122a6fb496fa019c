"""Byzantine-robust combination of shard gradients, and norm clipping.  Pure numpy, no I/O.

Each function takes a (k, n) array: one row per contribution (a shard's mean gradient)."""

from __future__ import annotations

import numpy as np

AGGREGATORS = ("mean", "trimmed-mean", "median", "krum")


def clip(rows: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale every row whose L2 norm exceeds `max_norm` down to it."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scale = np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))
    return rows * scale


def trimmed_mean(rows: np.ndarray, trim: int) -> np.ndarray:
    """Per coordinate: drop the `trim` largest and `trim` smallest values, average the rest."""
    k = rows.shape[0]
    if k - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} from each end of {k} contributions")
    ordered = np.sort(rows, axis=0)
    return ordered[trim : k - trim].mean(axis=0)


def median(rows: np.ndarray) -> np.ndarray:
    """Coordinate-wise median."""
    return np.median(rows, axis=0)


def krum(rows: np.ndarray, byzantine: int) -> np.ndarray:
    """The row whose summed squared distance to its k - f - 2 nearest other rows is smallest
    (Blanchard et al., 2017)."""
    k = rows.shape[0]
    neighbours = k - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"krum needs more than f + 2 = {byzantine + 2} contributions, got {k}")
    squared = np.sum(rows**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * rows @ rows.T, 0.0)
    scores = [np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(k)]
    return rows[int(np.argmin(scores))].copy()


def combine(rows: np.ndarray, weights: np.ndarray, aggregator: str, byzantine: int) -> np.ndarray:
    """One update from k contributions; `mean` is weighted (by planned rows), the robust ones are not."""
    if aggregator == "mean":
        return np.average(rows, axis=0, weights=weights)
    if aggregator == "trimmed-mean":
        return trimmed_mean(rows, min(byzantine, (rows.shape[0] - 1) // 2))
    if aggregator == "median":
        return median(rows)
    if aggregator == "krum":
        return krum(rows, byzantine)
    raise ValueError(f"unknown aggregator {aggregator!r}")
