"""Least privilege on the bus: what each role may publish and subscribe to, as nats-server
configuration.  Used by `pangea run --secure` (generated users) and for `infra/nats/`.

With pull consumers a worker never subscribes to a batch subject: it asks its own consumer
for the next message.  So "a worker reads only its own batches" means it may create and pull
only the consumers named after it; "only the preprocessor publishes batches" and "only the
orchestrator publishes parameters and plans" are plain publish permissions.
"""

from __future__ import annotations

import json
import secrets

from pangea.bus import subjects

API = "$JS.API"
_COMMON_PUBLISH = [f"{API}.INFO", f"{API}.STREAM.INFO.>", f"{API}.DIRECT.GET.>", f"{API}.STREAM.MSG.GET.>"]
_COMMON_SUBSCRIBE = ["_INBOX.>"]
MAX_SHARDS = 16  # settings.OrchestratorSettings.shards allows at most this many


def role_permissions(job: str, role: str, worker: str | None = None, shard: int | None = None) -> dict[str, list[str]]:
    """{"publish": [...], "subscribe": [...]} for one role of one job (worker None: any worker id;
    shard None: any orchestrator shard)."""
    batches, params = subjects.stream(job, "batches"), subjects.stream(job, "params")
    if role == "orchestrator":  # owns the job: creates its streams, buckets and consumers
        publish = [f"{API}.>", subjects.plans(job), subjects.params(job), subjects.rounds(job), "$JS.ACK.>",
                   f"$KV.{subjects.job_bucket(job)}.>", f"$KV.{subjects.members_bucket(job)}.>",
                   f"$O.{subjects.checkpoint_bucket(job)}.>"]
        return {"publish": publish, "subscribe": [*_COMMON_SUBSCRIBE, subjects.grads(job), subjects.reduced(job)]}
    if role == "reducer":  # orchestrator shards: read plans and their gradient slice, publish its mean
        names = [f"shard-{shard}"] if shard else [f"shard-{i}" for i in range(1, MAX_SHARDS)]
        publish = [*_COMMON_PUBLISH, subjects.reduced(job)]
        for name, stream, subject in [(n, *where) for n in names for where in (
                (subjects.stream(job, "plans"), subjects.plans(job)),
                (subjects.stream(job, "grads"), subjects.grads(job, int(n.split("-")[1]))))]:
            publish += [f"{API}.CONSUMER.CREATE.{stream}.{name}.{subject}", f"{API}.CONSUMER.INFO.{stream}.{name}",
                        f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}", f"$JS.ACK.{stream}.{name}.>"]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "preprocessor":
        plans = subjects.stream(job, "plans")
        publish = [*_COMMON_PUBLISH, subjects.batches(job), f"{API}.CONSUMER.CREATE.{plans}.preprocessor.>",
                   f"{API}.CONSUMER.INFO.{plans}.preprocessor", f"{API}.CONSUMER.MSG.NEXT.{plans}.preprocessor",
                   f"{API}.STREAM.PURGE.{batches}", f"$JS.ACK.{plans}.preprocessor.>"]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "worker":
        me = worker or "*"
        own = [(batches, subjects.worker_consumer(me), subjects.batches(job, me)),
               (params, f"params-{me}", subjects.params(job))]
        publish = [*_COMMON_PUBLISH, subjects.grads(job), subjects.shard_grads(job), f"$KV.{subjects.members_bucket(job)}.{me}"]
        for stream, consumer, subject in own:
            publish += [f"{API}.CONSUMER.CREATE.{stream}.{consumer}.{subject}", f"{API}.CONSUMER.INFO.{stream}.{consumer}",
                        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"$JS.ACK.{stream}.{consumer}.>"]
        return {"publish": publish, "subscribe": list(_COMMON_SUBSCRIBE)}
    if role == "observer":  # `pangea run`'s progress display, `pangea status`
        return {"publish": list(_COMMON_PUBLISH) + [f"{API}.CONSUMER.INFO.>"],
                "subscribe": [*_COMMON_SUBSCRIBE, subjects.rounds(job)]}
    raise ValueError(f"unknown role {role!r}")


def new_password() -> str:
    return secrets.token_urlsafe(24)


def authorization_block(users: dict[str, tuple[str, dict[str, list[str]]]]) -> str:
    """nats-server `authorization { users = [...] }` for {user: (password, permissions)}."""
    entries = []
    for user, (password, perms) in users.items():
        allow = {k: {"allow": v} for k, v in perms.items()}
        entries.append(
            f"    {{user: {json.dumps(user)}, password: {json.dumps(password)}, permissions: {json.dumps(allow)}}}"
        )
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"


def job_users(job: str, workers: list[str], shards: int = 1) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """A user with a fresh password per role of the job, one per worker id and per orchestrator shard."""
    users = {role: (new_password(), role_permissions(job, role)) for role in ("orchestrator", "preprocessor", "observer")}
    for worker in workers:
        users[worker] = (new_password(), role_permissions(job, "worker", worker))
    for shard in range(1, shards):
        users[f"shard-{shard}"] = (new_password(), role_permissions(job, "reducer", shard=shard))
    return users


def server_config(job: str) -> str:
    """A nats-server configuration for one job: JetStream plus a user per role.

    Passwords are environment references ($PANGEA_<ROLE>_PASSWORD) that nats-server expands
    at start, so the file holds no secret.  Workers share the user `worker` (any worker id):
    give each worker its own user, as `job_users` does, to also keep workers out of each
    other's consumers.
    """
    users = {
        role: (f"${'PANGEA_' + role.upper() + '_PASSWORD'}", role_permissions(job, role))
        for role in ("orchestrator", "preprocessor", "observer", "worker", "reducer")
    }
    block = _unquote_variables(authorization_block(users))
    return (
        f"# nats-server configuration for the Pangea job {job!r}: generated by\n"
        f"#   python -m pangea.bus.security --job {job}\n"
        "# Start with the passwords in the environment, e.g.\n"
        "#   PANGEA_ORCHESTRATOR_PASSWORD=... PANGEA_PREPROCESSOR_PASSWORD=... PANGEA_OBSERVER_PASSWORD=... \\\n"
        "#   PANGEA_WORKER_PASSWORD=... PANGEA_REDUCER_PASSWORD=... nats-server -c pangea-secure.conf\n"
        "# and give each role PANGEA_NATS_USER=<role> PANGEA_NATS_PASSWORD=<its password>.\n"
        'listen: "0.0.0.0:4222"\n'
        'http: "0.0.0.0:8222"\n'
        'jetstream { store_dir: "/data" }\n'
        + block
    )


def _unquote_variables(text: str) -> str:
    """nats-server expands `$NAME` only when it is not quoted."""
    import re

    return re.sub(r'"(\$PANGEA_[A-Z_]+)"', r"\1", text)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="print a least-privilege nats-server config for a job")
    parser.add_argument("--job", required=True)
    print(server_config(parser.parse_args().job), end="")
