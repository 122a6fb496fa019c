"""Flow control at reduced scale, judged by nats-server's own monitoring endpoints.

8 workers send ~8 MB gradients (a ~2M-parameter MLP) through a server with the default 1 MB
max payload. The server must count no slow consumer and close no connection for being one,
every gradient chunk stored must be delivered once and acknowledged, the orchestrator must
refuse nothing, and the parameters must equal the single-process reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pangea.bus import subjects
from pangea.bus.client import PAYLOAD_HEADROOM
from pangea.bus.server import EmbeddedServer, free_port
from pangea.train.data import steps_per_epoch
from pangea.train.outputs import load_params
from pangea.wire.chunking import chunk_count
from tests.cluster import metrics
from tests.helpers import pangea_cmd, role_env
from tests.yardstick import assert_exact, reference

WORKERS = 8
MAX_PAYLOAD = 1 << 20  # nats-server's default: the server below is started without changing it
DIGITS_TRAIN = 1348
TRAIN = dict(hidden="1400,1400", epochs=1, batch_size=256, lr=0.02, seed=3)
# A fixed, generous shard deadline instead of the adaptive one: a busy machine must not cause
# re-issues, while a lost chunk still stalls its round and shows as one.
DEADLINE = "90"


def mlp_numel(hidden: str, inputs: int = 64, classes: int = 10) -> int:
    widths = [inputs, *map(int, hidden.split(",")), classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


@pytest.fixture
def server(tmp_path):
    """A server of this test's own, so its counters see this run and nothing else."""
    with EmbeddedServer(tmp_path / "nats", monitor_port=free_port(), log_file=tmp_path / "nats.log") as s:
        yield s


def monitor(server: EmbeddedServer, endpoint: str) -> dict:
    """One of the server's HTTP monitoring endpoints (/varz, /connz, /jsz), as JSON."""
    with urllib.request.urlopen(f"http://{server.host}:{server.monitor_port}/{endpoint}", timeout=10) as reply:
        return json.loads(reply.read())


def run_to_end(args: list[str], out: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """`pangea run`: (exit code, or None if it ran past `timeout`, and its stderr).

    Past the timeout it is asked to stop, then its roles (each in a session of its own,
    listed in pids.json) and it are killed, so that no role outlives the test."""
    proc = subprocess.Popen(pangea_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pids = json.loads((out / "pids.json").read_text()) if (out / "pids.json").exists() else {}
            for pid in pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            _, stderr = proc.communicate()
        return None, stderr


def stream_details(server: EmbeddedServer, job: str) -> dict[str, dict]:
    """The job's streams by name, each with its state and consumers."""
    jsz = monitor(server, "jsz?streams=true&consumers=true")
    streams = {s["name"]: s for account in jsz.get("account_details", []) for s in account.get("stream_detail", [])}
    return {name: s for name, s in streams.items() if name.startswith(f"PANGEA_{job}_")}


@pytest.mark.slow  # ten processes on a server of its own: ~25 s on an idle 2-core machine
def test_eight_workers_two_million_params_no_slow_consumer_no_lost_chunk(server, job, tmp_path):
    varz = monitor(server, "varz")
    assert varz["max_payload"] == MAX_PAYLOAD, varz["max_payload"]
    assert varz["slow_consumers"] == 0

    args = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    out = tmp_path / "run"
    code, stderr = run_to_end(
        [
            "run",
            "--nats-url",
            server.url,
            "--workers",
            str(WORKERS),
            *args,
            "--straggler-deadline",
            DEADLINE,
            "--job",
            job,
            "--out",
            str(out),
        ],
        out,
        role_env(server.url),
        timeout=280,
    )

    # The server's own view first (it explains a failed or stuck run best): no slow consumer,
    # and every connection closed by its client.
    varz = monitor(server, "varz")
    assert "slow_consumers" in varz, sorted(varz)
    slow = varz["slow_consumers"]
    assert slow == 0, f"server counted {slow} slow consumers: {varz.get('slow_consumer_stats')}"
    assert all(n == 0 for n in varz.get("slow_consumer_stats", {}).values()), varz["slow_consumer_stats"]
    closed = [
        c
        for c in monitor(server, "connz?state=closed&limit=1000")["connections"]
        if (c.get("name") or "").startswith(f"pangea-{job}-")
    ]
    roles = [c["name"].removeprefix(f"pangea-{job}-") for c in closed]
    assert roles.count("worker") == WORKERS and "orchestrator" in roles and "preprocessor" in roles, roles
    cut = [(c["name"], c.get("reason")) for c in closed if c.get("reason") != "Client Closed"]
    assert not cut, f"connections the server closed: {cut}"
    assert code == 0, f"pangea run {'timed out' if code is None else f'exited {code}'}: {stderr[-3000:]}"

    # Every gradient chunk stored was delivered once and acknowledged; none is left or redelivered.
    numel = mlp_numel(TRAIN["hidden"])
    rounds = TRAIN["epochs"] * steps_per_epoch(DIGITS_TRAIN, TRAIN["batch_size"])
    chunks = chunk_count(numel, 4, MAX_PAYLOAD - PAYLOAD_HEADROOM)
    assert chunks > 1  # the gradients really were cut to fit the 1 MB payload
    streams = stream_details(server, job)
    grads = streams[subjects.stream(job, "grads")]
    stored = grads["state"]["last_seq"]
    assert stored == rounds * WORKERS * chunks, f"{stored} gradient chunks stored, expected {rounds}x{WORKERS}x{chunks}"
    assert grads["state"]["messages"] == 0, f"{grads['state']['messages']} gradient chunks never consumed"
    consumers = grads.get("consumer_detail") or []
    assert consumers, "no consumer on the gradient stream"
    for c in consumers:
        assert c["num_redelivered"] == 0 and c["num_ack_pending"] == 0 and c["num_pending"] == 0, c
        assert c["ack_floor"]["stream_seq"] == stored, c
    params_consumers = streams[subjects.stream(job, "params")].get("consumer_detail") or []
    assert len(params_consumers) == WORKERS, [c["name"] for c in params_consumers]
    for c in params_consumers + (streams[subjects.stream(job, "batches")].get("consumer_detail") or []):
        assert c["num_redelivered"] == 0 and c["num_ack_pending"] == 0, c

    # The system's view: nothing refused, every round complete with all 8 workers, exact result.
    m = metrics(out)
    assert m["rejected"] == {}, m["rejected"]
    assert m["workers"] == [WORKERS] * rounds, m["workers"]
    assert sum(m["samples"]) == TRAIN["epochs"] * DIGITS_TRAIN
    assert not m["quorum_rounds"], m["quorum_rounds"]
    assert not [e for e in m["events"] if e["kind"] == "reassign"], f"shards re-issued: {m['events']}"
    ref = reference(tmp_path / "ref", workers=WORKERS, **TRAIN)
    assert sum(a.size for a in load_params(ref / "params.npz").values()) == numel
    assert 1_900_000 <= numel <= 2_200_000
    diff = assert_exact(out, ref)
    print(
        f"K={WORKERS} params={numel} chunks/gradient={chunks} gradient chunks={stored} "
        f"slow_consumers={slow} rejected={m['rejected']} max|delta|={diff:g}"
    )
