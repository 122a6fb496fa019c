"""NATS JWTs without `nsc`: operator, account and user claims signed with NKeys, and `.creds` files.

Decentralized auth: an operator signs accounts, an account signs users, and nats-server trusts
only the operator's JWT (plus the account JWTs it is given); it never sees a user's secret.
The encoding is nats-io/jwt v2's, which the server checks: the header
{"typ":"JWT","alg":"ed25519-nkey"} and the claims JSON, each base64url without padding, then
the issuer's ed25519 signature of "header.claims", also base64url.  The claim id `jti` is, as
in jwt v2, base32 (no padding) of the SHA-512/256 of the standard claims' JSON without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # signing needs nkeys; reading a creds file or a JWT does not
    import nkeys

ALGORITHM = "ed25519-nkey"
_HEADER = {"typ": "JWT", "alg": ALGORITHM}
# jwt v2's ClaimsData fields, in its order: the JSON the claim id is the hash of.
_STANDARD = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")
NO_LIMIT = -1
_JETSTREAM_UNLIMITED = {"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT, "streams": NO_LIMIT, "consumer": NO_LIMIT}
_MARKERS = {"jwt": "NATS USER JWT", "seed": "USER NKEY SEED"}


class JWTError(ValueError):
    """Not a NATS JWT, or not a creds file; the message says what is missing."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def claim_id(claims: dict) -> str:
    """The `jti` of claims: what jwt v2 computes, so that our JWTs read like nsc's."""
    standard = {k: claims[k] for k in _STANDARD if k != "jti" and claims.get(k)}
    digest = hashlib.new("sha512_256", _json(standard)).digest()
    return base64.b32encode(digest).decode().rstrip("=")


def encode(claims: dict, signer: nkeys.KeyPair) -> str:
    """A JWT of `claims` issued and signed by `signer` (sets iss, iat unless given, and jti)."""
    claims = {**claims, "iss": signer.public_key.decode()}
    claims.setdefault("iat", int(time.time()))
    claims["jti"] = claim_id(claims)
    ordered = {k: claims[k] for k in _STANDARD if claims.get(k)}
    ordered.update({k: v for k, v in claims.items() if k not in _STANDARD})
    signing_input = f"{_b64(_json(_HEADER))}.{_b64(_json(ordered))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode(token: str) -> dict:
    """The claims of a NATS JWT, not verified: to read what a file holds (the server verifies)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JWTError("not a JWT (expected three base64url parts separated by dots)")
    try:
        header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
    except ValueError:
        raise JWTError("not a JWT (its parts are not base64url JSON)") from None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM or not isinstance(claims, dict):
        raise JWTError(f"not a NATS JWT (expected the algorithm {ALGORITHM!r})")
    return claims


def operator_jwt(operator: nkeys.KeyPair, name: str, *, system_account: str | None = None) -> str:
    """The self-signed operator JWT: the root of trust that nats-server is configured with."""
    nats: dict = {"type": "operator", "version": 2}
    if system_account:
        nats["system_account"] = system_account
    return encode({"name": name, "sub": operator.public_key.decode(), "nats": nats}, operator)


def account_jwt(operator: nkeys.KeyPair, account: str, name: str, *, jetstream: bool = True) -> str:
    """An account signed by the operator; JetStream is on (unlimited) unless `jetstream` is False.

    jwt v2 accounts have JetStream off until they get storage limits: 0 means disabled.
    """
    limits = {
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
        "imports": NO_LIMIT,
        "exports": NO_LIMIT,
        "wildcards": True,
        "conn": NO_LIMIT,
        "leaf": NO_LIMIT,
    }
    if jetstream:
        limits.update(_JETSTREAM_UNLIMITED)
    nats = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}
    return encode({"name": name, "sub": account, "nats": nats}, operator)


def user_jwt(
    account: nkeys.KeyPair,
    user: str,
    name: str,
    permissions: dict[str, list[str]] | None = None,
    *,
    expires: int | None = None,
) -> str:
    """A user signed by its account, allowed exactly `permissions` ({"publish": [...],
    "subscribe": [...]}, as security.role_permissions gives; None: everything) until `expires`
    (unix seconds; None: never)."""
    nats: dict = {"pub": {}, "sub": {}}
    for key, subjects in (permissions or {}).items():
        nats[{"publish": "pub", "subscribe": "sub"}[key]] = {"allow": list(subjects)}
    nats.update(subs=NO_LIMIT, data=NO_LIMIT, payload=NO_LIMIT, type="user", version=2)
    claims = {"name": name, "sub": user, "nats": nats}
    if expires is not None:
        claims["exp"] = int(expires)
    return encode(claims, account)


def creds(user_jwt: str, user_seed: bytes) -> str:
    """A `.creds` file: the user JWT and the user's seed between the markers nsc writes."""
    return (
        f"-----BEGIN {_MARKERS['jwt']}-----\n{user_jwt}\n------END {_MARKERS['jwt']}------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN {_MARKERS['seed']}-----\n{user_seed.decode()}\n------END {_MARKERS['seed']}------\n\n"
        "*************************************************************\n"
    )


def parse_creds(text: str) -> tuple[str, bytes]:
    """(user JWT, user seed) of a creds file; JWTError naming the part that is missing.

    As strict as nats-py's reader: each value alone on the line after its BEGIN marker.
    """
    if "\r" in text:  # nats-py would keep the \r in the JWT, and the server refuse it
        raise JWTError("it has Windows line endings (CRLF): convert it to LF, e.g. with dos2unix")
    return _section(text, "jwt"), _section(text, "seed").encode()


def _section(text: str, part: str) -> str:
    marker = _MARKERS[part]
    lines = text.split("\n")
    begin = [i for i, line in enumerate(lines) if re.fullmatch(rf"-{{3,}}BEGIN {marker}-{{3,}}", line)]
    if not begin:
        raise JWTError(f"no '-----BEGIN {marker}-----' line")
    value = lines[begin[0] + 1] if begin[0] + 1 < len(lines) else ""
    end = lines[begin[0] + 2] if begin[0] + 2 < len(lines) else ""
    if not value or value != value.strip() or not re.fullmatch(rf"-{{3,}}END {marker}-{{3,}}", end):
        raise JWTError(f"expected the {part} alone on the line after '-----BEGIN {marker}-----', then the END line")
    return value
