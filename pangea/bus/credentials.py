"""The NKey seed and creds files a client presents, checked before nats-py reads them.

nats-py reads them itself, on every (re)connect, and reports mistakes badly: a missing `nkeys`
package or a file that holds no seed is a traceback, and a creds file without its JWT
marker makes its reader loop forever.  So each mistake a user can make here (no nkeys
package, a missing or unreadable file, no seed in it, a creds file without its JWT or seed,
a seed that is not the JWT's user, an expired JWT) is a `CredentialsError` first: one line
naming the setting and what to do.
"""

from __future__ import annotations

import time
from pathlib import Path

from pangea.bus import jwt

SEED_SETTING = "PANGEA_NATS_NKEY_SEED"
CREDS_SETTING = "PANGEA_NATS_CREDS"
_MAKE_SEED = "make one with `nk -gen user` or `python -m pangea.bus.security --job J --auth nkey --keys DIR`"
_MAKE_CREDS = "make one with `nsc generate creds` or `python -m pangea.bus.security --job J --auth jwt --keys DIR`"


class CredentialsError(ValueError):
    """A seed or creds file that cannot authenticate; the message names the setting."""


def _require_nkeys(setting: str) -> None:
    try:
        import nkeys  # noqa: F401 - nats-py imports it while connecting
    except ImportError:
        raise CredentialsError(
            f"{setting} needs the nkeys package, which nats-py uses for NKey and JWT auth: "
            "pip install 'nats-py[nkeys]' (Pangea's own install includes it)"
        ) from None


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(f"{setting} = {str(path)!r}: cannot read it ({reason})") from None


def _user_public_key(seed: bytes, setting: str, path: Path, make: str) -> str:
    """The public key of a user seed; CredentialsError if `seed` is not one."""
    import nkeys

    from pangea.bus import keys

    where = f"{setting} = {str(path)!r}"
    if seed[:1] != b"S":
        kind = "a public key, not a seed" if seed[:1] in (b"U", b"A", b"O") else "no NKey seed"
        raise CredentialsError(f"{where} holds {kind} (a user seed starts with SU; {make})")
    if not seed.startswith(b"SU"):
        raise CredentialsError(
            f"{where} holds a seed that is not a user's (it starts with "
            f"{seed[:2].decode(errors='replace')}, a user seed with SU; {make})"
        )
    try:
        return keys.public_key(seed)
    except (nkeys.ErrInvalidSeed, nkeys.ErrInvalidPrefixByte, ValueError):
        raise CredentialsError(f"{where} holds no valid NKey seed ({make})") from None


def check_seed_file(path: Path) -> Path:
    """`path`, after checking it holds a user seed, as nats-py reads it (the whole file, stripped)."""
    _require_nkeys(SEED_SETTING)
    seed = _read(path, SEED_SETTING).strip().encode()
    _user_public_key(seed, SEED_SETTING, path, _MAKE_SEED)
    return path


def check_creds_file(path: Path, now: float | None = None) -> Path:
    """`path`, after checking it is a creds file whose user JWT is current and matches its seed."""
    _require_nkeys(CREDS_SETTING)
    where = f"{CREDS_SETTING} = {str(path)!r}"
    try:
        token, seed = jwt.parse_creds(_read(path, CREDS_SETTING))
        claims = jwt.decode(token)
    except jwt.JWTError as exc:
        raise CredentialsError(f"{where} is not a creds file: {exc} ({_MAKE_CREDS})") from None
    if claims.get("nats", {}).get("type") != "user":
        raise CredentialsError(f"{where}: its JWT is not a user JWT ({_MAKE_CREDS})")
    if _user_public_key(seed, CREDS_SETTING, path, _MAKE_CREDS) != claims.get("sub"):
        raise CredentialsError(f"{where}: its seed is not the key of its JWT's user ({_MAKE_CREDS})")
    now = time.time() if now is None else now
    expires, not_before = claims.get("exp") or 0, claims.get("nbf") or 0
    if expires and expires <= now:
        raise CredentialsError(f"{where}: its user JWT expired at {_utc(expires)}; issue a new creds file")
    if not_before > now:
        raise CredentialsError(f"{where}: its user JWT is not valid before {_utc(not_before)}")
    return path


def auth_settings(settings) -> str:
    """The settings that chose how this client authenticates, for a refusal message."""
    chosen = [
        name
        for name, value in (
            ("PANGEA_NATS_USER/PANGEA_NATS_PASSWORD", settings.nats_user),
            ("PANGEA_NATS_TOKEN", settings.nats_token),
            (SEED_SETTING, settings.nats_nkey_seed),
            (CREDS_SETTING, settings.nats_creds),
        )
        if value
    ]
    if not chosen:
        return (
            "no credentials are set: set PANGEA_NATS_USER and PANGEA_NATS_PASSWORD, PANGEA_NATS_TOKEN, "
            f"{SEED_SETTING} or {CREDS_SETTING}"
        )
    return "check " + " and ".join(chosen)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
