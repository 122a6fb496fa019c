"""`pangea`: thin commands, each settings -> build -> run -> close.

Flags (declared from the settings, `parser`) override PANGEA_* environment variables, which
override defaults.  Mistakes a user can make end in one line on stderr and a non-zero exit,
never a traceback.  Roles are hosted by `hosting`; logs are set up by `logs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from pangea import settings as cfg
from pangea.app.hosting import host_role, run_async
from pangea.app.logs import setup_logging
from pangea.app.parser import build_parser, overrides
from pangea.bus.client import Bus
from pangea.errors import EXIT_USER_ERROR, UserError

USER_ERRORS = (UserError,)  # one line and EXIT_USER_ERROR: a mistake a restart cannot fix


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
    setup_logging(args.log_level, args.command, log_format)
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        print(f"pangea {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `pangea status --json | head`
        sys.stderr.close()
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    over = overrides(args)
    if args.command == "run":
        from pangea.app.supervisor import Supervisor

        return Supervisor(cfg.load(cfg.RunSettings, **over)).run()
    if args.command == "reference":
        return _reference(cfg.load(cfg.ReferenceSettings, **over))
    if args.command == "verify":
        return _verify(args.dir, cfg.load(cfg.VerifySettings, **{k: v for k, v in over.items() if k != "dir"}))
    if args.command == "orchestrator":
        from pangea.roles.orchestrator import Orchestrator

        return host_role("orchestrator", cfg.load(cfg.OrchestratorSettings, **over), Orchestrator)
    if args.command == "reducer":
        from pangea.roles.reducer import Reducer

        return host_role("reducer", cfg.load(cfg.ReducerSettings, **over), Reducer)
    if args.command == "preprocessor":
        from pangea.roles.preprocessor import Preprocessor

        return host_role("preprocessor", cfg.load(cfg.PreprocessorSettings, **over), Preprocessor)
    if args.command == "worker":
        from pangea.roles.worker import Worker

        return host_role("worker", cfg.load(cfg.WorkerSettings, **over), Worker)
    if args.command == "autoscale":
        from pangea.app.autoscale import Autoscaler

        return host_role("autoscale", cfg.load(cfg.AutoscaleSettings, **over), Autoscaler)
    if args.command == "replay":
        from pangea.app.supervisor import Supervisor

        replay = cfg.load(cfg.ReplaySettings, **over)
        run = cfg.RunSettings(
            nats_url=replay.nats_url,
            job=replay.replay_job,
            out=replay.out,
            workers=replay.workers,
            store_dir=replay.store_dir,
            device=replay.device,
            from_round=replay.from_round,
        )
        return Supervisor(run, replay=replay).run()
    if args.command == "status":
        return _status(cfg.load(cfg.BusSettings, **{k: v for k, v in over.items() if k != "json"}), bool(args.json))
    if args.command == "corpus":
        from pathlib import Path

        from pangea.train.tokens import stdlib_corpus, unigram_entropy_bits

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        files, size = stdlib_corpus(out)
        print(
            f"wrote {out}: {files} files, {size:,} bytes; unigram entropy "
            f"{unigram_entropy_bits(out):.3f} bits/byte (what a model that learned only byte frequencies scores)"
        )
        return 0
    if args.command == "plot":
        from pathlib import Path

        from pangea.train.outputs import plot_dashboard

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

        from pangea.app.export import export_checkpoint

        settings = cfg.load(cfg.BusSettings, **{k: v for k, v in over.items() if k not in ("action", "out")})

        async def export() -> None:
            async with Bus.opened(settings, "export") as bus:
                rounds = await export_checkpoint(bus, Path(args.out), allow_pickle=settings.allow_pickled_code)
            print(f"wrote {args.out}: job {settings.job} after {rounds} rounds (load with model.load_state_dict)")

        return run_async(export)
    if args.command == "delete":
        settings = cfg.load(cfg.BusSettings, **over)

        async def delete() -> None:
            async with Bus.opened(settings, "delete") as bus:
                await bus.delete_job()
            print(f"deleted job {settings.job}")

        return run_async(delete)
    raise AssertionError(args.command)


def _reference(settings: cfg.ReferenceSettings) -> int:
    from pangea.train.reference import train_reference

    with _rounds_progress("reference") as progress:
        if settings.plans_from:
            from pangea.train.exactness import verify

            run = settings.plans_from
            verdict = verify(
                run,
                out=settings.out,
                dataset=settings.dataset if "dataset" in settings.model_fields_set else None,
                progress=progress,
                allow_pickle=settings.allow_pickled_code,
            )
            print(
                f"reference: recomputed {verdict.rounds} rounds of {run} -> {settings.out} "
                f"(max |Δ| to the run {verdict.max_abs_diff:.3g})"
            )
            return 0
        metrics = train_reference(settings, progress)
    figures = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.final.items())
    print(f"reference: final {figures} -> {settings.out}")
    return 0


def _verify(run_dir: str, settings: cfg.VerifySettings) -> int:
    from pathlib import Path

    from pangea.train.exactness import verify

    with _rounds_progress("verify") as progress:
        verdict = verify(
            Path(run_dir),
            tolerance=settings.tolerance,
            out=settings.out,
            dataset=settings.dataset,
            progress=progress,
            allow_pickle=settings.allow_pickled_code,
        )
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    print(verdict.line())
    return 0 if verdict.exact else 1


@contextlib.contextmanager
def _rounds_progress(what: str):
    """A rich progress bar over rounds on stderr; yields the callback train_reference takes."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold blue]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(what, total=None, loss=float("nan"))

    def update(done: int, total: int, loss: float, accuracy: float | None) -> None:
        bar.update(task, completed=done, total=total, loss=loss)

    with bar:
        yield update


def _status(settings: cfg.BusSettings, as_json: bool) -> int:
    import json

    from rich.console import Console

    from pangea.app.status import job_status, print_status

    async def show() -> None:
        async with Bus.opened(settings, "status") as bus:
            status = await job_status(bus)
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            print_status(status, Console())

    return run_async(show)


if __name__ == "__main__":
    sys.exit(main())
