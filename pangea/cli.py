"""`pangea`: thin commands, each settings -> build -> run -> close.

Flags override PANGEA_* environment variables, which override defaults.  Mistakes a user
can make end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable

from pangea import settings as cfg
from pangea.bus.client import Bus, BusError
from pangea.bus.server import ServerError
from pangea.data import DataError
from pangea.models import ModelError
from pangea.training import Diverged

USER_ERRORS = (cfg.SettingsError, DataError, ModelError, BusError, ServerError, Diverged)
EXIT_USER_ERROR = 2  # a mistake a restart cannot fix: supervisors do not restart on it
EXAMPLES = {
    "run": "examples:\n  pangea run\n  pangea run --workers 4 --epochs 20 --out runs/digits4\n"
    "  PANGEA_NATS_URL=nats://127.0.0.1:4222 pangea run --job exp1 --optimizer adam --lr 0.001",
    "reference": "example:\n  pangea reference --epochs 20 --out runs/ref",
    "orchestrator": "example:\n  pangea orchestrator --nats-url nats://127.0.0.1:4222 --job exp1 --workers 2 --out runs/exp1",
    "preprocessor": "example:\n  pangea preprocessor --nats-url nats://127.0.0.1:4222 --job exp1",
    "worker": "example:\n  pangea worker --nats-url nats://127.0.0.1:4222 --job exp1",
    "delete": "example:\n  pangea delete --nats-url nats://127.0.0.1:4222 --job exp1",
    "replay": "examples:\n  pangea replay --nats-url nats://127.0.0.1:4222 --job exp1 --workers 3 --out runs/exp1-replay\n"
    "  pangea run --store-dir runs/store --job exp2 && pangea replay --store-dir runs/store --job exp2",
    "plot": "example:\n  pangea plot runs/digits4            # writes runs/digits4/dashboard.png",
    "checkpoint": "example:\n  pangea checkpoint export --nats-url nats://127.0.0.1:4222 --job exp1 --out exp1.pt\n"
    "  python -c \"import torch; sd = torch.load('exp1.pt'); print(list(sd))\"",
    "status": "examples:\n  pangea status --nats-url nats://127.0.0.1:4222 --job exp1\n"
    "  pangea status --job exp1 --json   # for scripts and autoscalers",
}


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (same for run and reference)")
    g.add_argument("--dataset", help="digits, or a .npz with x_train, y_train, x_test, y_test")
    g.add_argument("--model", help="mlp, or module:factory returning a torch.nn.Module")
    g.add_argument("--hidden", help="hidden widths of mlp, e.g. 256,128")
    g.add_argument("--epochs", help="passes over the training set")
    g.add_argument("--batch-size", help="global batch size (independent of the worker count)")
    g.add_argument("--lr", help="learning rate")
    g.add_argument("--momentum", help="SGD momentum")
    g.add_argument("--weight-decay", help="L2 weight decay")
    g.add_argument("--optimizer", help="sgd or adam")
    g.add_argument("--seed", help="seed of model init and batch order")
    g.add_argument("--compression", help="none (exact), fp16, bf16, int8 or topk: gradients on the wire")
    g.add_argument("--topk-fraction", help="topk: fraction of each chunk's elements sent (default 0.01)")
    m = p.add_argument_group("mode (same for run and reference)")
    m.add_argument("--mode", help="sync (default), diloco (local steps + outer step) or async (bounded staleness)")
    m.add_argument("--local-steps", help="diloco: inner steps per worker per round, H (default 20)")
    m.add_argument("--inner-optimizer", help="diloco: adamw (default), adam or sgd")
    m.add_argument("--inner-lr", help="diloco: inner learning rate (default 0.001)")
    m.add_argument("--outer-lr", help="diloco: outer Nesterov SGD learning rate (default 0.7)")
    m.add_argument("--outer-momentum", help="diloco: outer Nesterov SGD momentum (default 0.9)")
    m.add_argument("--staleness", help="async: apply gradients at most this many updates old (default 2)")


def _bus_flags(p: argparse.ArgumentParser, job_help: str = "job name") -> None:
    g = p.add_argument_group("bus")
    g.add_argument("--nats-url", help="NATS URL(s), comma-separated (env PANGEA_NATS_URL)")
    g.add_argument("--job", help=job_help)
    g.add_argument("--chunk-bytes", help="largest tensor chunk per message")
    g.add_argument("--storage", help="file or memory (JetStream storage)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pangea", description="Data-parallel PyTorch training over NATS JetStream.",
        epilog="Every flag can also be set as a PANGEA_<NAME> environment variable (or in .env).",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--log-format", help="text (default) or json: one JSON object per line")
    sub = parser.add_subparsers(dest="command", metavar="command")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=help_, epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = command("run", "train with every role as a local process, on an embedded NATS unless PANGEA_NATS_URL")
    _train_flags(run)
    run.add_argument("--workers", help="number of worker processes (default 2)")
    run.add_argument("--device", help="auto, cpu or cuda for the workers")
    run.add_argument("--out", help="output directory (default runs/<job>)")
    run.add_argument("--store-dir", help="JetStream store of the embedded server (default: temporary)")
    run.add_argument("--resume", help="true: continue an existing job from its last checkpoint")
    run.add_argument("--secure", action="store_const", const=True, help="a user with least-privilege permissions per role")
    run.add_argument("--checkpoint-every", help="store a checkpoint every N rounds (0: only at the end)")
    run.add_argument("--aggregator", help="mean (exact), trimmed-mean, median or krum (robust to poisoned gradients)")
    run.add_argument("--byzantine", help="trimmed-mean/krum: how many contributions may be malicious (default 1)")
    run.add_argument("--clip-norm", help="clip each shard gradient to this L2 norm first (0: off)")
    run.add_argument("--policy", help="exact (re-issue slow shards) or quorum (close rounds without them)")
    run.add_argument("--straggler-deadline", help="seconds a round waits for a shard (0: adaptive)")
    run.add_argument("--shards", help="orchestrator shards: S processes each average one slice (default 1)")
    run.add_argument("--net-delay", help="seconds of artificial delay before every publish (models a slow link)")
    _bus_flags(run, "job name (default: generated)")

    ref = command("reference", "train in one plain process with no bus: the yardstick for exactness")
    _train_flags(ref)
    ref.add_argument("--out", help="output directory (default runs/reference)")
    ref.add_argument("--workers", help="diloco: workers to simulate (default 2)")

    orch = command("orchestrator", "run the orchestrator role: model, optimizer, round plans")
    _train_flags(orch)
    orch.add_argument("--workers", help="workers that must be present before round 0")
    orch.add_argument("--out", help="output directory")
    orch.add_argument("--resume", help="true: continue an existing job from its last checkpoint")
    orch.add_argument("--checkpoint-every", help="store a checkpoint every N rounds (0: only at the end)")
    orch.add_argument("--aggregator", help="mean (exact), trimmed-mean, median or krum (robust to poisoned gradients)")
    orch.add_argument("--byzantine", help="trimmed-mean/krum: how many contributions may be malicious (default 1)")
    orch.add_argument("--clip-norm", help="clip each shard gradient to this L2 norm first (0: off)")
    orch.add_argument("--policy", help="exact (re-issue slow shards) or quorum (close rounds without them)")
    orch.add_argument("--straggler-deadline", help="seconds a round waits for a shard (0: adaptive)")
    orch.add_argument("--shards", help="orchestrator shards: S processes each average one slice (default 1)")
    _bus_flags(orch)

    red = command("reducer", "run orchestrator shard S of a job started with --shards: averages one slice of the gradient")
    red.add_argument("--shard", help="which slice this process averages: 1 .. shards-1")
    _bus_flags(red)

    pre = command("preprocessor", "run the preprocessor role: publishes each worker's shards")
    pre.add_argument("--dataset", help="override the job's dataset path on this host")
    _bus_flags(pre)

    work = command("worker", "run one worker: joins the job by subscribing")
    work.add_argument("--worker-id", help="worker id (default host-pid-random)")
    work.add_argument("--device", help="auto, cpu or cuda")
    work.add_argument("--torch-threads", help="torch intra-op threads (0: torch default)")
    _bus_flags(work)

    replay = command("replay", "train again on a job's stored batch stream (no dataset preprocessing), as a new job")
    replay.add_argument("--workers", help="workers of the replay (default 2; may differ from the original)")
    replay.add_argument("--out", help="output directory (default runs/<replay job>)")
    replay.add_argument("--replay-job", help="name of the replay job (default <job>-replay-<time>)")
    replay.add_argument("--store-dir", help="without --nats-url: the embedded server's store holding the job")
    replay.add_argument("--device", help="auto, cpu or cuda for the workers")
    replay.add_argument("--from-round", help="start at the job's checkpoint at or before this round (default 0)")
    _bus_flags(replay, "the job to replay")

    status = command("status", "members, backlog, progress and round times of a job")
    status.add_argument("--json", action="store_true", default=None, help="print JSON instead of a table")
    _bus_flags(status)

    plot = command("plot", "render a run's metrics.json as a PNG: loss, accuracy, round time, throughput")
    plot.add_argument("dir", help="a run's output directory (holding metrics.json)")
    plot.add_argument("--out", help="the PNG to write (default DIR/dashboard.png)")

    ckpt = command("checkpoint", "export a job's last checkpoint as a plain torch state_dict")
    ckpt.add_argument("action", choices=["export"], help="export: write the state_dict file")
    ckpt.add_argument("--out", required=True, help="the .pt file to write")
    _bus_flags(ckpt)

    delete = command("delete", "remove a job's streams and buckets from the server")
    _bus_flags(delete)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    skip = {"command", "log_level", "log_format"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, with the job, role and worker a log search filters on."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.fields = {"role": role, "job": os.environ.get("PANGEA_JOB"), "worker": os.environ.get("PANGEA_WORKER_ID")}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), **{k: v for k, v in self.fields.items() if v},
        }
        round_ = _ROUND_RE.search(entry["message"])
        if round_:
            entry["round"] = int(round_.group(1))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_ROUND_RE = re.compile(r"\bround (\d+)")


def _setup_logging(level: str, role: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{role}] %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("nats").setLevel(logging.WARNING)


def _run_async(main: Callable[[], object], graceful: list | None = None) -> int:
    """Run a coroutine function; SIGTERM/SIGINT cancel it and exit 143/130.

    If `graceful` holds an object with `request_stop()`, the first signal asks it to stop
    and only a second one cancels.
    """

    async def wrapper() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        got: list[int] = []

        def on_signal(sig: int) -> None:
            got.append(sig)
            if graceful and len(got) == 1:
                graceful[0].request_stop()
            else:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await main()
            return 0
        except asyncio.CancelledError:
            return 128 + (got[0] if got else signal.SIGTERM)

    return asyncio.run(wrapper())


def _role(name: str, settings, build) -> int:
    from pangea.telemetry import HealthServer

    holder: list = []
    health = None
    if settings.http_port:
        try:
            health = HealthServer(settings.http_port).start()
        except OSError as exc:
            if "http_port" in settings.model_fields_set:  # asked for explicitly: a real conflict
                raise BusError(
                    f"cannot serve health/metrics on port {settings.http_port} (PANGEA_HTTP_PORT): {exc}"
                ) from None
            # The default port is taken (several roles on one machine): any free port will do.
            health = HealthServer(0).start()
            logging.getLogger(__name__).warning(
                "port %d is taken: health/metrics on port %d instead", settings.http_port, health.port
            )

    async def main() -> None:
        bus = await Bus.connect(settings, name)
        if health:
            health.set_ready(True)
            logging.getLogger(__name__).info(
                "health and metrics on http://127.0.0.1:%d (/healthz /readyz /metrics)", health.port
            )
        try:
            role = build(settings, bus)
            if hasattr(role, "request_stop"):
                holder.append(role)
            await role.run()
        finally:
            if health:
                health.set_ready(False)
            await bus.close()

    try:
        return _run_async(main, holder)
    finally:
        if health:
            health.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        args = parser.parse_args(["run", *(argv or [])])
    log_format = args.log_format or os.environ.get("PANGEA_LOG_FORMAT", "text")
    if log_format not in ("text", "json"):
        print(f"pangea: error: invalid setting --log-format = {log_format!r}: use text or json", file=sys.stderr)
        return EXIT_USER_ERROR
    os.environ["PANGEA_LOG_FORMAT"] = log_format  # the roles `pangea run` starts log the same way
    _setup_logging(args.log_level, args.command, log_format)
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        print(f"pangea {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `pangea status --json | head`
        sys.stderr.close()
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    over = _overrides(args)
    if args.command == "run":
        from pangea.supervisor import Supervisor

        return Supervisor(cfg.load(cfg.RunSettings, **over)).run()
    if args.command == "reference":
        from pangea.reference import train_reference

        metrics = train_reference(cfg.load(cfg.ReferenceSettings, **over))
        print(f"reference: final test accuracy {metrics.final_test_accuracy:.4f}")
        return 0
    if args.command == "orchestrator":
        from pangea.roles.orchestrator import Orchestrator

        return _role("orchestrator", cfg.load(cfg.OrchestratorSettings, **over), Orchestrator)
    if args.command == "reducer":
        from pangea.roles.reducer import Reducer

        return _role("reducer", cfg.load(cfg.ReducerSettings, **over), Reducer)
    if args.command == "preprocessor":
        from pangea.roles.preprocessor import Preprocessor

        return _role("preprocessor", cfg.load(cfg.PreprocessorSettings, **over), Preprocessor)
    if args.command == "worker":
        from pangea.roles.worker import Worker

        return _role("worker", cfg.load(cfg.WorkerSettings, **over), Worker)
    if args.command == "replay":
        from pangea.supervisor import Supervisor

        replay = cfg.load(cfg.ReplaySettings, **over)
        run = cfg.RunSettings(
            nats_url=replay.nats_url, job=replay.replay_job, out=replay.out, workers=replay.workers,
            store_dir=replay.store_dir, device=replay.device, from_round=replay.from_round,
        )
        return Supervisor(run, replay=replay).run()
    if args.command == "status":
        return _status(cfg.load(cfg.BusSettings, **{k: v for k, v in over.items() if k != "json"}), bool(args.json))
    if args.command == "plot":
        from pathlib import Path

        from pangea.outputs import plot_dashboard

        source = Path(args.dir) / "metrics.json"
        try:
            metrics = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            raise cfg.SettingsError(f"cannot read {source}: {exc.__class__.__name__}: {exc}") from None
        target = Path(args.out) if args.out else Path(args.dir) / "dashboard.png"
        plot_dashboard(metrics, target)
        print(f"wrote {target}")
        return 0
    if args.command == "checkpoint":
        from pathlib import Path

        from pangea.export import export_checkpoint

        settings = cfg.load(cfg.BusSettings, **{k: v for k, v in over.items() if k not in ("action", "out")})

        async def export() -> None:
            bus = await Bus.connect(settings, "export")
            try:
                rounds = await export_checkpoint(bus, Path(args.out))
            finally:
                await bus.close()
            print(f"wrote {args.out}: job {settings.job} after {rounds} rounds (load with model.load_state_dict)")

        return _run_async(export)
    if args.command == "delete":
        settings = cfg.load(cfg.BusSettings, **over)

        async def delete() -> None:
            bus = await Bus.connect(settings, "delete")
            try:
                await bus.delete_job()
            finally:
                await bus.close()
            print(f"deleted job {settings.job}")

        return _run_async(delete)
    raise AssertionError(args.command)


def _status(settings: cfg.BusSettings, as_json: bool) -> int:
    import json

    from rich.console import Console

    from pangea.status import job_status, print_status

    async def show() -> None:
        bus = await Bus.connect(settings, "status")
        try:
            status = await job_status(bus)
        finally:
            await bus.close()
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            print_status(status, Console())

    return _run_async(show)


if __name__ == "__main__":
    sys.exit(main())
