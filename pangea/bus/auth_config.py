"""The nats-server configuration blocks for each way a server knows its users: passwords and
NKeys in `authorization { users = [...] }`, or trust in an operator and its accounts (JWTs).
Pure text: `security` says what each role may do, `identities` issues the users."""

from __future__ import annotations

import json
import secrets


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _allow(perms: dict[str, list[str]]) -> str:
    return json.dumps({k: {"allow": v} for k, v in perms.items()})


def _users_block(entries: list[str]) -> str:
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"


def authorization_block(users: dict[str, tuple[str, dict[str, list[str]]]]) -> str:
    """nats-server `authorization { users = [...] }` for {user: (password, permissions)}."""
    return _users_block(
        [
            f"    {{user: {json.dumps(user)}, password: {json.dumps(password)}, permissions: {_allow(perms)}}}"
            for user, (password, perms) in users.items()
        ]
    )


def nkey_authorization_block(users: dict[str, tuple[str, dict[str, list[str]]]]) -> str:
    """`authorization { users = [...] }` for {name: (NKey public key, permissions)}: the server
    holds public keys only, and knows a user by its key (the name is a comment)."""
    return _users_block(
        [
            f"    # {name}\n    {{nkey: {json.dumps(public_key)}, permissions: {_allow(perms)}}}"
            for name, (public_key, perms) in users.items()
        ]
    )


def operator_block(operator_jwt: str, system_account: str, accounts: dict[str, str]) -> str:
    """Decentralized auth: trust `operator_jwt` and preload {account public key: account JWT}.

    The MEMORY resolver knows exactly the preloaded accounts; users need no server entry at all
    (their JWTs, signed by an account, carry their permissions).
    """
    preload = "\n".join(f"  {json.dumps(key)}: {json.dumps(token)}" for key, token in accounts.items())
    return (
        f"operator: {json.dumps(operator_jwt)}\nsystem_account: {json.dumps(system_account)}\n"
        f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n"
    )
