"""Operations: health and Prometheus metrics of live roles, JSON logs, and `pangea plot`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pangea.bus.server import EmbeddedServer, free_port
from tests.helpers import pangea_cmd, role_env, run_pangea
from tests.yardstick import reference


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
        env=role_env(nats_url, test_delay=0.02, http_port=free_port()),  # on: each role gets a free port
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: (out / "ports.json").exists() and len(json.loads((out / "ports.json").read_text())) == 4)
        ports = json.loads((out / "ports.json").read_text())
        orch = ports["orchestrator"]
        _wait(lambda: _metric(_get(orch, "/metrics")[1], "pangea_rounds_total") >= 5)
        first = _metric(_get(orch, "/metrics")[1], "pangea_rounds_total")
        _wait(lambda: _metric(_get(orch, "/metrics")[1], "pangea_rounds_total") > first + 5)
        text = _get(orch, "/metrics")[1]
        for name in (
            "pangea_round_seconds_count",
            "pangea_samples_total",
            "pangea_loss",
            "pangea_members",
            "pangea_desired_workers",  # the autoscaling signal: --workers while nothing says otherwise
            "pangea_bytes_published_total",
            "pangea_bytes_received_total",
        ):
            assert _metric(text, name) > 0, name
        assert _metric(_get(ports["worker-0"], "/metrics")[1], "pangea_shards_total") > 0
        assert _get(ports["worker-1"], "/readyz")[0] == 200
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    lines = [
        json.loads(line)
        for line in (out / "logs" / "orchestrator.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert lines and all({"time", "level", "message", "role", "job"} <= set(e) for e in lines)
    assert any("round" in e for e in lines), "a log line about a round carries the round number"


@pytest.mark.slow  # moved out of the default run to keep it near 10 minutes; .ci/run runs it
def test_plot_writes_a_png(tmp_path):
    """`pangea plot` reads any run's metrics.json: the reference's is the quickest to make."""
    out = reference(tmp_path / "run", epochs=2)
    result = run_pangea("plot", str(out), env=role_env())
    assert result.returncode == 0, result.stderr
    png = Path(result.stdout.strip().split()[-1])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    missing = run_pangea("plot", str(tmp_path / "nothing"), env=role_env())
    assert missing.returncode == 2 and "metrics.json" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------- health checks of roles that share a network


def _listening(port: int) -> set[str]:
    """The addresses a TCP socket on this port listens on (Linux's /proc/net/tcp, IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _probe(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pangea.probe", str(path)], capture_output=True, text=True, timeout=30)


def _waiting_worker(tmp_path: Path, name: str, **settings) -> subprocess.Popen:
    """A worker that serves its health endpoints while it waits for a NATS server that is not there."""
    env = role_env(
        f"nats://127.0.0.1:{free_port()}", connect_timeout=120, health_file=tmp_path / f"{name}.json", **settings
    )
    return subprocess.Popen(pangea_cmd("worker"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_roles_sharing_a_network_take_free_ports_and_each_check_asks_its_own(tmp_path):
    """PANGEA_HTTP_PORT=any (compose's host network): no collision, and a probe that reaches
    another role's server on the address it was given fails instead of passing."""
    workers = [_waiting_worker(tmp_path, name, http_port="any") for name in ("a", "b")]
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    try:
        _wait(lambda: all(f.exists() for f in files))
        a, b = (json.loads(f.read_text()) for f in files)
        assert a["url"] != b["url"] and all(w.poll() is None for w in workers), "both serve, on ports of their own"
        for f in files:
            assert _probe(f).returncode == 0
        (tmp_path / "wrong.json").write_text(json.dumps({"url": b["url"], "instance": a["instance"]}))
        wrong = _probe(tmp_path / "wrong.json")
        assert wrong.returncode == 1 and "served by another process" in wrong.stderr
        port = int(a["url"].rsplit(":", 1)[1])
        assert _listening(port) == {"127.0.0.1"}, "PANGEA_HTTP_HOST defaults to loopback"
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
    assert not any(f.exists() for f in files), "a stopped role leaves no address to probe"
    gone = _probe(files[0])
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1


def test_http_host_is_where_the_health_server_listens(tmp_path):
    worker = _waiting_worker(tmp_path, "w", http_port="any", http_host="0.0.0.0")  # noqa: S104
    try:
        _wait(lambda: (tmp_path / "w.json").exists())
        record = json.loads((tmp_path / "w.json").read_text())
        assert record["url"].startswith("http://127.0.0.1:"), "a wildcard bind is probed on loopback"
        assert _listening(int(record["url"].rsplit(":", 1)[1])) == {"0.0.0.0"}
        assert _probe(tmp_path / "w.json").returncode == 0
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_a_role_without_a_health_server_passes_its_check(tmp_path):
    worker = _waiting_worker(tmp_path, "off", http_port=0)
    try:
        _wait(lambda: (tmp_path / "off.json").exists())
        assert json.loads((tmp_path / "off.json").read_text()) == {"url": None}
        assert _probe(tmp_path / "off.json").returncode == 0, "nothing to ask"
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_a_bad_health_address_is_one_line(tmp_path):
    env = role_env(f"nats://127.0.0.1:{free_port()}", http_port="any", http_host="256.0.0.1", connect_timeout=1)
    result = run_pangea("worker", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PANGEA_HTTP_HOST" in lines[0], result.stderr
