"""Token streams for language models: a `.txt` (bytes are tokens) or a `.bin` of uint16 tokens.

Nothing here reads a corpus whole.  Windows are read with `os.pread`, so a process's memory
does not grow with the corpus (a memory map would count every page it ever touched in the
process's RSS); the one full pass, checking that no token reaches the vocabulary, reads
fixed-size chunks.  The last `val_fraction` of the tokens is the validation split.

Global batch `step` of `epoch` is `batch_size` windows of `context + 1` tokens at offsets
drawn from a generator seeded with (seed, epoch, step): the same for every worker count, so
exactness, replay and membership changes work as for in-memory data.  An epoch has as many
windows as fit end to end in the training split (so `--epochs 1` is about one pass).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pangea.train.data import DataError, position
from pangea.train.plans import batch_rows

_CHUNK_TOKENS = 8 << 20  # tokens per read while checking the vocabulary: bounded memory
_FORMATS = {".txt": np.dtype("u1"), ".bin": np.dtype("<u2")}


@dataclass(frozen=True, kw_only=True)
class TokenData:
    """A token file, split into training and validation, cut into windows of `context` targets."""

    name: str
    path: Path
    dtype: np.dtype
    vocab: int
    context: int
    train_tokens: int  # tokens [0, train_tokens) train; the rest validate
    total_tokens: int
    eval_windows: int

    # ------------------------------------------------------------ what a Dataset offers

    @property
    def num_samples(self) -> int:
        """Windows per epoch: as many as fit end to end in the training split."""
        return (self.train_tokens - 1) // self.context

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.context,)

    @property
    def num_classes(self) -> int:
        return self.vocab

    @property
    def targets_per_sample(self) -> int:
        """Tokens predicted per window: what the loss is the mean over, and tokens/s counts."""
        return self.context

    @property
    def bytes_per_token(self) -> float | None:
        return 1.0 if self.dtype.itemsize == 1 else None  # a .txt: one byte per token

    def batch(
        self, seed: int, batch_size: int, global_step: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of a global batch: (inputs, targets), each (rows, context) int64."""
        epoch, step = position(global_step, self.num_samples, batch_size)
        rows = batch_rows(self.num_samples, batch_size, step)
        offsets = np.random.default_rng([seed, epoch, step]).integers(0, self.train_tokens - self.context, rows)
        return self._windows(offsets[start:stop])

    def rows(self, seed: int, batch_size: int, global_step: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a global batch as named arrays: `x` (inputs), `y` (targets)."""
        x, y = self.batch(seed, batch_size, global_step, start, stop)
        return {"x": x, "y": y}

    def eval_rows(self, size: int = 64):
        """The validation windows as named arrays, in batches of `size`."""
        for x, y in self.eval_batches(size):
            yield {"x": x, "y": y}

    def eval_batches(self, size: int = 64):
        """The validation windows, evenly spaced over the split, in batches of `size`."""
        val = self.total_tokens - self.train_tokens
        stride = (val - 1 - self.context) / max(1, self.eval_windows - 1) if self.eval_windows > 1 else 0
        offsets = self.train_tokens + np.floor(np.arange(self.eval_windows) * stride).astype(np.int64)
        for i in range(0, len(offsets), size):
            yield self._windows(offsets[i : i + size])

    # ------------------------------------------------------------ reading

    def _windows(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = self.context + 1
        out = np.empty((len(offsets), width), np.int64)
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            for row, offset in enumerate(offsets):
                raw = os.pread(fd, width * self.dtype.itemsize, int(offset) * self.dtype.itemsize)
                out[row] = np.frombuffer(raw, self.dtype)
        return out[:, :-1], out[:, 1:]


def load_tokens(
    path: Path, *, context: int, vocab: int = 0, val_fraction: float = 0.1, eval_windows: int = 256
) -> TokenData:
    """Open a token file; one-line `DataError` for anything that cannot train a language model."""
    path = Path(path)
    dtype = _FORMATS.get(path.suffix)
    if dtype is None:
        raise DataError(f"--task lm reads a .txt (bytes are tokens) or a .bin of uint16 tokens, not {path.name}")
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.itemsize}-byte tokens")
    total = size // dtype.itemsize
    vocab = vocab or _sidecar_vocab(path, dtype)
    train = int(total * (1 - val_fraction))
    if total - train < context + 2:
        raise DataError(
            f"{path}: the validation split (--val-fraction {val_fraction}) holds {total - train} tokens, "
            f"fewer than one window of --context {context} + 1"
        )
    if train < context + 2:
        raise DataError(
            f"{path}: the training split holds {train} tokens, fewer than one window of --context {context} + 1"
        )
    if dtype.itemsize > 1 or vocab < 256:
        _check_vocabulary(path, dtype, vocab)
    windows = max(1, min(eval_windows, (total - train - 1) // context))
    return TokenData(
        name=path.stem,
        path=path,
        dtype=dtype,
        vocab=vocab,
        context=context,
        train_tokens=train,
        total_tokens=total,
        eval_windows=windows,
    )


def _sidecar_vocab(path: Path, dtype: np.dtype) -> int:
    """A .txt has 256 tokens; a .bin names its vocabulary size in `<file>.vocab` or `--vocab`."""
    if dtype.itemsize == 1:
        return 256
    sidecar = path.with_name(path.name + ".vocab")
    try:
        return int(sidecar.read_text().strip())
    except FileNotFoundError:
        raise DataError(
            f"{path}: set --vocab (PANGEA_VOCAB) or write the vocabulary size into {sidecar.name}"
        ) from None
    except ValueError:
        raise DataError(f"{sidecar} must hold one integer, the vocabulary size") from None


def _check_vocabulary(path: Path, dtype: np.dtype, vocab: int) -> None:
    """Every token < vocab, read in bounded chunks (a token past it would crash an embedding)."""
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(_CHUNK_TOKENS * dtype.itemsize):
            tokens = np.frombuffer(chunk, dtype)
            top = int(tokens.max())
            if top >= vocab:
                at = offset + int(np.argmax(tokens >= vocab))
                raise DataError(
                    f"{path}: token {int(tokens[at - offset])} at position {at} is not below --vocab {vocab}"
                )
            offset += len(tokens)


def unigram_entropy_bits(path: Path) -> float:
    """Entropy of the token distribution in bits per token: what a model that learned nothing
    but token frequencies achieves; read in chunks."""
    path = Path(path)
    dtype = _FORMATS.get(path.suffix, np.dtype("u1"))
    counts = np.zeros(1 << (8 * dtype.itemsize), np.int64)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_TOKENS * dtype.itemsize):
            counts += np.bincount(np.frombuffer(chunk, dtype), minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def stdlib_corpus(out: Path) -> tuple[int, int]:
    """Write the top-level `*.py` files of this Python's standard library into one .txt, in name
    order (the same bytes for the same Python): an offline corpus.  (files, bytes) written."""
    import sysconfig

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    written = 0
    with open(out, "wb") as f:
        for source in sources:
            data = source.read_bytes()
            f.write(data)
            written += len(data)
    return len(sources), written


def bits(nats: float) -> float:
    return nats / math.log(2)
