"""`pangea run`: the embedded server (unless PANGEA_NATS_URL) and every role as its own process.

Each role is started as `python -m pangea <role>`, the same code path as a separate
deployment, configured through PANGEA_* variables.  Role logs go to <out>/logs/.  The
supervisor shows progress from the orchestrator's round events, and stops everything
cleanly on Ctrl+C or when a role dies (saying which one and how).

Why one module of ~380 lines: it is one process tree's life (server, credentials for
--secure, the roles with their environment, restarts, progress, shutdown), and each piece
uses the others' state; the parts with a job of their own live elsewhere (bus.server,
bus.security and bus.identities, app.hosting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pangea.bus import security, subjects
from pangea.bus.client import Bus
from pangea.bus.server import EmbeddedServer, free_port
from pangea.errors import EXIT_USER_ERROR, JobError, SettingsError
from pangea.lifetime import die_with_parent
from pangea.roles.checkpoints import stored_rounds
from pangea.roles.jobspec import settings_from_spec
from pangea.settings import ReplaySettings, RunSettings
from pangea.telemetry import write_json_file
from pangea.train import kernels
from pangea.wire import codec
from pangea.wire.messages import JobSpec, RoundDone

if TYPE_CHECKING:
    from pangea.bus.identities import Issued

log = logging.getLogger(__name__)
_GRACE_SECONDS = 30.0
# A role that dies MAX_RESTARTS times within RESTART_WINDOW seconds is crash-looping (a bad
# setting, a broken node): the run stops and says so.  One killed now and then (preemption, OOM
# kills, the goodput benchmark's SIGKILL every 15 s) is restarted each time, as a compose
# restart policy or a Kubernetes Deployment restarts it.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
# How a role authenticates: with --secure, what the supervisor issues replaces all of them.
_AUTH_FIELDS = {"nats_token", "nats_user", "nats_password", "nats_nkey_seed", "nats_creds"}


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]
    restarts: int = 0
    recent: deque = field(default_factory=deque)  # monotonic times of the restarts in the window

    def may_restart(self, now: float) -> bool:
        while self.recent and now - self.recent[0] > RESTART_WINDOW:
            self.recent.popleft()
        return len(self.recent) < MAX_RESTARTS

    def how_it_ended(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class RoleDied(RuntimeError):
    """A role process ended before the job was done; `exit_code` is what `pangea run` returns:
    the user-error code when the role stopped for a mistake a restart cannot fix, else 1."""

    def __init__(self, what: str, exit_code: int = 1) -> None:
        super().__init__(what)
        self.exit_code = exit_code


class Terminated(Exception):
    """SIGTERM reached `pangea run`."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def default_job_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000}"


class Supervisor:
    def __init__(
        self, settings: RunSettings, console: Console | None = None, replay: ReplaySettings | None = None
    ) -> None:
        self.settings = settings
        self.replay = replay
        self.job = settings.job or (f"{replay.job}-replay-{time.strftime('%H%M%S')}" if replay else default_job_name())
        self.out = settings.out or Path("runs") / self.job
        self.console = console or Console(stderr=True)
        self.children: list[Child] = []
        self.issued: Issued | None = None  # --secure: a user per role
        self._keys: tempfile.TemporaryDirectory | None = None  # --secure nkey/jwt: the roles' seed or creds files
        self.server: EmbeddedServer | None = None

    def role_env(self, nats_url: str) -> dict[str, str]:
        """PANGEA_* variables carrying the resolved settings to every role."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
        # health_file too: each role's own address, never one file for all of them.
        exclude = {"job", "out", "nats_url", "device", "store_dir", "secure", "health_file"}
        if self.issued:  # each role gets its own login from _login, and nothing else
            exclude |= _AUTH_FIELDS
        values = self.settings.model_dump(exclude=exclude)
        for key, value in values.items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                env[f"PANGEA_{key.upper()}"] = str(value)
        env.update(PANGEA_NATS_URL=nats_url, PANGEA_JOB=self.job, PANGEA_OUT=str(self.out))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, name: str, role: str, env: dict[str, str]) -> Child:
        # Every role on this machine gets its own health/metrics port (see ports.json).
        env = {**env, "PANGEA_HTTP_PORT": str(free_port() if self.settings.http_port else 0)}
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        child = Child(name, role, self._start(role, env, logs / f"{name}.log"), logs / f"{name}.log", env)
        self.children.append(child)
        self._write_pids()
        return child

    def _start(self, role: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as handle:
            return subprocess.Popen(
                [sys.executable, "-m", "pangea", role],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _write_pids(self) -> None:
        """For operators and fault tests: which pid is which role, and its health/metrics port."""
        write_json_file(self.out / "pids.json", {c.name: c.proc.pid for c in self.children})
        write_json_file(self.out / "ports.json", {c.name: int(c.env.get("PANGEA_HTTP_PORT", 0)) for c in self.children})

    def restart(self, child: Child) -> None:
        """Start a dead role again, as a compose restart policy or a Kubernetes Deployment would."""
        child.restarts += 1
        child.recent.append(time.monotonic())
        child.proc = self._start(child.role, child.env, child.log_path)
        self._write_pids()

    def run(self) -> int:
        """Run the job to the end; the exit status of `pangea run`."""
        signal.signal(signal.SIGTERM, _raise_terminated)  # `kill`, docker stop: same as Ctrl+C
        try:
            if not self.replay:
                self.validate()  # before anything starts: a bad dataset or model is one line
            url = self.settings.nats_url
            if not url:
                if self.replay and not self.settings.store_dir:
                    raise SettingsError("replay reads a job's stored batches: set PANGEA_NATS_URL or --store-dir")
                self.out.mkdir(parents=True, exist_ok=True)
                self.server = EmbeddedServer(
                    self.settings.store_dir,
                    log_file=self.out / "nats-server.log",
                    extra_config=self._secure_config(),
                ).start()
                url = self.server.url
            elif self.settings.secure != "off":
                raise SettingsError("--secure makes users for the embedded server; for your own server see infra/nats/")
            if self.replay:
                self.settings = asyncio.run(self._replay_settings(url))
                self.validate()
            self.console.print(f"[bold]pangea[/] job [cyan]{self.job}[/] on {url} -> {self.out}")
            try:
                return asyncio.run(self._supervise(url))
            except asyncio.CancelledError:  # SIGTERM while supervising (see `_supervise`)
                raise Terminated() from None
            finally:
                signal.signal(signal.SIGTERM, _raise_terminated)  # the loop's handler went with it
        except RoleDied as died:
            return died.exit_code
        except (KeyboardInterrupt, Terminated):
            self.console.print("[yellow]interrupted: stopping all roles[/]")
            return 130
        finally:
            self.stop_all()
            if self.server:
                self.server.stop()
            if self._keys:
                self._keys.cleanup()

    async def _replay_settings(self, url: str) -> RunSettings:
        """The original job's training settings, from its spec on the bus, for the replay job."""
        replay = self.replay
        async with Bus.opened(replay.model_copy(update={"nats_url": url}), "replay") as bus:
            raw = await bus.kv_get(subjects.job_bucket(replay.job), subjects.JobKey.SPEC)
            names = await bus.list_objects(subjects.checkpoint_bucket(replay.job)) if replay.from_round else []
        if raw is None:
            raise JobError(f"no job {replay.job!r} on {url}")
        stored = stored_rounds(names)
        if replay.from_round and not any(k <= replay.from_round for k in stored):
            raise JobError(
                f"job {replay.job!r} has no checkpoint at or before round {replay.from_round} "
                f"(it keeps rounds {stored or 'none'})"
            )
        spec = codec.decode(raw, JobSpec)
        if spec.mode == "diloco":
            raise JobError(
                f"job {replay.job!r} ran --mode diloco: replaying it from its stored batches is not supported yet"
            )
        return self.settings.model_copy(update={**settings_from_spec(spec), "source_job": replay.job})

    def validate(self) -> None:
        """Fail in one line, before any process starts, on a task, data set or model that cannot
        go together: build what the orchestrator will build."""
        from pangea.train.server import Server

        Server.build(self.settings)

    def _secure_config(self) -> str:
        """With --secure: a user per role (and per worker) with least-privilege permissions.

        With NKeys and JWTs the server's config holds public keys and JWTs only; the seed and
        creds files live in a private temporary directory (0700, files 0600) until the run ends.
        """
        method = self.settings.secure
        if method == "off":
            return ""
        try:
            from pangea.bus import identities  # makes keys with the nkeys package
        except ImportError as exc:
            raise SettingsError(f"--secure needs the nkeys package ({exc}): pip install 'nats-py[nkeys]'") from None
        users = security.job_roles(self.job, [f"w{i}" for i in range(self.settings.workers)], self.settings.shards)
        keys_dir = None
        if method != "password":
            self._keys = tempfile.TemporaryDirectory(prefix="pangea-keys-")
            keys_dir = Path(self._keys.name)
        self.issued = identities.issue(method, users, keys_dir)
        return self.issued.server_config

    def _login(self, user: str) -> dict[str, str]:
        return self.issued.env(user) if self.issued else {}

    async def _supervise(self, url: str) -> int:
        # SIGTERM cancels this task, as asyncio does for Ctrl+C.  Raised from a signal handler,
        # the exception could land inside nats-py's connection tasks, which logged and swallowed
        # it ("nats: "): the run went on (seen once in the test suite).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        env = self.role_env(url)
        scale = self.settings.autoscale_range
        workers = scale[1] if scale else self.settings.workers
        threads = self.settings.torch_threads or kernels.worker_threads(workers)
        orch_env = {**env, **self._login("orchestrator")}
        if scale:  # round 0 waits for MIN; the signal asks for more up to MAX
            orch_env.update(
                PANGEA_WORKERS=str(scale[0]), PANGEA_MIN_WORKERS=str(scale[0]), PANGEA_MAX_WORKERS=str(scale[1])
            )
        orchestrator = self.spawn("orchestrator", "orchestrator", orch_env)
        self.spawn("preprocessor", "preprocessor", {**env, **self._login("preprocessor")})
        for shard in range(1, self.settings.shards):
            self.spawn(
                f"shard-{shard}", "reducer", {**env, "PANGEA_SHARD": str(shard), **self._login(f"shard-{shard}")}
            )
        worker_env = {**env, "PANGEA_DEVICE": self.settings.device, "PANGEA_TORCH_THREADS": str(threads)}
        if scale:
            self.spawn(
                "autoscale",
                "autoscale",
                {
                    **worker_env,
                    "PANGEA_JOBS": self.job,
                    "PANGEA_MIN_WORKERS": str(scale[0]),
                    "PANGEA_MAX_WORKERS": str(scale[1]),
                    "PANGEA_UNTIL_IDLE": "true",
                    "PANGEA_LOG_DIR": str(self.out / "logs" / "autoscaled"),
                },
            )
        for i in range(0 if scale else workers):
            self.spawn(f"worker-{i}", "worker", {**worker_env, "PANGEA_WORKER_ID": f"w{i}", **self._login(f"w{i}")})
        observer = {"nats_url": url, "job": self.job}
        if self.issued:
            observer.update({name: None for name in _AUTH_FIELDS}, **self.issued.logins["observer"])
        bus = await Bus.connect(self.settings.model_copy(update=observer), "supervisor")
        try:
            with self._progress() as progress:
                task = progress.add_task("rounds", total=None, loss=math.nan, figure="", rate="")
                recent: deque[tuple[int, float]] = deque(maxlen=20)  # (targets, seconds) of the last rounds

                async def on_round(raw: bytes) -> None:
                    try:
                        done = codec.decode(raw, RoundDone)
                    except codec.CodecError:
                        return
                    recent.append((done.num_samples * max(1, done.targets_per_sample), done.seconds))
                    unit = "tokens" if done.targets_per_sample > 1 else "samples"
                    rate = sum(n for n, _ in recent) / max(1e-9, sum(s for _, s in recent))
                    fields = {"loss": done.loss, "rate": f"{rate:,.0f} {unit}/s"}
                    if not math.isnan(done.test_accuracy):
                        name = "test acc" if done.figure in ("", "test_accuracy") else done.figure.replace("_", " ")
                        fields["figure"] = f"{name} {done.test_accuracy:.4f}"
                    progress.update(task, total=done.total_rounds, completed=done.round + 1, **fields)

                await bus.subscribe_events(subjects.rounds(self.job), on_round)
                while orchestrator.proc.poll() != 0:
                    self._check_alive()
                    await asyncio.sleep(0.2)
        finally:
            await bus.close()
        await self._wait_for_others()
        self.console.print(self._summary())
        return 0

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[figure]}  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    def _check_alive(self) -> None:
        """Restart a role that died (its state is on the bus); give up when it crash-loops.

        A restarted orchestrator resumes from the job's last checkpoint.
        """
        for child in self.children:
            if child.proc.poll() is None or child.proc.returncode == 0:
                continue
            if child.proc.returncode != EXIT_USER_ERROR and child.may_restart(time.monotonic()):
                self.console.print(f"[yellow]role {child.name} {child.how_it_ended()}: restarting it[/]")
                if child.role == "orchestrator":
                    child.env = {**child.env, "PANGEA_RESUME": "true"}
                self.restart(child)
                continue
            self._report(child)
            loop = (
                f" ({MAX_RESTARTS} restarts within {RESTART_WINDOW:.0f} s)" if len(child.recent) >= MAX_RESTARTS else ""
            )
            user_error = child.proc.returncode == EXIT_USER_ERROR
            raise RoleDied(f"{child.name} {child.how_it_ended()}{loop}", EXIT_USER_ERROR if user_error else 1)

    def _report(self, child: Child) -> None:
        self.console.print(f"[red]role {child.name} {child.how_it_ended()}[/] (log: {child.log_path})")
        tail = child.log_tail()
        if tail:
            self.console.print(tail, markup=False, highlight=False)

    async def _wait_for_others(self) -> None:
        deadline = time.monotonic() + _GRACE_SECONDS
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in self.children):
            await asyncio.sleep(0.1)
        for child in self.children:
            if child.proc.poll() is None:
                log.warning("%s still running after the job ended: stopping it", child.name)

    def _summary(self) -> str:
        try:
            metrics = json.loads((self.out / "metrics.json").read_text())
        except (OSError, ValueError):
            return "done"
        final = metrics.get("final") or {}
        if "test_accuracy" in final:
            figure = f"final test accuracy [bold]{final['test_accuracy']:.4f}[/]"
        else:
            figure = ", ".join(
                f"final {k.replace('_', ' ')} [bold]{v:.4f}[/]"
                for k, v in final.items()
                if k in ("val_loss", "bits_per_byte", "bits_per_token", "test_loss")
            )
        rate = metrics.get("tokens_per_second") or metrics.get("samples_per_second") or 0
        unit = "tokens/s" if metrics.get("tokens_per_second") else "samples/s"
        return (
            f"[green]done[/]: {len(metrics['loss'])} rounds in {metrics['total_seconds']:.1f}s "
            f"({rate:,.0f} {unit}), {figure} -> {self.out}"
        )

    def stop_all(self) -> None:
        """SIGTERM every role still running, then SIGKILL what ignores it."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
