"""The `pangea` command line, declared from the settings: a flag per setting, its help the field's description.

A flag is named after its settings field (`--batch-size` is `batch_size`), and its help text
and default come from that field of the command's settings class, so the two cannot drift
and `pangea docs`'s table says the same as `--help`.  Only what is not a setting (positional
paths, `--secure`'s bare form, `status --json`) is declared here by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangea import settings as cfg

TRAIN = (
    "task step dataset val_dataset transform collate columns image_size normalize token_dtype "
    "model hidden context vocab val_fraction eval_windows eval_every layers heads dim "
    "epochs max_steps batch_size micro_batch precision lr momentum weight_decay optimizer lr_schedule "
    "warmup_steps clip_grad seed compression topk_fraction"
).split()
MODE = "mode local_steps inner_optimizer inner_lr outer_lr outer_momentum staleness".split()
BUS = "nats_url job chunk_bytes storage".split()
ROBUST = "aggregator byzantine clip_norm policy straggler_deadline shards".split()
SCALING = "min_workers max_workers scale_efficiency scale_cooldown".split()

EXAMPLES = {
    "run": "examples:\n  pangea run\n  pangea run --workers 4 --epochs 20 --out runs/digits4\n"
    "  PANGEA_NATS_URL=nats://127.0.0.1:4222 pangea run --job exp1 --optimizer adam --lr 0.001\n"
    "  pangea run --secure nkey           # a least-privilege user per role, known by its NKey",
    "reference": "examples:\n  pangea reference --epochs 20 --out runs/ref            # 2 workers' shards, as pangea run\n"
    "  pangea reference --workers 1 --out runs/whole       # the plain whole-batch loop\n"
    "  pangea reference --plans-from runs/digits4 --out runs/again   # the rounds a run recorded",
    "verify": "examples:\n  pangea verify runs/digits4          # exit 0: exact; 1: not; writes runs/digits4/verify/\n"
    "  pangea verify runs/big --dataset /data/big.npz --tolerance 1e-5",
    "orchestrator": "example:\n  pangea orchestrator --nats-url nats://127.0.0.1:4222 --job exp1 --workers 2 --out runs/exp1",
    "preprocessor": "example:\n  pangea preprocessor --nats-url nats://127.0.0.1:4222 --job exp1",
    "worker": "example:\n  pangea worker --nats-url nats://127.0.0.1:4222 --job exp1",
    "delete": "example:\n  pangea delete --nats-url nats://127.0.0.1:4222 --job exp1",
    "replay": "examples:\n  pangea replay --nats-url nats://127.0.0.1:4222 --job exp1 --workers 3 --out runs/exp1-replay\n"
    "  pangea run --store-dir runs/store --job exp2 && pangea replay --store-dir runs/store --job exp2",
    "corpus": "example:\n  pangea corpus stdlib runs/stdlib.txt\n"
    "  pangea run --task lm --model gpt --dataset runs/stdlib.txt --workers 4",
    "plot": "example:\n  pangea plot runs/digits4            # writes runs/digits4/dashboard.png",
    "checkpoint": "example:\n  pangea checkpoint export --nats-url nats://127.0.0.1:4222 --job exp1 --out exp1.pt\n"
    "  python -c \"import torch; sd = torch.load('exp1.pt'); print(list(sd))\"",
    "autoscale": "examples:\n  pangea autoscale --nats-url nats://127.0.0.1:4222 --max-workers 4\n"
    "  pangea orchestrator --job big --workers 1 --max-workers 4 ... & pangea autoscale --max-workers 4\n"
    "  pangea autoscale --jobs digits --max-workers 4 --compose 'docker compose -f infra/docker-compose.yaml'",
    "status": "examples:\n  pangea status --nats-url nats://127.0.0.1:4222 --job exp1\n"
    "  pangea status --job exp1 --json   # for scripts and autoscalers",
}

REFERENCE = (
    "train in one plain process with no bus: the yardstick for exactness.  Each round's K shard "
    "gradients (or diloco pseudo-gradients) are computed one after the other with the kernels "
    "pangea run's workers use (same torch build, device and intra-op threads: --torch-threads "
    "defaults to cpu_count // K, as pangea run gives each worker), their loss-sum gradients summed in "
    "float64 over their counts as the orchestrator sums them, and the same optimizer steps.  A run of K workers "
    "equals it to float rounding of the order chunks arrive in (about 1e-7 or less).  "
    "--workers 1 is the plain whole-batch loop, which drifts from any K > 1 by up to 1e-3 "
    "over a long run: another summation order, amplified by training."
)
VERIFY = (
    "prove a finished run: recompute, in this process, exactly the rounds it recorded in "
    "DIR/plans.jsonl (each shard's rows of each global batch, whoever computed it, with that "
    "worker's torch threads; joins, leaves, kills, re-issues and replays included) and report "
    "max |Δ| against DIR/params.npz.  Exit 0 when within --tolerance, 1 when not.  Runs with "
    "--mode async, lossy --compression or --policy quorum rounds are not exact by design and refused."
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(value: object) -> str | None:
    """How a field's default reads in help, or None when there is nothing worth saying."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_for(model: type[cfg.BaseSettings], name: str) -> str:
    """The field's description, with its default unless the description already says it."""
    info = model.model_fields[name]  # KeyError: a flag without a setting
    text = info.description or name.replace("_", " ")
    default = _default(info.default)
    if default is not None and "default" not in text:
        text += f" (default {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def settings_flags(group, model: type[cfg.BaseSettings], names: list[str]) -> None:
    for name in names:
        group.add_argument(flag(name), dest=name, help=help_for(model, name))


def _with_groups(p: argparse.ArgumentParser, model: type[cfg.BaseSettings], *, train: bool, bus: bool) -> None:
    if train:
        settings_flags(p.add_argument_group("training (same for run and reference)"), model, TRAIN)
        settings_flags(p.add_argument_group("mode (same for run and reference)"), model, MODE)
    if bus:
        settings_flags(p.add_argument_group("bus"), model, BUS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pangea",
        description="Data-parallel PyTorch training over NATS JetStream.",
        epilog="Every flag can also be set as a PANGEA_<NAME> environment variable (or in .env).",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--log-format", help="text (default) or json: one JSON object per line")
    sub = parser.add_subparsers(dest="command", metavar="command")

    def command(name: str, help_: str, model=None, names=(), *, train=False, bus=False) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if model is not None:
            _with_groups(p, model, train=train, bus=False)
            settings_flags(p, model, list(names))
            _with_groups(p, model, train=False, bus=bus)
        return p

    run = command(
        "run",
        "train with every role as a local process, on an embedded NATS unless PANGEA_NATS_URL",
        cfg.RunSettings,
        "workers device torch_threads data_workers out store_dir resume checkpoint_every".split()
        + ROBUST
        + SCALING
        + ["autoscale", "net_delay"],
        train=True,
        bus=True,
    )
    run.add_argument(
        "--secure",
        nargs="?",
        const="password",
        metavar="HOW",
        help="a user with least-privilege permissions per role, known by password (default), "
        "nkey (the server holds public keys only) or jwt (operator, account and creds files)",
    )
    command(
        "reference",
        REFERENCE,
        cfg.ReferenceSettings,
        "out workers torch_threads device plans_from allow_pickled_code".split(),
        train=True,
    )
    ver = command("verify", VERIFY)
    ver.add_argument("dir", help="a finished run's output directory (params.npz, metrics.json, plans.jsonl)")
    settings_flags(ver, cfg.VerifySettings, ["tolerance", "dataset", "out", "allow_pickled_code"])
    command(
        "orchestrator",
        "run the orchestrator role: model, optimizer, round plans",
        cfg.OrchestratorSettings,
        "workers out resume checkpoint_every".split() + ROBUST + SCALING,
        train=True,
        bus=True,
    )
    command(
        "reducer",
        "run orchestrator shard S of a job started with --shards: averages one slice of the gradient",
        cfg.ReducerSettings,
        ["shard"],
        bus=True,
    )
    command(
        "preprocessor",
        "run the preprocessor role: publishes each worker's shards",
        cfg.PreprocessorSettings,
        ["dataset", "data_workers", "code_dir", "allow_pickled_code"],
        bus=True,
    )
    command(
        "worker",
        "run one worker: joins the job by subscribing",
        cfg.WorkerSettings,
        ["worker_id", "device", "torch_threads", "code_dir", "allow_pickled_code"],
        bus=True,
    )
    command(
        "replay",
        "train again on a job's stored batch stream (no dataset preprocessing), as a new job",
        cfg.ReplaySettings,
        "workers out replay_job store_dir device from_round".split(),
        bus=True,
    )
    command(
        "autoscale",
        "run workers for every job on the server, as many as each job's orchestrator asks for "
        "(local processes, or a docker compose deployment's worker service)",
        cfg.AutoscaleSettings,
        "jobs min_workers max_workers period torch_threads log_dir until_idle compose compose_service".split(),
        bus=True,
    )
    status = command("status", "members, backlog, progress and round times of a job", cfg.BusSettings, bus=True)
    status.add_argument("--json", action="store_true", default=None, help="print JSON instead of a table")

    corpus = command("corpus", "write an offline text corpus for --task lm: this Python's standard library source")
    corpus.add_argument("source", choices=["stdlib"], help="stdlib: the top-level *.py files of the standard library")
    corpus.add_argument("out", help="the .txt to write")
    plot = command("plot", "render a run's metrics.json as a PNG: loss, accuracy, round time, throughput")
    plot.add_argument("dir", help="a run's output directory (holding metrics.json)")
    plot.add_argument("--out", help="the PNG to write (default DIR/dashboard.png)")
    ckpt = command(
        "checkpoint", "export a job's last checkpoint as a plain torch state_dict", cfg.BusSettings, bus=True
    )
    ckpt.add_argument("action", choices=["export"], help="export: write the state_dict file")
    ckpt.add_argument("--out", required=True, help="the .pt file to write")
    command("delete", "remove a job's streams and buckets from the server", cfg.BusSettings, bus=True)
    return parser


def overrides(args: argparse.Namespace) -> dict:
    """The flags given, as settings overrides (flags beat PANGEA_* variables, which beat defaults)."""
    skip = {"command", "log_level", "log_format"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}
