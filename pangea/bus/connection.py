"""Opening a NATS connection: credentials and TLS, the first connect, and its one-line failures."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Protocol

import nats
import nats.aio.client
import nats.errors
import nats.js.errors

from pangea import telemetry
from pangea.bus import credentials
from pangea.bus.errors import BusError
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

ACK_TIMEOUT = 10.0  # one acknowledgement; a lost one is resent (the msg id makes that safe)
_PENDING_SIZE = 128 << 20  # client-side buffer while reconnecting
# nats-py reads the socket DEFAULT_BUFFER_SIZE bytes at a time (32 KiB: ~32 reads, parses and
# pauses of the transport per 1 MB chunk), and limits its stream reader by the same figure.
# benchmarks.pipe, three runs each on 2 cores: Pangea's publish -> pull path 0.41 -> 0.44 GB/s
# with 1 MB messages and 0.35 -> 0.44 with 4 MB ones at 1 MiB (uvloop: no gain); benchmarks.round
# K=4, 25M parameters, three pairs: the orchestrator's CPU per round 1.13 -> 0.89 s (medians),
# the round 2.54 -> 2.29 s (noisy: one pair went the other way).  A module
# global of nats-py, read when a connection opens and on each read: set once for the process.
_READ_BYTES = 1 << 20


class Watcher(Protocol):
    """What the connection's callbacks ask of its owner (the Bus)."""

    connected: bool  # the first connection succeeded: later trouble is logged, not raised
    closing: bool  # closing on purpose: a disconnect is expected
    reconnects: int  # times the connection came back: consumers check they still exist


def options(settings: BusSettings) -> dict:
    """nats.connect() keyword arguments for the configured authentication and TLS."""
    found: dict = {}
    if settings.nats_token:
        found["token"] = settings.nats_token.get_secret_value()
    if settings.nats_user:
        found["user"] = settings.nats_user
        found["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    if settings.nats_nkey_seed:
        found["nkeys_seed"] = str(credentials.check_seed_file(settings.nats_nkey_seed))
    if settings.nats_creds:
        found["user_credentials"] = str(credentials.check_creds_file(settings.nats_creds))
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
        found["tls"] = context
    return found


def refused(exc: Exception) -> bool:
    """The server turned the credentials down (unknown user, wrong secret, expired JWT)."""
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text


async def _first_connect(nc, refusal: asyncio.Future, timeout: float, **kwargs) -> None:
    """`nc.connect(**kwargs)` within `timeout` seconds, or the server's refusal as soon as it
    comes: nats-py retries refused credentials like an unreachable server, and they stay wrong."""
    connecting = asyncio.ensure_future(nc.connect(**kwargs))
    done, _ = await asyncio.wait({connecting, refusal}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if connecting in done:
        connecting.result()  # raises what nats-py raised
        return
    connecting.cancel()
    try:
        await nc.close()
    except Exception:  # noqa: BLE001 - a half-open connection: nothing left to close
        pass
    if refusal.done():
        raise refusal.result()
    raise TimeoutError()


def _refusals_reach_their_publish(js) -> None:
    """Make a refused async publish fail its future at once.

    nats-py 2.16's reply handler calls `APIError.from_error`, which raises instead of returning,
    so a refusal ("insufficient resources" from a full store, a wrong sequence...) never reaches
    the publish's future: it goes to the error callback, and the publish waits out its ack
    timeout, 10 s each (nats-io/nats.py issue #985, fix proposed in PR #994).  The handler is
    wrapped here, before the first async publish subscribes it, to hand the refusal to its
    future.  Harmless once nats-py has the fix (nothing is raised to catch then)."""
    handle = js._handle_async_reply

    async def handle_refusals(msg) -> None:
        try:
            await handle(msg)
        except nats.js.errors.APIError as exc:
            token = msg.subject[len(js._async_reply_prefix) :]
            future = js._publish_async_futures.get(token)
            if future is not None and not future.done():
                future.set_exception(exc)

    js._handle_async_reply = handle_refusals


async def open_connection(settings: BusSettings, name: str, watcher: Watcher, publish_pending: int):
    """(nc, js) connected to the configured server with JetStream, retrying until
    `connect_timeout`; BusError in one line (the URL, or what to change) if that fails."""
    servers = settings.servers
    if not servers:
        raise BusError("no NATS URL: set PANGEA_NATS_URL (pangea run starts an embedded server)")
    try:
        kwargs = options(settings)
    except credentials.CredentialsError as exc:
        raise BusError(str(exc)) from None
    refusal: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        # Before the first connection the caller reports the failure in one line.
        if watcher.connected and not watcher.closing:
            log.warning("nats: %s", exc)
        elif refused(exc) and not refusal.done():
            refusal.set_result(exc)

    async def on_disconnect() -> None:
        # Before the first connection a disconnect is part of a failed attempt, reported once.
        if watcher.connected and not watcher.closing:
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        telemetry.RECONNECTS.inc()
        watcher.reconnects += 1
        log.warning("reconnected to NATS")

    nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, _READ_BYTES)
    nc = nats.NATS()
    try:
        await _first_connect(
            nc,
            refusal,
            settings.connect_timeout,
            **kwargs,
            servers=servers,
            name=f"pangea-{settings.job}-{name}",
            connect_timeout=min(2.0, settings.connect_timeout),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=_PENDING_SIZE,
        )
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        if refused(exc):
            raise BusError(
                f"NATS at {settings.nats_url} refused our credentials ({exc}): " + credentials.auth_settings(settings)
            ) from None
        raise BusError(
            f"cannot reach NATS at {settings.nats_url} within {settings.connect_timeout:g}s"
            + (f" ({exc})" if str(exc) else "")
        ) from None
    js = nc.jetstream(timeout=ACK_TIMEOUT, publish_async_max_pending=publish_pending)
    _refusals_reach_their_publish(js)
    try:
        await js.account_info()
    except (nats.js.errors.Error, nats.errors.Error) as exc:
        await nc.close()
        raise BusError(f"NATS at {settings.nats_url} has no JetStream (start nats-server with -js): {exc}") from None
    return nc, js
