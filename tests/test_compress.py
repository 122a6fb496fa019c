"""Compression modes against numpy/torch references, and error feedback's bounded error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pangea.wire.compress import KINDS, ErrorFeedback, compress, decompress

finite = arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32))


def test_none_is_lossless():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    np.testing.assert_array_equal(decompress(compress(x, "none")), x)


def test_fp16_equals_numpy_cast():
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    np.testing.assert_array_equal(decompress(compress(x, "fp16")), x.astype(np.float16).astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(x=finite)
def test_bf16_equals_torch_rounding(x):
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decompress(compress(x, "bf16")), expected)


@settings(max_examples=100, deadline=None)
@given(x=finite)
def test_int8_error_within_half_a_step(x):
    c = compress(x, "int8")
    assert c.values.dtype == np.int8 and c.nbytes == x.size
    assert np.all(np.abs(decompress(c) - x) <= c.scale / 2 + 1e-6 * np.abs(x).max())


def test_topk_keeps_exactly_the_largest():
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.05, 4.0], np.float32)
    c = compress(x, "topk", fraction=0.5)
    np.testing.assert_array_equal(decompress(c), [0, -5.0, 0, 3.0, 0, 4.0])
    assert c.nbytes == 3 * 4 + 3 * 4


@pytest.mark.parametrize("kind", ["fp16", "bf16", "int8", "topk"])
def test_error_feedback_loses_nothing_for_good(kind):
    """Σ sent = Σ inputs − final residual, exactly; and the residual stays bounded."""
    rng = np.random.default_rng(2)
    ef = ErrorFeedback(kind, fraction=0.05)
    sent = np.zeros(500, np.float64)
    total = np.zeros(500, np.float64)
    worst = 0.0
    for _ in range(200):
        g = rng.normal(size=500).astype(np.float32)
        total += g
        sent += decompress(ef.compress(g))
        worst = max(worst, float(np.abs(ef.residual).max()))
    np.testing.assert_allclose(sent, total - ef.residual, atol=1e-3)
    assert worst < 50  # bounded: it does not grow with the number of steps


@settings(max_examples=50, deadline=None)
@given(x=finite, kind=st.sampled_from(KINDS))
def test_every_mode_round_trips_the_shape(x, kind):
    assert decompress(compress(x, kind, fraction=0.1)).shape == x.shape
