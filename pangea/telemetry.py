"""Prometheus metrics and the /healthz, /readyz, /metrics endpoints of a long-running role.

No NATS here: roles and the bus update the counters, `HealthServer` serves them from a
daemon thread (stdlib http.server), so a busy event loop never makes a probe time out.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pangea.probe import INSTANCE_HEADER

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ROUNDS = Counter("pangea_rounds", "optimizer steps taken", registry=REGISTRY)
ROUND_SECONDS = Histogram(
    "pangea_round_seconds",
    "duration of a round",
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SAMPLES = Counter("pangea_samples", "training samples aggregated (rate() gives samples/s)", registry=REGISTRY)
TOKENS = Counter("pangea_tokens", "lm: target tokens aggregated (rate() gives tokens/s)", registry=REGISTRY)
LOSS = Gauge("pangea_loss", "mean training loss of the last round", registry=REGISTRY)
MEMBERS = Gauge("pangea_members", "live workers in the last round plan", registry=REGISTRY)
DESIRED = Gauge(
    "pangea_desired_workers",
    "workers the orchestrator asks for: the autoscaling signal (0: job finished)",
    registry=REGISTRY,
)
SHARDS = Counter("pangea_shards", "shards computed by this worker", registry=REGISTRY)
REJECTED = Counter("pangea_rejected", "messages refused, by reason", ["reason"], registry=REGISTRY)
BYTES_OUT = Counter("pangea_bytes_published", "payload bytes published to JetStream", registry=REGISTRY)
BYTES_IN = Counter("pangea_bytes_received", "payload bytes pulled from JetStream", registry=REGISTRY)
RECONNECTS = Counter("pangea_reconnects", "reconnections to NATS", registry=REGISTRY)
STORE_FULL = Counter(
    "pangea_store_full",
    "times JetStream refused a publish for want of storage (the role then waits for room)",
    registry=REGISTRY,
)
READY = Gauge("pangea_ready", "1 once connected to NATS", registry=REGISTRY)

# The orchestrator's autoscaling signal as /autoscale serves it (KEDA's metrics-api scaler reads
# `desired` there; `pangea autoscale` reads the same from the job bucket).
AUTOSCALE: dict = {"desired": 0, "why": "no job here"}


class HealthServer:
    """Serves /healthz (alive), /readyz (connected to the bus), /metrics and /autoscale (the
    orchestrator's desired workers, JSON) on `host`:`port` (0: a free one)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.ready = False
        self.instance = secrets.token_hex(8)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain", {INSTANCE_HEADER: server.instance})
                elif path == "/readyz":
                    ok = server.ready
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not connected to NATS\n", "text/plain")
                elif path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/autoscale":
                    self._send(200, json.dumps(AUTOSCALE).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: keep the log quiet
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._httpd = Server((host, port), Handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True)

    @property
    def url(self) -> str:
        """Where a client on this host reaches the server (a wildcard bind answers on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        self._thread.start()
        log.debug("health and metrics on %s", self.url)
        return self

    def advertise(self, path: Path) -> None:
        """Write this server's address and instance to `path` (atomically), for `pangea.probe`."""
        write_json_file(path, {"url": self.url, "instance": self.instance})

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        READY.set(1 if ready else 0)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def write_json_file(path: Path, record: dict) -> None:
    """Write `record` so that a reader never sees half of it: the health record `python -m pangea.probe`
    reads ({"url": null} says the server is off), and `pangea run`'s pids.json and ports.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)  # a probe never reads half a file
