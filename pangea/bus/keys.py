"""NKeys: ed25519 key pairs as NATS encodes them, made with the `nkeys` library (no `nk` tool).

A seed (`S` + the kind's letter: `SU...` user, `SA...` account, `SO...` operator) is the
secret; its public key (`U...`, `A...`, `O...`) is what a server or a JWT names.  A seed file
holds the seed on one line, as `nk -gen user > user.nk` writes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import nkeys

PREFIXES = {
    "user": nkeys.PREFIX_BYTE_USER,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
}
SEED_PREFIXES = {"user": "SU", "account": "SA", "operator": "SO"}


def new_seed(kind: str) -> bytes:
    """A fresh random seed of `kind` (user, account or operator)."""
    return nkeys.encode_seed(os.urandom(32), PREFIXES[kind])


def keypair(seed: bytes) -> nkeys.KeyPair:
    """The key pair of a seed (raises nkeys.ErrInvalidSeed, ErrInvalidPrefixByte if it is none)."""
    return nkeys.from_seed(bytearray(seed))


def public_key(seed: bytes) -> str:
    return keypair(seed).public_key.decode()


def write_private(path: Path, text: str) -> Path:
    """Write a secret readable by its owner only (0600), never briefly readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: narrow it before writing
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def write_seed(path: Path, seed: bytes) -> Path:
    """A seed file, as `nk -gen` writes one."""
    return write_private(path, seed.decode() + "\n")
