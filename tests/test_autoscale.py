"""Autoscaling by a signal that means something: the orchestrator asks, `pangea autoscale` follows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.cluster import Cluster
from tests.helpers import assert_one_line_error, pangea_cmd, role_env, run_pangea
from tests.yardstick import assert_verified


def _autoscale(cluster: Cluster, *args: str, **env: object) -> subprocess.Popen:
    """The controller for this job only (the session's server holds other tests' jobs)."""
    return cluster.start(
        "autoscale", "autoscale", "--jobs", cluster.job, "--period", "0.2", "--until-idle", "true",
        "--log-dir", str(cluster.dir / "autoscaled"), *args, **env,
    )  # fmt: skip


def _until_done(cluster: Cluster, scaler: subprocess.Popen, timeout: float = 240, each=lambda: None) -> None:
    """Wait for the controller to exit on its own (0), failing at once if the orchestrator fails."""
    deadline = time.monotonic() + timeout
    while scaler.poll() is None:
        orch = cluster.procs["orch"].poll()
        assert orch in (None, 0), f"orchestrator exited {orch}: {cluster.log('orch')[-3000:]}"
        assert time.monotonic() < deadline, f"autoscale still running: {cluster.log('autoscale')[-3000:]}"
        each()
        time.sleep(0.2)
    assert scaler.returncode == 0, cluster.log("autoscale")[-3000:]


def _rates(metrics: dict) -> dict[int, float]:
    """Median samples/s of the rounds run on each worker count (evaluations included)."""
    by_k: dict[int, list[float]] = {}
    for k, n, s in zip(metrics["workers"], metrics["samples"], metrics["round_seconds"]):
        by_k.setdefault(k, []).append(n / s)
    return {k: sorted(v)[len(v) // 2] for k, v in sorted(by_k.items())}


@pytest.mark.slow
def test_workers_are_added_while_they_pay_and_none_are_left_at_the_end(nats_url, job, tmp_path):
    """A job whose shards cost time per sample (PANGEA_TEST_SAMPLE_DELAY: compute that scales
    out, which 2 cores cannot show with real kernels): the controller starts workers as the
    orchestrator asks, the job finishes exact across every join, and the controller ends with none.
    While it runs, /autoscale serves the signal as KEDA's metrics-api scaler reads it."""
    cluster = Cluster(nats_url, job, tmp_path)
    out = tmp_path / "run"
    try:
        cluster.start("pre", "preprocessor")
        cluster.start(
            "orch", "orchestrator", "--workers", "1", "--max-workers", "4", "--epochs", "12", "--out", str(out),
            http_port="any", health_file=tmp_path / "orch-health.json",
        )  # fmt: skip
        scaler = _autoscale(cluster, "--min-workers", "1", "--max-workers", "4", test_sample_delay=0.004)
        seen = set()

        def read_signal() -> None:
            try:
                url = json.loads((tmp_path / "orch-health.json").read_text())["url"]
                with urllib.request.urlopen(f"{url}/autoscale", timeout=5) as reply:
                    seen.add(int(json.loads(reply.read())["desired"]))  # valueLocation "desired"
            except (OSError, ValueError, KeyError):
                pass  # not up yet, or already gone

        _until_done(cluster, scaler, each=read_signal)
        cluster.wait("orch")
        metrics = json.loads((out / "metrics.json").read_text())
        rates = _rates(metrics)
        print("samples/s per worker count:", {k: round(v) for k, v in rates.items()})
        assert max(metrics["desired_workers"]) == 4 and max(metrics["workers"]) >= 3, metrics["desired_workers"]
        assert rates[max(rates)] > 2 * rates[1]  # more workers were faster, as measured
        assert {1, 4} <= seen, seen
        assert "0 workers running" in cluster.log("autoscale")
        assert_verified(out)  # exact, across every join
    finally:
        cluster.close()


@pytest.mark.slow
def test_when_more_workers_do_not_help_the_signal_comes_back_to_the_minimum(nats_url, job, tmp_path):
    """A tiny model: a round is latency, not compute, so a second worker does not pay."""
    cluster = Cluster(nats_url, job, tmp_path)
    out = tmp_path / "run"
    try:
        cluster.start("pre", "preprocessor")
        cluster.start(
            "orch", "orchestrator", "--workers", "1", "--max-workers", "4", "--hidden", "8", "--epochs", "40",
            "--scale-cooldown", "100000", "--out", str(out),
        )  # fmt: skip
        scaler = _autoscale(cluster, "--min-workers", "1", "--max-workers", "4")
        _until_done(cluster, scaler)
        cluster.wait("orch")
        metrics = json.loads((out / "metrics.json").read_text())
        print("samples/s per worker count:", {k: round(v) for k, v in _rates(metrics).items()})
        desired = metrics["desired_workers"]
        assert 2 in desired and desired[-1] == 1 and max(desired) <= 2, desired  # tried 2, came back
    finally:
        cluster.close()


def test_the_command_is_there():
    out = subprocess.run(pangea_cmd("autoscale", "--help"), capture_output=True, text=True, check=True)
    assert "--max-workers" in out.stdout and "--until-idle" in out.stdout


@pytest.mark.slow
def test_pangea_run_autoscale_follows_the_signal_and_stays_exact(tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--autoscale", "1:2", "--epochs", "3", "--out", str(out), env=role_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["desired_workers"][0] == 1 and 2 in metrics["desired_workers"]
    assert "0 workers running" in (out / "logs" / "autoscale.log").read_text()
    assert_verified(out)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--autoscale", "3:1"], "--autoscale"),
        (["--autoscale", "two"], "--autoscale"),
        (["--secure", "--autoscale", "1:2"], "not with --secure"),
    ],
)
def test_a_bad_autoscale_range_is_one_line(flags, says):
    result = run_pangea("run", *flags, env=role_env())
    assert_one_line_error(result, says)


# The compose backend's logic, against a stand-in for the `docker compose` CLI that records its
# calls and keeps a scale (the real engine and Compose v2 are .ci/deployment.py's job digits-autoscale).
FAKE_COMPOSE = """
import json, pathlib, sys
state = pathlib.Path(sys.argv[1])
calls = json.loads(state.read_text()) if state.exists() else []
args = sys.argv[2:]
calls.append(args)
state.write_text(json.dumps(calls))
if args[0] == "ps":
    scales = [a.split("=")[1] for c in calls if c[0] == "up" for a in c if a.startswith("worker=")]
    print("\\n".join(f"c{i}" for i in range(int(scales[-1]) if scales else 0)))
elif args[0] == "up" and "worker=9" in args:
    print("Error response from daemon: no room", file=sys.stderr)
    sys.exit(1)
"""


def _compose_workers(tmp_path):
    from pangea.app.autoscale import ComposeWorkers
    from pangea.settings import AutoscaleSettings

    script = tmp_path / "compose.py"
    script.write_text(FAKE_COMPOSE)
    state = tmp_path / "calls.json"
    command = f"{sys.executable} {script} {state}"
    return ComposeWorkers(AutoscaleSettings(compose=command, _env_file=None)), state


def test_compose_workers_scale_the_service_to_what_the_jobs_want_in_all(tmp_path):
    workers, state = _compose_workers(tmp_path)
    assert workers.alive() == 0
    workers.reconcile({"a": 2})
    workers.reconcile({"a": 2})  # no change: compose is not asked again
    assert workers.alive() == 2
    workers.reconcile({"a": 2, "b": 1})
    workers.reconcile({"a": 0, "b": 0})
    ups = [c for c in json.loads(state.read_text()) if c[0] == "up"]
    assert ups == [["up", "-d", "--no-deps", "--no-recreate", "--scale", f"worker={n}", "worker"] for n in (2, 3, 0)]
    assert workers.alive() == 0


def test_a_failed_compose_call_names_the_command_and_is_tried_again(tmp_path):
    from pangea.app.autoscale import ComposeError

    workers, state = _compose_workers(tmp_path)
    with pytest.raises(ComposeError, match=r"exited 1: Error response from daemon: no room"):
        workers.reconcile({"a": 9})
    with pytest.raises(ComposeError):
        workers.reconcile({"a": 9})  # not taken as applied: the next period asks again
    assert sum(c[0] == "up" for c in json.loads(state.read_text())) == 2


def test_a_compose_command_that_cannot_run_is_one_line(nats_url, job):
    result = run_pangea(
        "autoscale", "--jobs", job, "--compose", "no-such-docker-xyz compose", env=role_env(nats_url), timeout=60
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--compose", "no-such-docker-xyz")


def test_a_worker_that_fails_on_a_setting_is_not_started_again_and_again(nats_url, job, tmp_path):
    """A worker exits 2 (its device setting is wrong): the controller says so once, with the
    worker's own one-line error, and starts no more for the job (a restart cannot fix it)."""
    cluster = Cluster(nats_url, job, tmp_path)
    try:
        cluster.start("orch", "orchestrator", "--workers", "1", "--out", str(tmp_path / "run"))
        scaler = _autoscale(cluster, "--min-workers", "1", device="tpu")
        deadline = time.monotonic() + 60
        while "starting no more" not in cluster.log("autoscale"):
            assert scaler.poll() is None and time.monotonic() < deadline, cluster.log("autoscale")[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # ten more periods: none starts another
        text = cluster.log("autoscale")
        assert text.count("starting no more") == 1 and "PANGEA_DEVICE" in text, text[-3000:]
        assert len(list((tmp_path / "autoscaled").glob("*.log"))) == 1
    finally:
        cluster.close()
