"""Chaos: seeded trials, each killing a random role (worker, orchestrator, preprocessor or the
nats-server) at a random round of a short run.  Every trial must end with parameters equal to
the recomputation of the rounds it recorded (`pangea verify`).  Prints survived/total."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from pangea.bus.server import EmbeddedServer
from pangea.train.exactness import verify
from tests.cluster import Cluster
from tests.helpers import pangea_cmd, role_env
from tests.yardstick import TOLERANCE

TRIALS = int(os.environ.get("PANGEA_CHAOS_TRIALS", "10"))
VICTIMS = ["worker-0", "worker-1", "orchestrator", "preprocessor", "nats-server"]


def _trial(seed: int, tmp_path) -> tuple[bool, str]:
    rng = random.Random(seed)
    victim, at_round = rng.choice(VICTIMS), rng.randint(3, 70)
    server = EmbeddedServer(tmp_path / f"store{seed}", log_file=tmp_path / f"nats{seed}.log").start()
    job, out = f"chaos-{seed}", tmp_path / f"run{seed}"
    proc = subprocess.Popen(
        pangea_cmd(
            "run",
            "--job",
            job,
            "--workers",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--seed",
            "21",
            "--checkpoint-every",
            "5",
            "--out",
            str(out),
        ),
        env=role_env(server.url, member_ttl=3, heartbeat_seconds=0.5, test_delay=0.03),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        Cluster(server.url, job, tmp_path).wait_for_round(at_round)
        if victim == "nats-server":
            server.kill()
            time.sleep(rng.uniform(0.2, 2.0))
            server.restart()
        else:
            os.kill(json.loads((out / "pids.json").read_text())[victim], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=240)
        if proc.returncode != 0:
            return False, f"{victim}@{at_round}: exit {proc.returncode}: {stderr[-500:]}"
        verdict = verify(out, tolerance=TOLERANCE)
        return verdict.exact, f"{victim}@{at_round}: max |Δ| {verdict.max_abs_diff:.2g} against its plans"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


@pytest.mark.chaos
@pytest.mark.timeout(TRIALS * 300)
def test_chaos_every_trial_ends_exact(tmp_path):
    results = [_trial(seed, tmp_path) for seed in range(TRIALS)]
    survived = sum(ok for ok, _ in results)
    for ok, detail in results:
        print(("survived " if ok else "FAILED   ") + detail)
    print(f"chaos: {survived}/{TRIALS} survived")
    assert survived == TRIALS, [d for ok, d in results if not ok]
