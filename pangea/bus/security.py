"""Least privilege on the bus: what each role may publish and subscribe to, as nats-server
configuration.  Used by `pangea run --secure` (generated users) and for `infra/nats/`.

Three ways for the server to know the users: passwords and NKeys in its `authorization`
block (`auth_config.authorization_block`, `nkey_authorization_block`), or decentralized JWTs, where it
trusts an operator and its accounts (`operator_block`) and each user JWT carries the
permissions.  `identities` issues the users; `python -m pangea.bus.security` prints a config.

With pull consumers a worker never subscribes to a batch subject: it asks its own consumer
for the next message.  So "a worker reads only its own batches" means it may create and pull
only the consumers named after it; "only the preprocessor publishes batches" and "only the
orchestrator publishes parameters and plans" are plain publish permissions.

Pickled user code (`pickle:<sha256>`, `pangea.roles.code`): only the orchestrator may write
the job's code bucket.  No role may create a consumer on it, so a worker cannot fetch it the way
`fetch_code` does: under these permissions a worker takes pickled code from its local
PANGEA_CODE_DIR only (`pangea run --secure` starts its workers on the machine that wrote the
code, with that directory).  Every role's stream-read grants (`STREAM.MSG.GET`, `DIRECT.GET`, for
any stream) do reach the bucket's stream, as they reach the checkpoints': a worker can read the
bytes by sequence number, never write or replace them.  To let remote workers fetch the code,
grant them consuming `OBJ_pangea_<job>_code` by hand (and PANGEA_ALLOW_PICKLED_CODE=true on each).
"""

from __future__ import annotations

import json
from pathlib import Path

from pangea.bus import subjects
from pangea.bus.auth_config import authorization_block, new_password, nkey_authorization_block

API = "$JS.API"
_COMMON_PUBLISH = [f"{API}.INFO", f"{API}.STREAM.INFO.>", f"{API}.DIRECT.GET.>", f"{API}.STREAM.MSG.GET.>"]
_COMMON_SUBSCRIBE = ["_INBOX.>"]
MAX_SHARDS = 16  # settings.OrchestratorSettings.shards allows at most this many


def role_permissions(job: str, role: str, worker: str | None = None, shard: int | None = None) -> dict[str, list[str]]:
    """{"publish": [...], "subscribe": [...]} for one role of one job (worker None: any worker id;
    shard None: any orchestrator shard)."""
    batches, params = subjects.stream(job, "batches"), subjects.stream(job, "params")
    if role == "orchestrator":  # owns the job: creates its streams, buckets and consumers
        publish = [
            f"{API}.>",
            subjects.plans(job),
            subjects.params(job),
            subjects.rounds(job),
            "$JS.ACK.>",
            f"$KV.{subjects.job_bucket(job)}.>",
            f"$KV.{subjects.members_bucket(job)}.>",
            f"$O.{subjects.checkpoint_bucket(job)}.>",
            f"$O.{subjects.code_bucket(job)}.>",  # pickled user code, for workers that may fetch it
        ]
        return {"publish": publish, "subscribe": [*_COMMON_SUBSCRIBE, subjects.grads(job), subjects.reduced(job)]}
    if role == "reducer":  # orchestrator shards: read plans and their gradient slice, publish its mean
        names = [f"shard-{shard}"] if shard else [f"shard-{i}" for i in range(1, MAX_SHARDS)]
        publish = [*_COMMON_PUBLISH, subjects.reduced(job)]
        for name, stream, subject in [
            (n, *where)
            for n in names
            for where in (
                (subjects.stream(job, "plans"), subjects.plans(job)),
                (subjects.stream(job, "grads"), subjects.grads(job, int(n.split("-")[1]))),
            )
        ]:
            publish += [
                f"{API}.CONSUMER.CREATE.{stream}.{name}.{subject}",
                f"{API}.CONSUMER.INFO.{stream}.{name}",
                f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}",
                f"$JS.ACK.{stream}.{name}.>",
            ]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "preprocessor":
        plans = subjects.stream(job, "plans")
        publish = [
            *_COMMON_PUBLISH,
            subjects.batches(job),
            f"{API}.CONSUMER.CREATE.{plans}.preprocessor.>",
            f"{API}.CONSUMER.INFO.{plans}.preprocessor",
            f"{API}.CONSUMER.MSG.NEXT.{plans}.preprocessor",
            f"{API}.STREAM.PURGE.{batches}",
            f"$JS.ACK.{plans}.preprocessor.>",
            f"$KV.{subjects.job_bucket(job)}.{subjects.JobKey.PREPROCESSOR}",  # "my data is loaded"
        ]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "worker":
        me = worker or "*"
        own = [
            (batches, subjects.worker_consumer(me), subjects.batches(job, me)),
            (params, f"params-{me}", subjects.params(job)),
        ]
        publish = [
            *_COMMON_PUBLISH,
            subjects.grads(job),
            subjects.shard_grads(job),
            f"$KV.{subjects.members_bucket(job)}.{me}",
        ]
        for stream, consumer, subject in own:
            publish += [
                f"{API}.CONSUMER.CREATE.{stream}.{consumer}.{subject}",
                f"{API}.CONSUMER.INFO.{stream}.{consumer}",
                f"{API}.CONSUMER.DELETE.{stream}.{consumer}",  # a restart takes its consumer over
                f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                f"$JS.ACK.{stream}.{consumer}.>",
            ]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "observer":  # `pangea run`'s progress display, `pangea status`
        return {
            "publish": list(_COMMON_PUBLISH) + [f"{API}.CONSUMER.INFO.>"],
            "subscribe": [*_COMMON_SUBSCRIBE, subjects.rounds(job)],
        }
    raise ValueError(f"unknown role {role!r}")


def job_roles(job: str, workers: list[str], shards: int = 1) -> dict[str, dict[str, list[str]]]:
    """{user: permissions} for every role of the job: one user per worker id and per orchestrator shard."""
    users = {role: role_permissions(job, role) for role in ("orchestrator", "preprocessor", "observer")}
    for worker in workers:
        users[worker] = role_permissions(job, "worker", worker)
    for shard in range(1, shards):
        users[f"shard-{shard}"] = role_permissions(job, "reducer", shard=shard)
    return users


def job_users(job: str, workers: list[str], shards: int = 1) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """A user with a fresh password per role of the job, one per worker id and per orchestrator shard."""
    return {user: (new_password(), perms) for user, perms in job_roles(job, workers, shards).items()}


SHARED_ROLES = ("orchestrator", "preprocessor", "observer", "worker", "reducer")
TRUST_FILE = "pangea-trust.conf"  # --auth jwt: the operator block, written next to the server's config
NKEYS_ENV = "pangea-nkeys.env"  # --auth nkey: the roles' public keys, for the server's environment
_LISTEN = 'listen: "0.0.0.0:4222"\nhttp: "0.0.0.0:8222"\njetstream { store_dir: "/data" }\n'


def shared_roles(job: str) -> dict[str, dict[str, list[str]]]:
    """{role: permissions} with one user per role: workers share `worker`, shards `reducer`."""
    return {role: role_permissions(job, role) for role in SHARED_ROLES}


def server_config(job: str, auth: str = "password") -> str:
    """A nats-server configuration for one job: JetStream plus a user per role, holding no secret.

    password: the passwords are environment references ($PANGEA_<ROLE>_PASSWORD) that
    nats-server expands at start.  nkey: so are the public keys ($PANGEA_<ROLE>_NKEY).  jwt:
    the server trusts an operator whose block is included from `pangea-trust.conf`; the
    permissions are in the users' JWTs.  Workers share the user `worker` (any worker id):
    give each worker its own user, as `job_users` does, to also keep workers out of each
    other's consumers.
    """
    flag = "" if auth == "password" else f" --auth {auth}"
    head = (
        f"# nats-server configuration for the Pangea job {job!r}: generated by\n"
        f"#   python -m pangea.bus.security --job {job}{flag}\n"
    )
    if auth == "password":
        users = {
            role: (f"${'PANGEA_' + role.upper() + '_PASSWORD'}", perms) for role, perms in shared_roles(job).items()
        }
        return (
            head + "# Start with the passwords in the environment, e.g.\n"
            "#   PANGEA_ORCHESTRATOR_PASSWORD=... PANGEA_PREPROCESSOR_PASSWORD=... PANGEA_OBSERVER_PASSWORD=... \\\n"
            "#   PANGEA_WORKER_PASSWORD=... PANGEA_REDUCER_PASSWORD=... nats-server -c pangea-secure.conf\n"
            "# and give each role PANGEA_NATS_USER=<role> PANGEA_NATS_PASSWORD=<its password>.\n"
            + _LISTEN
            + _unquote_variables(authorization_block(users))
        )
    if auth == "nkey":
        users = {role: (f"${'PANGEA_' + role.upper() + '_NKEY'}", perms) for role, perms in shared_roles(job).items()}
        return (
            head + "# The server holds public keys only, from the environment: with the keys made by\n"
            f"#   python -m pangea.bus.security --job {job} --auth nkey --keys DIR\n"
            f"# start it as  set -a; . DIR/{NKEYS_ENV}; set +a; nats-server -c pangea-nkey.conf\n"
            "# and give each role PANGEA_NATS_NKEY_SEED=DIR/<role>.nk (its seed: only that role's host needs it).\n"
            + _LISTEN
            + _unquote_variables(nkey_authorization_block(users))
        )
    if auth == "jwt":
        return (
            head + "# Decentralized auth: the server trusts an operator and its accounts, and never sees a\n"
            "# user: each user's JWT, signed by the account, carries that role's permissions.\n"
            f"#   python -m pangea.bus.security --job {job} --auth jwt --keys DIR\n"
            f"# writes DIR/{TRUST_FILE} (operator and account JWTs, no secret: put it next to this\n"
            "# file) and DIR/<role>.creds: give each role PANGEA_NATS_CREDS=<its creds file>.\n"
            + _LISTEN
            + f"include {json.dumps(TRUST_FILE)}\n"
        )
    raise ValueError(f"unknown auth {auth!r}")


def _unquote_variables(text: str) -> str:
    """nats-server expands `$NAME` only when it is not quoted."""
    import re

    return re.sub(r'"(\$PANGEA_[A-Z_]+)"', r"\1", text)


def write_keys(job: str, auth: str, keys_dir: Path) -> list[Path]:
    """--keys: issue the shared roles' seed (nkey) or creds (jwt) files and the server's public part."""
    from pangea.bus import identities  # it builds on this module

    issued = identities.issue(auth, shared_roles(job), keys_dir)
    if auth == "nkey":
        public = keys_dir / NKEYS_ENV
        public.write_text("".join(f"PANGEA_{role.upper()}_NKEY={key}\n" for role, key in issued.public_keys.items()))
    else:
        public = keys_dir / TRUST_FILE
        public.write_text(issued.server_config)
    return [public, *(path for login in issued.logins.values() for path in login.values())]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="print a least-privilege nats-server config for a job")
    parser.add_argument("--job", required=True)
    parser.add_argument(
        "--auth",
        choices=("password", "nkey", "jwt"),
        default="password",
        help="how the server knows the users (default password)",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="nkey, jwt: also make each role's seed or creds file (mode 0600) and the server's "
        f"public part ({NKEYS_ENV} or {TRUST_FILE}) in DIR",
    )
    args = parser.parse_args(argv)
    if args.keys and args.auth == "password":
        parser.error("--keys makes NKeys or JWTs: use it with --auth nkey or --auth jwt")
    if args.keys:
        try:
            written = write_keys(args.job, args.auth, args.keys)
        except ImportError as exc:
            parser.error(f"--keys needs the nkeys package ({exc}): pip install 'nats-py[nkeys]'")
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    print(server_config(args.job, args.auth), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
