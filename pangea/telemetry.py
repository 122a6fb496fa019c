"""Prometheus metrics and the /healthz, /readyz, /metrics endpoints of a long-running role.

No NATS here: roles and the bus update the counters, `HealthServer` serves them from a
daemon thread (stdlib http.server), so a busy event loop never makes a probe time out.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ROUNDS = Counter("pangea_rounds", "optimizer steps taken", registry=REGISTRY)
ROUND_SECONDS = Histogram(
    "pangea_round_seconds", "duration of a round", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SAMPLES = Counter("pangea_samples", "training samples aggregated (rate() gives samples/s)", registry=REGISTRY)
LOSS = Gauge("pangea_loss", "mean training loss of the last round", registry=REGISTRY)
MEMBERS = Gauge("pangea_members", "live workers in the last round plan", registry=REGISTRY)
SHARDS = Counter("pangea_shards", "shards computed by this worker", registry=REGISTRY)
REJECTED = Counter("pangea_rejected", "messages refused, by reason", ["reason"], registry=REGISTRY)
BYTES_OUT = Counter("pangea_bytes_published", "payload bytes published to JetStream", registry=REGISTRY)
BYTES_IN = Counter("pangea_bytes_received", "payload bytes pulled from JetStream", registry=REGISTRY)
RECONNECTS = Counter("pangea_reconnects", "reconnections to NATS", registry=REGISTRY)
READY = Gauge("pangea_ready", "1 once connected to NATS", registry=REGISTRY)


class HealthServer:
    """Serves /healthz (alive), /readyz (connected to the bus) and /metrics on `port`."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.ready = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok = server.ready
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not connected to NATS\n", "text/plain")
                elif path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: keep the log quiet
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.debug("health and metrics on http://127.0.0.1:%d", self.port)
        return self

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        READY.set(1 if ready else 0)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
