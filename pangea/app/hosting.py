"""Hosting one role in this process: its bus connection, health server, health file and signals.

SIGTERM/SIGINT first ask a role that can leave gracefully to do so (a worker finishes the
shard in hand), and a second signal cancels; the exit code says which signal ended it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Callable

from pangea import settings as cfg
from pangea.bus.client import Bus


def run_async(main: Callable[[], object], graceful: list | None = None) -> int:
    """Run a coroutine function; SIGTERM/SIGINT cancel it and exit 143/130.

    If `graceful` holds an object with `request_stop()`, the first signal asks it to stop
    and only a second one cancels.
    """

    async def wrapper() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        got: list[int] = []

        def on_signal(sig: int) -> None:
            got.append(sig)
            if graceful and len(got) == 1:
                graceful[0].request_stop()
            else:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await main()
            return 0
        except asyncio.CancelledError:
            return 128 + (got[0] if got else signal.SIGTERM)

    return asyncio.run(wrapper())


def health_server(settings: cfg.BusSettings):
    """The role's /healthz, /readyz and /metrics server, started; None when PANGEA_HTTP_PORT=0."""
    from pangea.telemetry import HealthServer

    if not settings.http_port:
        return None
    port = 0 if settings.http_port == "any" else settings.http_port
    try:
        return HealthServer(port, settings.http_host).start()
    except OSError as exc:
        # Only the default port may move: a port that was asked for is a real conflict, and a
        # bad address stays bad on any port.
        if "http_port" in settings.model_fields_set or exc.errno != errno.EADDRINUSE:
            raise cfg.SettingsError(
                f"cannot serve health/metrics on {settings.http_host} port {port} "
                f"(PANGEA_HTTP_HOST, PANGEA_HTTP_PORT): {exc}"
            ) from None
    # The default port is taken (several roles on one machine): any free port will do.
    health = HealthServer(0, settings.http_host).start()
    logging.getLogger(__name__).warning("port %d is taken: health/metrics on port %d instead", port, health.port)
    return health


def host_role(name: str, settings, build) -> int:
    from pangea.telemetry import write_json_file

    holder: list = []
    health = health_server(settings)
    if settings.health_file:
        try:
            if health:
                health.advertise(settings.health_file)
            else:
                write_json_file(settings.health_file, {"url": None})
        except OSError as exc:
            raise cfg.SettingsError(f"cannot write PANGEA_HEALTH_FILE={settings.health_file}: {exc.strerror}") from None

    async def main() -> None:
        async with Bus.opened(settings, name) as bus:
            if health:
                health.set_ready(True)
                logging.getLogger(__name__).info("health and metrics on %s (/healthz /readyz /metrics)", health.url)
            try:
                role = build(settings, bus)
                if hasattr(role, "request_stop"):
                    holder.append(role)
                await role.run()
            finally:
                if health:
                    health.set_ready(False)

    try:
        return run_async(main, holder)
    finally:
        if health:
            health.stop()
        if settings.health_file:  # a stopped role has no address: a probe must not find one
            settings.health_file.unlink(missing_ok=True)
