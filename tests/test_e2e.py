"""End to end over a real nats-server: every role a real OS process, checked against the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pangea.train.outputs import load_params
from tests.helpers import kill_mid_run, pangea_cmd, role_env, run_pangea, start_run, wait_for_log
from tests.yardstick import assert_exact, assert_verified, reference


# Two of the four in the default run (keeps it near 10 minutes); CI runs the others with the slow tests.
@pytest.mark.parametrize(
    ("workers", "optimizer", "lr"),
    [
        pytest.param(1, "sgd", 0.05, marks=pytest.mark.slow),  # one worker: also test_exactness's whole-batch loop
        pytest.param(3, "sgd", 0.05, marks=pytest.mark.slow),
        pytest.param(1, "adam", 0.002, marks=pytest.mark.slow),
        (3, "adam", 0.002),
    ],
)
def test_run_equals_reference(nats_url, job, tmp_path, workers, optimizer, lr):
    train = dict(epochs=2, batch_size=50, optimizer=optimizer, lr=lr, seed=7)
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--workers",
        str(workers),
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--optimizer",
        optimizer,
        "--lr",
        str(lr),
        "--seed",
        "7",
        "--job",
        job,
        "--out",
        str(out),
        env=role_env(nats_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact(out, reference(tmp_path / "ref", workers=workers, **train))
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss"]) == 2 * 27  # ceil(1348 / 50) rounds per epoch
    assert set(metrics["workers"]) == {workers}
    assert sum(metrics["samples"]) == 2 * 1348  # every sample counted once per epoch
    assert metrics["rejected"] == {}


def test_roles_as_separate_processes(nats_url, job, tmp_path):
    """`pangea orchestrator`, `preprocessor` and two `worker`s started by hand against one server
    (each on one torch thread, pinned, as the reference computes its shards)."""
    env = role_env(nats_url, job=job, epochs=2, batch_size=32, seed=3, torch_threads=1)
    out = tmp_path / "run"
    logs = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        logs[name] = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(pangea_cmd(*args), env=env, stdout=logs[name], stderr=subprocess.STDOUT)

    # Workers first: they wait for the job to appear, as in a real deployment.
    workers = [start(f"w{i}", "worker", "--worker-id", f"hand{i}") for i in range(2)]
    pre = start("pre", "preprocessor")
    orch = start("orch", "orchestrator", "--workers", "2", "--out", str(out))
    try:
        for name, proc in [("orch", orch), ("pre", pre), ("w0", workers[0]), ("w1", workers[1])]:
            code = proc.wait(timeout=240)
            assert code == 0, f"{name} exited {code}: {(tmp_path / f'{name}.log').read_text()[-2000:]}"
    finally:
        for proc in [orch, pre, *workers]:
            if proc.poll() is None:
                proc.kill()
    assert_exact(out, reference(tmp_path / "ref", workers=2, torch_threads=1, epochs=2, batch_size=32, seed=3))
    worker_log = (tmp_path / "w0.log").read_text()
    assert "worker hand0 done" in worker_log


@pytest.mark.slow  # ~25 s: keeps the default suite near 10 minutes; CI runs it with the slow tests
def test_gradient_larger_than_max_payload_is_chunked(nats_url, job, tmp_path):
    """A ~3.3M-parameter MLP: 13 MB gradients over a server with the default 1 MB max payload."""
    import asyncio

    from pangea.bus.client import Bus
    from pangea.settings import BusSettings

    async def max_payload() -> int:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "probe")
        try:
            return bus.max_payload
        finally:
            await bus.close()

    assert asyncio.run(max_payload()) <= 1 << 20
    train = dict(epochs=1, batch_size=256, hidden="2048,1536", lr=0.02, seed=1)
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--hidden",
        "2048,1536",
        "--lr",
        "0.02",
        "--seed",
        "1",
        "--job",
        job,
        "--out",
        str(out),
        env=role_env(nats_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ref = reference(tmp_path / "ref", workers=2, **train)
    assert sum(a.size for a in load_params(ref / "params.npz").values()) >= 3_000_000
    assert_exact(out, ref)


def test_embedded_server_default(tmp_path):
    """No PANGEA_NATS_URL: `pangea run` starts its own nats-server and writes the three files."""
    out = tmp_path / "run"
    result = run_pangea("run", "--epochs", "1", "--out", str(out), env=role_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "test_accuracy", "final_test_accuracy", "round_seconds", "workers"):
        assert key in metrics
    assert metrics["workers"][0] == 2
    assert 0.5 < metrics["final_test_accuracy"] <= 1.0
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "final test accuracy" in result.stderr


@pytest.mark.slow
def test_four_workers_reach_95_percent(nats_url, job, tmp_path):
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--workers",
        "4",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "20",
        "--job",
        job,
        "--out",
        str(out),
        env=role_env(nats_url),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95, metrics["test_accuracy"]


@pytest.mark.slow  # the chaos trials kill the orchestrator too; CI runs both
def test_killed_orchestrator_is_restarted_and_resumes_exactly(nats_url, job, tmp_path):
    """SIGKILL the orchestrator mid-run: `pangea run` says so, restarts it, and it resumes from its
    last checkpoint on the bus; the final parameters equal the reference."""
    out = tmp_path / "run"
    stderr = kill_mid_run(
        out, job, nats_url, "orchestrator", "--workers", "2", "--epochs", "3", "--batch-size", "32", "--seed", "8"
    )
    assert "role orchestrator killed by SIGKILL: restarting it" in stderr
    assert_verified(out)  # the rounds of both generations, as recorded
    events = json.loads((out / "metrics.json").read_text())["events"]
    assert any(e["kind"] == "resume" for e in events), events
    assert len(json.loads((out / "metrics.json").read_text())["loss"]) == 3 * 43


@pytest.mark.slow  # keeps the default run under 10 minutes; CI runs it with the slow tests
def test_killed_worker_is_restarted_and_the_run_stays_exact(nats_url, job, tmp_path):
    out = tmp_path / "run"
    stderr = kill_mid_run(
        out,
        job,
        nats_url,
        "worker-1",
        "--workers",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--seed",
        "5",
        after=1.0,
    )
    assert "worker-1 killed by SIGKILL: restarting it" in stderr
    assert_verified(out)


@pytest.mark.slow
def test_batches_larger_than_max_payload_travel_in_frames(nats_url, job, tmp_path):
    """An .npz of 64x64x3 images: each worker's shard is ~3 MB, over the server's 1 MB max payload."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        return (centers[y] + rng.normal(scale=2.0, size=(n, 64, 64, 3))).astype(np.float32), y

    x_train, y_train = make(192)
    x_test, y_test = make(64)
    data = tmp_path / "images.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--workers",
        "2",
        "--dataset",
        str(data),
        "--hidden",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--lr",
        "0.01",
        "--job",
        job,
        "--out",
        str(out),
        env=role_env(nats_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact(
        out, reference(tmp_path / "ref", workers=2, dataset=str(data), hidden="32", epochs=2, batch_size=128, lr=0.01)
    )


def test_sigterm_stops_every_role(nats_url, job, tmp_path):
    """`kill <pangea run>` (or docker stop) stops the roles too, as Ctrl+C does."""
    out = tmp_path / "run"
    proc = start_run(out, job, nats_url, "--workers", "2", "--epochs", "200")
    try:
        wait_for_log(out / "logs" / "orchestrator.log", "starting at round")
        pids = json.loads((out / "pids.json").read_text())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    for name, pid in pids.items():
        alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
        assert not alive, f"{name} still running"


@pytest.mark.slow  # keeps the default run under 10 minutes; CI runs it with the slow tests
def test_sigkill_of_pangea_run_leaves_no_role_behind(job, tmp_path):
    """`kill -9 <pangea run>` cannot clean up, so every role and the embedded server die with it
    (Linux parent-death signal) instead of running on as orphans."""
    out = tmp_path / "run"
    proc = start_run(out, job, None, "--workers", "2", "--epochs", "200")
    try:
        wait_for_log(out / "logs" / "orchestrator.log", "starting at round")
        pids = json.loads((out / "pids.json").read_text())
        server = [int(p) for p in os.popen(f"pgrep -P {proc.pid} nats-server").read().split()]
        assert server, "the embedded nats-server is a child of pangea run"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = dict(pids, server=server[0])
        while alive and time.monotonic() < deadline:
            alive = {
                n: p
                for n, p in alive.items()
                if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
            }
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive, f"still running after pangea run was killed: {alive}"
