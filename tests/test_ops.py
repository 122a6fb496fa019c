"""Operations: health and Prometheus metrics of live roles, JSON logs, and `pangea plot`."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pangea.bus.server import EmbeddedServer, free_port
from tests.conftest import pangea_cmd, role_env, run_pangea


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _wait(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition never held")


def test_readyz_follows_the_bus_connection(job, tmp_path):
    """/readyz is 503 while the role cannot reach NATS and 200 once it is connected."""
    nats_port, http_port = free_port(), free_port()
    env = role_env(f"nats://127.0.0.1:{nats_port}", job=job, http_port=http_port, connect_timeout=60)
    worker = subprocess.Popen(pangea_cmd("worker"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = EmbeddedServer(tmp_path / "store", port=nats_port)
    try:
        _wait(lambda: _get(http_port, "/healthz")[0] == 200)
        assert _get(http_port, "/readyz")[0] == 503
        server.start()
        _wait(lambda: _get(http_port, "/readyz")[0] == 200)
        status, text = _get(http_port, "/metrics")
        assert status == 200 and "pangea_ready 1.0" in text
    finally:
        worker.kill()
        worker.wait()
        server.stop()


def test_metrics_advance_during_a_run(nats_url, job, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        pangea_cmd("--log-format", "json", "run", "--job", job, "--workers", "2", "--epochs", "6", "--out", str(out)),
        env=role_env(nats_url, test_delay=0.02), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait(lambda: (out / "ports.json").exists() and len(json.loads((out / "ports.json").read_text())) == 4)
        ports = json.loads((out / "ports.json").read_text())
        orch = ports["orchestrator"]
        _wait(lambda: _metric(_get(orch, "/metrics")[1], "pangea_rounds_total") >= 5)
        first = _metric(_get(orch, "/metrics")[1], "pangea_rounds_total")
        _wait(lambda: _metric(_get(orch, "/metrics")[1], "pangea_rounds_total") > first + 5)
        text = _get(orch, "/metrics")[1]
        for name in ("pangea_round_seconds_count", "pangea_samples_total", "pangea_loss", "pangea_members",
                     "pangea_bytes_published_total", "pangea_bytes_received_total"):
            assert _metric(text, name) > 0, name
        assert _metric(_get(ports["worker-0"], "/metrics")[1], "pangea_shards_total") > 0
        assert _get(ports["worker-1"], "/readyz")[0] == 200
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in (out / "logs" / "orchestrator.log").read_text().splitlines()
             if line.startswith("{")]
    assert lines and all({"time", "level", "message", "role", "job"} <= set(e) for e in lines)
    assert any("round" in e for e in lines), "a log line about a round carries the round number"


def test_plot_writes_a_png(nats_url, job, tmp_path):
    out = tmp_path / "run"
    assert run_pangea("run", "--job", job, "--epochs", "2", "--out", str(out), env=role_env(nats_url)).returncode == 0
    result = run_pangea("plot", str(out), env=role_env())
    assert result.returncode == 0, result.stderr
    png = Path(result.stdout.strip().split()[-1])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    missing = run_pangea("plot", str(tmp_path / "nothing"), env=role_env())
    assert missing.returncode == 2 and "metrics.json" in missing.stderr and "Traceback" not in missing.stderr
