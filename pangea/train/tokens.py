"""Token streams for language models: `.txt` files (bytes are tokens) or `.bin` files of uint16 or
uint32 tokens, one file or several read in name order as one stream (a directory or a glob), with
the validation split at the end of the stream or in files of its own.

`.bin` files are nanoGPT's (headerless, uint16 unless --token-dtype uint32) or llm.c's: a header of
256 int32 whose first says the format (20240520: uint16 tokens; 20240801: uint32 tokens) and whose
third says how many tokens follow.  A file with such a header is read as llm.c's whatever
--token-dtype says.

Nothing here reads a corpus whole.  Windows are read with `os.pread`, so a process's memory
does not grow with the corpus (a memory map would count every page it ever touched in the
process's RSS); the one full pass, checking that no token reaches the vocabulary, reads
fixed-size chunks.  A window may span two files: the files are one stream.

Global batch `step` of `epoch` is `batch_size` windows of `context + 1` tokens at offsets
drawn from a generator seeded with (seed, epoch, step): the same for every worker count, so
exactness, replay and membership changes work as for in-memory data.  An epoch has as many
windows as fit end to end in the training split (so `--epochs 1` is about one pass).

Why one module of ~340 lines: the files' formats, the stream over them and the windows cut from
it are one idea, a corpus on disk as the samples of a language model.
"""

from __future__ import annotations

import glob
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pangea.train.data import DataError, position
from pangea.train.plans import batch_rows

_CHUNK_TOKENS = 8 << 20  # tokens per read while checking the vocabulary: bounded memory
_SUFFIXES = (".txt", ".bin")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# llm.c's shard header (karpathy/llm.c dev/data/data_common.py): 256 int32, [magic, version, tokens, ...].
_HEADER_BYTES = 256 * 4
_LLMC_MAGIC = {20240520: np.dtype("<u2"), 20240801: np.dtype("<u4")}


@dataclass(frozen=True)
class TokenFile:
    """One file of a stream: its tokens start `offset` bytes in."""

    path: Path
    dtype: np.dtype
    offset: int
    tokens: int


@dataclass(frozen=True)
class Stream:
    """Files read one after the other as one array of tokens."""

    files: tuple[TokenFile, ...]

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def dtype(self) -> np.dtype:
        return self.files[0].dtype

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream, as int64 (a span may cross files)."""
        out = np.empty(count, np.int64)
        filled, first = 0, 0
        for f in self.files:
            if start + filled < first + f.tokens and filled < count:
                at = start + filled - first
                n = min(count - filled, f.tokens - at)
                with open(f.path, "rb", buffering=0) as handle:
                    raw = os.pread(handle.fileno(), n * f.dtype.itemsize, f.offset + at * f.dtype.itemsize)
                out[filled : filled + n] = np.frombuffer(raw, f.dtype)
                filled += n
            first += f.tokens
        if filled != count:
            raise DataError(f"tokens {start}..{start + count} are past the end of the stream ({self.tokens})")
        return out

    def chunks(self):
        """Every token, in bounded chunks (for the vocabulary check)."""
        for f in self.files:
            with open(f.path, "rb") as handle:
                handle.seek(f.offset)
                left = f.tokens
                while left > 0:
                    chunk = np.frombuffer(handle.read(min(left, _CHUNK_TOKENS) * f.dtype.itemsize), f.dtype)
                    if not len(chunk):
                        break
                    yield chunk
                    left -= len(chunk)


@dataclass(frozen=True, kw_only=True)
class TokenData:
    """A token stream split into training and validation windows of `context` targets: the
    validation split is the last tokens of `train` (`val` is None), or a stream of its own."""

    name: str
    train: Stream
    val: Stream | None
    vocab: int
    context: int
    train_tokens: int  # tokens [0, train_tokens) of `train` train; the rest validate (no `val`)
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
        return 1.0 if self.train.dtype.itemsize == 1 else None  # a .txt: one byte per token

    def batch(
        self, seed: int, batch_size: int, global_step: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of a global batch: (inputs, targets), each (rows, context) int64."""
        epoch, step = position(global_step, self.num_samples, batch_size)
        rows = batch_rows(self.num_samples, batch_size, step)
        offsets = np.random.default_rng([seed, epoch, step]).integers(0, self.train_tokens - self.context, rows)
        return self._windows(self.train, offsets[start:stop])

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
        stream, first, tokens = self._validation()
        stride = (tokens - 1 - self.context) / max(1, self.eval_windows - 1) if self.eval_windows > 1 else 0
        offsets = first + np.floor(np.arange(self.eval_windows) * stride).astype(np.int64)
        for i in range(0, len(offsets), size):
            yield self._windows(stream, offsets[i : i + size])

    def _validation(self) -> tuple[Stream, int, int]:
        """The validation split: (stream, first token, tokens)."""
        if self.val is not None:
            return self.val, 0, self.val.tokens
        return self.train, self.train_tokens, self.train.tokens - self.train_tokens

    # ------------------------------------------------------------ reading

    def _windows(self, stream: Stream, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = self.context + 1
        out = np.empty((len(offsets), width), np.int64)
        for row, offset in enumerate(offsets):
            out[row] = stream.read(int(offset), width)
        return out[:, :-1], out[:, 1:]


def load_tokens(
    path: Path | str,
    *,
    context: int,
    vocab: int = 0,
    val_fraction: float = 0.1,
    eval_windows: int = 256,
    val_path: Path | str | None = None,
    held_out: bool = False,
    token_dtype: str = "uint16",
) -> TokenData:
    """Open a token file, directory or glob (and a validation one); one-line `DataError` for
    anything that cannot train a language model.  `held_out`: the validation tokens are in files
    of their own (`val_path`, which a process serving training batches need not open): every token
    of `path` trains."""
    train = open_stream(path, token_dtype)
    val = open_stream(val_path, token_dtype) if val_path else None
    if val is not None and val.dtype != train.dtype:
        raise DataError(f"{val_path} holds {val.dtype.name} tokens, {path} {train.dtype.name}")
    vocab = vocab or _sidecar_vocab(train.files[0].path, train.dtype)
    total = train.tokens
    separate = held_out or val is not None
    train_tokens = total if separate else int(total * (1 - val_fraction))
    held = val.tokens if val is not None else (context + 2 if separate else total - train_tokens)
    where = f"{val_path}" if val is not None else f"the validation split (--val-fraction {val_fraction}) of {path}"
    if held < context + 2:
        raise DataError(f"{where} holds {held} tokens, fewer than one window of --context {context} + 1")
    if train_tokens < context + 2:
        raise DataError(
            f"{path}: the training split holds {train_tokens} tokens, fewer than one window of --context {context} + 1"
        )
    for stream in (train, val):
        if stream is not None and (stream.dtype.itemsize > 1 or vocab < 256):
            _check_vocabulary(stream, vocab)
    windows = max(1, min(eval_windows, (held - 1) // context))
    name = Path(str(path).rstrip("/*")).stem or "tokens"
    return TokenData(
        name=name, train=train, val=val, vocab=vocab, context=context, train_tokens=train_tokens, eval_windows=windows
    )


def open_stream(spec: Path | str, token_dtype: str = "uint16") -> Stream:
    """The token files a path names: a file, a directory (its .bin files, else its .txt files, in
    name order) or a glob; each file's format read from its suffix and header."""
    paths = _paths(str(spec))
    files = tuple(_token_file(p, token_dtype) for p in paths)
    dtypes = {f.dtype for f in files}
    if len(dtypes) > 1:
        raise DataError(
            f"{spec}: its files hold tokens of different widths ({', '.join(sorted(d.name for d in dtypes))})"
        )
    return Stream(files)


def _paths(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        for suffix in (".bin", ".txt"):
            found = sorted(path.glob(f"*{suffix}"))
            if found:
                return found
        raise DataError(f"{spec}: a directory without .bin or .txt token files")
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not found:
            raise DataError(f"{spec}: no file matches")
        return found
    if path.suffix not in _SUFFIXES:
        raise DataError(
            f"--task lm reads .txt files (bytes are tokens) or .bin files of uint16 or uint32 tokens (one, a "
            f"directory of them or a glob), not {path.name}"
        )
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    return [path]


def _token_file(path: Path, token_dtype: str) -> TokenFile:
    if path.suffix not in _SUFFIXES:
        raise DataError(f"{path}: token files are .txt or .bin")
    size = path.stat().st_size
    if path.suffix == ".txt":
        return TokenFile(path, np.dtype("u1"), 0, size)
    header = _llmc_header(path, size)
    if header is not None:
        return header
    dtype = _DTYPES[token_dtype]
    if size % dtype.itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.itemsize}-byte tokens")
    return TokenFile(path, dtype, 0, size // dtype.itemsize)


def _llmc_header(path: Path, size: int) -> TokenFile | None:
    """An llm.c shard's format from its header, or None for a headerless file."""
    if size < _HEADER_BYTES:
        return None
    with open(path, "rb") as f:
        magic, version, tokens = struct.unpack("<3i", f.read(12))
    dtype = _LLMC_MAGIC.get(magic)
    if dtype is None:
        return None
    if size != _HEADER_BYTES + tokens * dtype.itemsize:
        raise DataError(
            f"{path}: an llm.c shard (magic {magic}, version {version}) of {tokens} {dtype.name} tokens should be "
            f"{_HEADER_BYTES + tokens * dtype.itemsize} bytes, not {size}"
        )
    return TokenFile(path, dtype, _HEADER_BYTES, tokens)


def _sidecar_vocab(path: Path, dtype: np.dtype) -> int:
    """A .txt has 256 tokens; a .bin names its vocabulary size in `<file>.vocab` or `--vocab`."""
    if dtype.itemsize == 1:
        return 256
    for sidecar in (path.with_name(path.name + ".vocab"), path.parent / "vocab"):
        try:
            return int(sidecar.read_text().strip())
        except FileNotFoundError:
            continue
        except ValueError:
            raise DataError(f"{sidecar} must hold one integer, the vocabulary size") from None
    raise DataError(f"{path}: set --vocab (PANGEA_VOCAB) or write the vocabulary size into {path.name}.vocab")


def _check_vocabulary(stream: Stream, vocab: int) -> None:
    """Every token < vocab, read in bounded chunks (a token past it would crash an embedding)."""
    offset = 0
    for tokens in stream.chunks():
        top = int(tokens.max())
        if top >= vocab:
            at = int(np.argmax(tokens >= vocab))
            where = stream.files[0].path if len(stream.files) == 1 else "the stream"
            raise DataError(f"{where}: token {int(tokens[at])} at position {offset + at} is not below --vocab {vocab}")
        offset += len(tokens)


def unigram_entropy_bits(path: Path | str) -> float:
    """Entropy of the token distribution in bits per token: what a model that learned nothing
    but token frequencies achieves; read in chunks."""
    counts = np.zeros(0, np.int64)
    for chunk in open_stream(path).chunks():
        here = np.bincount(chunk, minlength=len(counts))
        here[: len(counts)] += counts
        counts = here
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
