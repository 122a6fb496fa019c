"""Token files for --task lm (pure: no bus): windows, splits, determinism and the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pangea.train.data import DataError
from pangea.train.tokens import load_tokens, stdlib_corpus, unigram_entropy_bits


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes: token t is followed by t + 1 (mod 256)
    return path


def test_windows_are_shifted_by_one_token_and_stay_in_their_split(text):
    data = load_tokens(text, context=16, val_fraction=0.25)
    assert data.vocab == 256 and data.train_tokens == 7680 and data.num_samples == 7679 // 16
    x, y = data.batch(seed=3, batch_size=32, global_step=5, start=0, stop=32)
    assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == np.int64
    assert ((x + 1) % 256 == y).all()  # the target of each position is the next token
    assert data.input_shape == (16,) and data.targets_per_sample == 16 and data.bytes_per_token == 1.0
    val = np.concatenate([vx for vx, _ in data.eval_batches(size=7)])
    assert len(val) == data.eval_windows == min(256, (10240 - 7680 - 1) // 16)
    assert len(np.unique(val[:, 0])) > 1  # spread over the split, not one window repeated


def test_a_global_batch_does_not_depend_on_how_it_is_cut(text):
    """Rows [a, b) of global batch g are the same whoever asks and however the batch is split:
    what makes the worker count irrelevant, and replay possible."""
    data = load_tokens(text, context=8)
    whole = data.batch(7, 20, 11, 0, 20)
    parts = [data.batch(7, 20, 11, a, b) for a, b in ((0, 7), (7, 14), (14, 20))]
    for i in (0, 1):
        assert (np.concatenate([p[i] for p in parts]) == whole[i]).all()
    assert not (data.batch(7, 20, 12, 0, 20)[0] == whole[0]).all()  # another step, other windows
    assert not (data.batch(8, 20, 11, 0, 20)[0] == whole[0]).all()  # another seed, other windows


def test_training_windows_never_reach_the_validation_tokens(tmp_path):
    path = tmp_path / "split.bin"
    tokens = np.zeros(4000, np.uint16)
    tokens[3000:] = 7  # the validation split (last quarter) is all sevens
    tokens.tofile(path)
    data = load_tokens(path, context=32, vocab=8, val_fraction=0.25)
    for step in range(data.num_samples // 16):
        x, y = data.batch(0, 16, step, 0, 16)
        assert not (x == 7).any() and not (y == 7).any()
    assert all((vx == 7).all() for vx, _ in data.eval_batches())


@pytest.mark.parametrize(
    ("tokens", "kwargs", "needle"),
    [
        (np.zeros(101, np.uint8), {}, "not a whole number of 2-byte tokens"),
        (np.array([1, 2, 300, 4] * 50, np.uint16), {"vocab": 256}, "token 300 at position 2 is not below --vocab 256"),
        (np.zeros(400, np.uint16), {}, "set --vocab"),
        (np.zeros(400, np.uint16), {"vocab": 4, "val_fraction": 0.01}, "validation split"),
    ],
)
def test_bad_token_files_are_one_line(tmp_path, tokens, kwargs, needle):
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    with pytest.raises(DataError, match=needle):
        load_tokens(path, context=16, **kwargs)


def test_a_sidecar_names_the_vocabulary(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    (tmp_path / "t.bin.vocab").write_text("1000\n")
    assert load_tokens(path, context=16).vocab == 1000
    (tmp_path / "t.bin.vocab").write_text("999\n")
    with pytest.raises(DataError, match="token 999"):
        load_tokens(path, context=16)


def test_the_stdlib_corpus_is_offline_and_its_entropy_is_what_numpy_says(tmp_path):
    out = tmp_path / "stdlib.txt"
    files, size = stdlib_corpus(out)
    assert files > 100 and size == out.stat().st_size > 1_000_000
    counts = np.bincount(np.frombuffer(out.read_bytes(), np.uint8), minlength=256)
    p = counts[counts > 0] / size
    assert math.isclose(unigram_entropy_bits(out), float(-(p * np.log2(p)).sum()), rel_tol=1e-12)
    again = tmp_path / "again.txt"
    stdlib_corpus(again)
    assert again.read_bytes() == out.read_bytes()  # the same bytes every time
