"""The deployment in infra/, run for real on a Docker engine and checked (run by .ci/docker).

Needs an engine at DOCKER_HOST, `docker compose` = Compose v2, the base images present
(infra/standins.sh where no registry answers) and infra/wheelhouse/ filled.  Every container is
on the host's network (infra/docker-compose.host.yaml), on free loopback ports picked here.

1. `docker compose build --build-arg OFFLINE=true`: one image, no dangling one left.
2. Job A, `up -d --scale worker=3`: every service's health check reports healthy while the job
   runs (docker inspect), the orchestrator exits 0 (docker inspect), and params.npz copied
   out of the volume equals `pangea reference --workers 3 --torch-threads 1` for the settings.
3. Job B, another PANGEA_JOB on the same server and volume: mid-run one worker is killed
   (docker kill) and the orchestrator restarted (docker compose restart); the job ends, `pangea
   verify` finds it exact against its recorded plans, and job A's outputs are untouched.
4. Job C, the workers scaled by the orchestrator's signal: the stack comes up with `--scale
   worker=0`, and `pangea autoscale --compose "docker compose ..."` on the host scales the worker
   service from 0 to as many as the job asks for (more than one: its shards cost time per sample,
   .ci/compose-autoscale.yaml) and back to 0 when it is done; `pangea verify` finds it exact.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from pangea.bus.server import free_port
from pangea.train.exactness import compare

REPO = Path(__file__).resolve().parent.parent
FILES = ("-f", "infra/docker-compose.yaml", "-f", "infra/docker-compose.host.yaml")
WORKERS = 3
THREADS = 1        # each worker's intra-op threads: the reference computes with the same
EPOCHS = 40        # digits: 22 rounds per epoch; 20 ran ~30 s here and the checks (15 s apart) first
                   # read all healthy at round 369 of 440: too close for a faster machine
TOLERANCE = 1e-6   # tests/yardstick.py's bound for "exact"
SERVICES = {"nats": 1, "orchestrator": 1, "preprocessor": 1, "worker": WORKERS}
PROBE = ["CMD", "python", "-m", "pangea.probe"]  # the image's HEALTHCHECK, which compose inherits


class Failed(Exception):
    """A check of the deployment failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"deployment: {message}", flush=True)


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> str:
    try:
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"`{' '.join(argv)}` did not return within {timeout:.0f}s") from None
    if check and result.returncode != 0:
        raise Failed(f"`{' '.join(argv)}` exited {result.returncode}: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result.stdout


class Deployment:
    """One compose project of infra/ on the host network, with its ports and job settings."""

    def __init__(self) -> None:
        self.project = f"pangea-ci-{uuid.uuid4().hex[:6]}"
        self.nats_port, self.monitor_port, self.http_port = free_port(), free_port(), free_port()
        self.env = host_env()
        self.env.update(
            NATS_PORT=str(self.nats_port), NATS_MONITOR_PORT=str(self.monitor_port),
            PANGEA_HTTP_PORT=str(self.http_port), PANGEA_WORKERS=str(WORKERS),
            PANGEA_TORCH_THREADS=str(THREADS), PANGEA_EPOCHS=str(EPOCHS),
        )

    def compose_command(self, files: tuple[str, ...] = FILES) -> list[str]:
        return ["docker", "compose", "-p", self.project, *files]

    def compose(self, *args: str, job: str = "digits", timeout: float = 600, check: bool = True,
                files: tuple[str, ...] = FILES, **env: str) -> str:
        return run(*self.compose_command(files), *args, env={**self.env, "PANGEA_JOB": job, **env},
                   timeout=timeout, check=check)

    def containers(self, service: str | None = None) -> list[dict]:
        """`docker inspect` of the project's containers (of one service), stopped ones too."""
        ids = self.compose("ps", "-a", "-q", *([service] if service else [])).split()
        return json.loads(run("docker", "inspect", *ids)) if ids else []

    def rounds(self) -> float:
        """pangea_rounds_total of the orchestrator now running (0 while it cannot be reached)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        return next((float(line.split()[1]) for line in text.splitlines() if line.startswith("pangea_rounds_total ")), 0.0)

    def orchestrator_running(self) -> bool:
        return any(c["State"]["Running"] for c in self.containers("orchestrator"))

    def wait_rounds(self, at_least: float, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.rounds() < at_least:
            if not self.orchestrator_running():
                raise Failed(f"the job ended before round {at_least:.0f}: too short to inject the faults")
            if time.monotonic() > deadline:
                raise Failed(f"round {at_least:.0f} not reached within {timeout:.0f}s (now {self.rounds():.0f})")
            time.sleep(0.2)

    def copy_out(self, job: str, target: Path) -> Path:
        """The job's output directory, copied out of the orchestrator's volume."""
        (container,) = self.containers("orchestrator")
        run("docker", "cp", f"{container['Id']}:/data/out/{job}", str(target))
        return target


def host_env() -> dict[str, str]:
    """This process's environment without PANGEA_* settings: pangea on the host, defaults only."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}


def health(container: dict) -> str:
    return (container["State"].get("Health") or {}).get("Status", "none")


def service(container: dict) -> str:
    return container["Config"]["Labels"]["com.docker.compose.service"]


def dangling() -> set[str]:
    return set(run("docker", "images", "-q", "--no-trunc", "--filter", "dangling=true").split())


def build(dep: Deployment) -> None:
    """One build for the three roles, no dangling image left (a rebuild may untag the old image)."""
    before = dangling() | set(run("docker", "images", "-q", "--no-trunc", "pangea:latest").split())
    started = time.monotonic()
    dep.compose("build", "--build-arg", "OFFLINE=true", timeout=900)
    seconds = time.monotonic() - started
    image = json.loads(run("docker", "image", "inspect", "pangea:latest"))[0]
    left = dangling() - before
    if left:
        raise Failed(f"the build left {len(left)} dangling image(s): {sorted(left)}")
    history = run("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", "pangea:latest")
    if "COPY pangea" in history or "/src" in history:
        raise Failed("the image's layers still hold the sources: " + history)
    log(f"built pangea:latest in {seconds:.0f}s: {image['Size'] / 1e9:.2f} GB, no dangling image, no source layer")


def wait_all_healthy(dep: Deployment, timeout: float = 180) -> None:
    """Every service's container reports healthy (docker inspect) while the orchestrator still runs."""
    deadline = time.monotonic() + timeout
    while True:
        containers = dep.containers()
        by_service: dict[str, list[str]] = {}
        for c in containers:
            by_service.setdefault(service(c), []).append(health(c))
        healthy = {name: states.count("healthy") for name, states in by_service.items()}
        if all(healthy.get(name, 0) == count for name, count in SERVICES.items()):
            if not dep.orchestrator_running():
                raise Failed("the orchestrator exited before the health checks were read")
            checks = {c["Name"].lstrip("/"): c["Config"]["Healthcheck"]["Test"] for c in containers if service(c) != "nats"}
            if any(test != PROBE for test in checks.values()):
                raise Failed(f"a role's health check is not the image's {PROBE}: {checks}")
            log(f"healthy while the job runs (round {dep.rounds():.0f}): "
                + ", ".join(f"{name} {healthy[name]}/{count}" for name, count in SERVICES.items()))
            return
        if not dep.orchestrator_running() or time.monotonic() > deadline:
            states = {c["Name"].lstrip("/"): f"{c['State']['Status']}/{health(c)}" for c in containers}
            raise Failed(f"not every service was healthy while the job ran: {states}")
        time.sleep(1)


def wait_orchestrator(dep: Deployment, job: str, timeout: float = 300) -> None:
    """Until the orchestrator's container has exited for good (not restarting), with exit code 0.

    docker inspect, polled, rather than `docker compose wait`: one less thing that can block."""
    deadline = time.monotonic() + timeout
    while True:
        (container,) = dep.containers("orchestrator")
        state = container["State"]
        if not state["Running"] and not state["Restarting"] and state["Status"] == "exited":
            break
        if time.monotonic() > deadline:
            raise Failed(f"job {job}: the orchestrator still {state['Status']} after {timeout:.0f}s; its log ends: "
                         + dep.compose("logs", "--tail", "20", "orchestrator", job=job, check=False))
        time.sleep(0.5)
    if state["ExitCode"] != 0:
        raise Failed(f"job {job}: the orchestrator exited {state['ExitCode']}; its log ends: "
                     + dep.compose("logs", "--tail", "20", "orchestrator", job=job, check=False))


def job_a(dep: Deployment, work: Path) -> Path:
    """A clean run with 3 workers, against `pangea reference` for the same settings."""
    started = time.monotonic()
    dep.compose("up", "-d", "--scale", f"worker={WORKERS}", job="digits")
    wait_all_healthy(dep)
    wait_orchestrator(dep, "digits")
    run_dir = dep.copy_out("digits", work / "digits")
    log(f"job digits ran to the end in {time.monotonic() - started:.0f}s "
        f"(accuracy {json.loads((run_dir / 'metrics.json').read_text()).get('final_test_accuracy', float('nan')):.3f})")
    reference = work / "reference"
    run(sys.executable, "-m", "pangea", "reference", "--workers", str(WORKERS), "--torch-threads", str(THREADS),
        "--epochs", str(EPOCHS), "--dataset", "digits", "--model", "mlp", "--out", str(reference), env=host_env())
    diff = compare(run_dir, reference)
    if not diff <= TOLERANCE:
        raise Failed(f"params.npz of job digits is not pangea reference's: max |Δ| = {diff:g}")
    log(f"params.npz = pangea reference --workers {WORKERS} --torch-threads {THREADS}: max |Δ| = {diff:g}")
    return run_dir


def job_b(dep: Deployment, work: Path, first: Path) -> None:
    """Another job on the same server and volume: a worker killed, the orchestrator restarted."""
    job = "digits-faults"
    started = time.monotonic()
    dep.compose("up", "-d", "--scale", f"worker={WORKERS}", job=job)
    dep.wait_rounds(60)
    victim = dep.containers("worker")[0]
    run("docker", "kill", victim["Id"])
    log(f"killed {victim['Name'].lstrip('/')} at round {dep.rounds():.0f}")
    dep.wait_rounds(150)
    at = dep.rounds()
    dep.compose("restart", "orchestrator", job=job)
    log(f"restarted the orchestrator at round {at:.0f}")
    wait_orchestrator(dep, job)
    run_dir = dep.copy_out(job, work / job)
    events = {e.get("kind") for e in json.loads((run_dir / "metrics.json").read_text()).get("events", [])}
    # The killed worker's shard is re-issued one of three ways (a worker leaves, is excluded
    # as overdue, or its shard is reassigned past the deadline), as in tests/test_elastic.py.
    if "resume" not in events or not events & {"leave", "exclude", "reassign"}:
        raise Failed(f"job {job}: expected a re-issued shard and a resumed orchestrator, events were {events}")
    verify = subprocess.run([sys.executable, "-m", "pangea", "verify", str(run_dir)], env=host_env(),
                            capture_output=True, text=True, timeout=600)
    if verify.returncode != 0:  # 1: not exact; 2: could not verify
        raise Failed(f"pangea verify {run_dir} exited {verify.returncode}: {(verify.stdout + verify.stderr).strip()}")
    log(f"job {job} ended in {time.monotonic() - started:.0f}s; pangea verify: {verify.stdout.strip()}")
    again = dep.copy_out("digits", work / "digits-again")
    if (again / "params.npz").read_bytes() != (first / "params.npz").read_bytes():
        raise Failed("job digits-faults changed job digits' outputs on the volume")
    log("job digits' outputs on the volume are untouched by the second job")


def job_c(dep: Deployment, work: Path) -> None:
    """Workers from 0 to what the job asks for and back to 0, by `pangea autoscale --compose`."""
    job, most = "digits-autoscale", 3
    files = (*FILES, "-f", ".ci/compose-autoscale.yaml")
    env = {"PANGEA_WORKERS": "1", "PANGEA_MIN_WORKERS": "1", "PANGEA_MAX_WORKERS": str(most), "PANGEA_EPOCHS": "12"}
    started = time.monotonic()
    dep.compose("up", "-d", "--scale", "worker=0", job=job, files=files, **env)
    if dep.compose("ps", "-q", "worker", job=job, files=files).split():
        raise Failed("up --scale worker=0 left workers running")
    scaler = subprocess.run(
        [sys.executable, "-m", "pangea", "autoscale", "--nats-url", f"nats://127.0.0.1:{dep.nats_port}",
         "--jobs", job, "--max-workers", str(most), "--period", "0.5", "--until-idle", "true",
         "--compose", shlex.join(dep.compose_command(files))],
        env={**dep.env, "PANGEA_JOB": job, **env, "PANGEA_HTTP_PORT": "0"}, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    said = (scaler.stdout + scaler.stderr).strip()
    if scaler.returncode != 0:
        raise Failed(f"pangea autoscale --compose exited {scaler.returncode}: {said[-2000:]}")
    scaled = [line.split("compose service worker: ", 1)[1] for line in said.splitlines() if "compose service worker: " in line]
    log(f"pangea autoscale --compose: {'; '.join(scaled)}")
    left = dep.compose("ps", "-q", "--status", "running", "worker", job=job, files=files).split()
    if left:
        raise Failed(f"{len(left)} worker container(s) still running after pangea autoscale --until-idle")
    wait_orchestrator(dep, job)
    run_dir = dep.copy_out(job, work / job)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if max(metrics["desired_workers"]) < 2 or max(metrics["workers"]) < 2:
        raise Failed(f"job {job} never asked for or ran more than one worker: desired "
                     f"{sorted(set(metrics['desired_workers']))}, ran {sorted(set(metrics['workers']))}")
    rates: dict[int, list[float]] = {}
    for k, n, seconds in zip(metrics["workers"], metrics["samples"], metrics["round_seconds"]):
        rates.setdefault(k, []).append(n / seconds)
    log("median samples/s per worker count: "
        + ", ".join(f"{k}: {sorted(v)[len(v) // 2]:.0f}" for k, v in sorted(rates.items())))
    verify = subprocess.run([sys.executable, "-m", "pangea", "verify", str(run_dir)], env=host_env(),
                            capture_output=True, text=True, timeout=600)
    if verify.returncode != 0:
        raise Failed(f"pangea verify {run_dir} exited {verify.returncode}: {(verify.stdout + verify.stderr).strip()}")
    log(f"job {job}: 0 -> {max(metrics['workers'])} -> 0 workers by the signal, ended in "
        f"{time.monotonic() - started:.0f}s; pangea verify: {verify.stdout.strip()}")


def main() -> int:
    dep = Deployment()
    work = Path(tempfile.mkdtemp(prefix="pangea-deployment-"))
    started = time.monotonic()
    try:
        build(dep)
        first = job_a(dep, work)
        job_b(dep, work, first)
        job_c(dep, work)
    except Failed as exc:
        log(f"FAILED: {exc}")
        for name in ("orchestrator", "preprocessor", "worker", "nats"):
            print(dep.compose("logs", "--tail", "15", name, check=False, timeout=60), file=sys.stderr)
        return 1
    finally:
        dep.compose("down", "-v", "--remove-orphans", check=False, timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    log(f"passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
