"""Issue one NATS user per role of a job, each with least-privilege permissions: as a password,
an NKey or a JWT, with the server configuration that trusts them.

- password: the server's config holds every password (a shared secret per user).
- nkey: the server holds public keys only; each user's secret is its seed file.
- jwt: the server trusts an operator and its account; each user's JWT, signed by the
  account, carries the user's permissions, and its creds file (JWT + seed) is its secret.

Keys and JWTs are made with the `nkeys` library and `pangea.bus.jwt`, no `nk` or `nsc`.  Seed
and creds files are written mode 0600 into `keys_dir`; `pangea run --secure` gives each role
only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nkeys
from pydantic import SecretStr

from pangea.bus import auth_config, jwt, keys

METHODS = ("password", "nkey", "jwt")
ACCOUNT = "pangea"


@dataclass(kw_only=True, frozen=True)
class Issued:
    """What one issue of users gives: the server's side and each user's."""

    method: str
    server_config: str  # the authorization block (password, nkey) or the operator block (jwt)
    logins: dict[str, dict]  # user -> the BusSettings fields it connects with
    public_keys: dict[str, str]  # user -> its NKey public key (nkey, jwt)

    def env(self, user: str) -> dict[str, str]:
        """The PANGEA_* variables that log `user` in."""
        return {
            f"PANGEA_{key.upper()}": value.get_secret_value() if isinstance(value, SecretStr) else str(value)
            for key, value in self.logins[user].items()
        }


def issue(method: str, users: dict[str, dict[str, list[str]]], keys_dir: Path | None = None) -> Issued:
    """Users {name: permissions} (pangea.bus.security.job_roles) by `method`; nkey and jwt write into `keys_dir`."""
    if method == "password":
        passwords = {user: (auth_config.new_password(), perms) for user, perms in users.items()}
        return Issued(
            method=method,
            server_config=auth_config.authorization_block(passwords),
            public_keys={},
            logins={user: {"nats_user": user, "nats_password": SecretStr(p)} for user, (p, _) in passwords.items()},
        )
    if keys_dir is None:
        raise ValueError(f"{method} users need a directory for their seed files")
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    seeds = {user: keys.new_seed("user") for user in users}
    public = {user: keys.public_key(seed) for user, seed in seeds.items()}
    if method == "nkey":
        config = auth_config.nkey_authorization_block({user: (public[user], perms) for user, perms in users.items()})
        logins = {
            user: {"nats_nkey_seed": keys.write_seed(keys_dir / f"{user}.nk", seed)} for user, seed in seeds.items()
        }
        return Issued(method=method, server_config=config, logins=logins, public_keys=public)
    if method == "jwt":
        trust = new_trust()
        logins = {
            user: {"nats_creds": write_creds(trust, keys_dir / f"{user}.creds", user, perms, seeds[user])}
            for user, perms in users.items()
        }
        return Issued(method=method, server_config=trust.server_config, logins=logins, public_keys=public)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


@dataclass(kw_only=True, frozen=True)
class Trust:
    """A fresh operator, its system account and the job's account: what a JWT server trusts.

    The operator's and the system account's seeds are not kept: issuing again makes a new chain.
    """

    server_config: str  # the operator block: operator JWT and the accounts' JWTs, no secret
    account: nkeys.KeyPair  # signs the users


def new_trust() -> Trust:
    operator = keys.keypair(keys.new_seed("operator"))
    system, account = (keys.keypair(keys.new_seed("account")) for _ in range(2))
    system_key, account_key = system.public_key.decode(), account.public_key.decode()
    accounts = {
        system_key: jwt.account_jwt(operator, system_key, "SYS", jetstream=False),
        account_key: jwt.account_jwt(operator, account_key, ACCOUNT),
    }
    token = jwt.operator_jwt(operator, "pangea", system_account=system_key)
    return Trust(server_config=auth_config.operator_block(token, system_key, accounts), account=account)


def write_creds(
    trust: Trust,
    path: Path,
    user: str,
    permissions: dict[str, list[str]],
    seed: bytes | None = None,
    *,
    expires: int | None = None,
) -> Path:
    """A creds file (0600) for `user` with `permissions`, signed by the trust's account."""
    seed = seed or keys.new_seed("user")
    token = jwt.user_jwt(trust.account, keys.public_key(seed), user, permissions, expires=expires)
    return keys.write_private(path, jwt.creds(token, seed))
