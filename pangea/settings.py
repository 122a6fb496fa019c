"""Configuration: one pydantic-settings class per role, composed from shared parts.

Every field is read from a `PANGEA_<FIELD>` environment variable (or a `.env` file) and
can be overridden by the matching command-line flag.  A bad value raises `SettingsError`
with one line naming the variable and the flag.

Why one module of ~330 lines: it is the one field list of Pangea (each setting declared once:
its type, bounds, default and description, from which the flags, `pangea docs`'s table and
the job spec follow), and the few cross-field checks that need two fields at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pangea.errors import SettingsError

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# User code: an importable `module:attribute` (the attribute may be dotted, Class.method), or an
# object `pangea.fit` pickled by value (a model or step defined in a notebook or __main__), named
# by the sha256 of its bytes.
USER_CODE = r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*|pickle:[0-9a-f]{64}"
ALLOW_PICKLED_CODE = (
    "run a model, step, optimizer, dataset, transform or collate shipped as pickled code (pickle:<sha256>, "
    "from pangea.fit): a worker or preprocessor fetching it from the job's code bucket, verify and reference "
    "--plans-from reading a run's code/; whoever wrote those bytes can then run code here"
)


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PANGEA_", env_file=".env", extra="ignore", validate_default=True)


class BusSettings(_Base):
    """How to reach NATS and name the job's subjects."""

    nats_url: str | None = Field(
        None, description="NATS server URL(s), comma-separated; unset: start an embedded server"
    )
    job: str = Field("pangea", pattern=NAME_PATTERN, description="job name: prefix of subjects and streams")
    nats_token: SecretStr | None = Field(None, description="NATS auth token (never logged)")
    nats_user: str | None = Field(None, description="NATS user name")
    nats_password: SecretStr | None = Field(None, description="NATS password (never logged)")
    nats_nkey_seed: Path | None = Field(None, description="file holding an NKey seed to authenticate with")
    nats_creds: Path | None = Field(None, description="NATS credentials file (JWT + NKey seed)")
    tls_ca: Path | None = Field(None, description="CA certificate that signed the server's certificate (enables TLS)")
    tls_cert: Path | None = Field(None, description="client certificate, for servers that verify clients")
    tls_key: Path | None = Field(None, description="client certificate's private key")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to wait for the NATS server")
    chunk_bytes: int = Field(
        1 << 20, ge=4096, description="largest tensor chunk per message (capped by the server's max payload)"
    )
    publish_window: int = Field(64, ge=1, description="JetStream publishes in flight per process")
    publish_window_bytes: int = Field(
        4 << 20, ge=1, description="bytes of JetStream publishes in flight per process (at least one message)"
    )
    storage: Literal["file", "memory"] = Field(
        "file", description="JetStream storage for the job's batches (the replay log), plans and buckets"
    )
    derived_storage: Literal["file", "memory"] = Field(
        "memory",
        description="JetStream storage for gradients and parameters (recomputable: a server restart loses them, "
        "and the orchestrator publishes its parameters and asks for the round's gradients again); "
        "file: they survive a restart, for ~2x the server's CPU per round",
    )
    replicas: int = Field(1, ge=1, le=5, description="JetStream replicas of the job's streams and buckets (clusters)")
    batch_retention_hours: float = Field(24.0, gt=0, description="how long stored batches stay replayable")
    batch_retention_bytes: int = Field(-1, ge=-1, description="most bytes the batch stream keeps (-1: no limit)")
    batch_retention_rounds: int = Field(
        0, ge=0, description="keep only the batches of this many latest rounds (0: no limit)"
    )
    full_store_wait: float = Field(
        300.0,
        gt=0,
        description="seconds a role waits for room when the server's JetStream storage is full, before it stops "
        "(one line names the stream and what frees space)",
    )
    http_port: int | Literal["any"] = Field(
        8000,
        description="port of /healthz, /readyz and /metrics (0: off; any: a free one; the default moves to a "
        "free one when 8000 is taken, a port that is set does not)",
    )
    http_host: str = Field(
        "127.0.0.1", min_length=1, description="address the health/metrics server binds (0.0.0.0: every interface)"
    )
    health_file: Path | None = Field(
        None, description="where the role writes the address of its /healthz, for `python -m pangea.probe`"
    )
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or as JSON objects")
    heartbeat_seconds: float = Field(1.0, gt=0, description="worker heartbeat period")
    member_ttl: float = Field(10.0, gt=0, description="seconds without heartbeat before a worker is gone")
    net_delay: float = Field(
        0.0, ge=0, description="artificial delay in seconds before each publish of a message group (models a slow link)"
    )
    allow_pickled_code: bool = Field(False, description=ALLOW_PICKLED_CODE)

    @field_validator("http_port", mode="before")
    @classmethod
    def _port_or_any(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "any":
            return "any"
        try:
            port = int(str(value).strip())
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise ValueError("expected a port 0-65535 (0: off) or any (a free port)")
        return port

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in (self.nats_url or "").split(",") if u.strip()]


class TrainSettings(_Base):
    """What to train and how: identical for `pangea run` and `pangea reference`."""

    task: str = Field(
        "classify",
        pattern=rf"^(classify|lm|{USER_CODE})$",
        description="classify (cross-entropy, accuracy), lm (next-token, bits per token) or module:function "
        "(a loss of (output, target), the mean over the batch)",
    )
    step: str = Field(
        "",
        pattern=rf"^({USER_CODE})?$",
        description="module:function: step(model, batch) -> (loss_sum, count), the loss summed over the shard's "
        "counted targets and their number (default: the task's step)",
    )
    dataset: str = Field(
        "digits",
        description="`digits`, an .npz (x_train, y_train, x_test, y_test), a directory of NAME_train.npy / "
        "NAME_test.npy, Parquet files, a Hugging Face save_to_disk directory, imagefolder:ROOT or module:factory; "
        "for lm .txt or .bin token files (one, a directory or a glob)",
    )
    val_dataset: str | None = Field(
        None, description="a separate evaluation source of the same kind (lm: the validation token files)"
    )
    transform: str = Field(
        "",
        pattern=rf"^({USER_CODE})?$",
        description="module:function: transform(sample, rng) -> sample, per training sample, rng keyed by "
        "(seed, epoch, index); rng is None for evaluation samples",
    )
    collate: str = Field(
        "",
        pattern=rf"^({USER_CODE})?$",
        description="module:function: collate(samples, rng) -> batch, once per global batch before it is cut "
        "(padding, mixup), rng keyed by (seed, epoch, step)",
    )
    columns: str = Field(
        "",
        pattern=r"^([A-Za-z_]\w*=[^,=]+(,[A-Za-z_]\w*=[^,=]+)*)?$",
        description="NAME=column,...: a table's columns under the names steps read (x, y, ...); default: "
        "columns named x and y, and every other column under its own name",
    )
    image_size: int = Field(32, ge=1, description="imagefolder: the side of the square crops (pixels)")
    normalize: str = Field(
        "",
        pattern=r"^(imagenet|[-0-9.eE]+(,[-0-9.eE]+)*/[-0-9.eE]+(,[-0-9.eE]+)*)?$",
        description="uint8 image bytes x reach the model as x / 255; then (x - mean) / std per channel: "
        "imagenet or MEANS/STDS (e.g. 0.5,0.5,0.5/0.25,0.25,0.25)",
    )
    token_dtype: Literal["uint16", "uint32"] = Field(
        "uint16", description="lm: the tokens of headerless .bin files (llm.c's shards say theirs in a header)"
    )
    model: str = Field(
        "mlp",
        description="`mlp`, `cnn`, `gpt` or `module:factory` returning a torch.nn.Module",
    )
    hidden: str = Field("128", description="hidden layer widths of `mlp`, comma-separated")
    context: int = Field(128, ge=1, description="lm: tokens per window (the model's context)")
    vocab: int = Field(
        0, ge=0, le=1 << 32, description="lm: vocabulary of .bin tokens (0: 256 for .txt, else <file>.vocab)"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="lm: the last fraction of the tokens, for validation")
    eval_windows: int = Field(256, ge=1, description="lm: validation windows per evaluation")
    eval_every: int = Field(
        0, ge=0, description="evaluate every N rounds as well as at each epoch's end (0: epochs only)"
    )
    layers: int = Field(2, ge=1, description="gpt: transformer blocks")
    heads: int = Field(4, ge=1, description="gpt: attention heads")
    dim: int = Field(128, ge=1, description="gpt: model width")
    epochs: int = Field(10, ge=1, description="passes over the training set")
    max_steps: int = Field(0, ge=0, description="stop after this many global batches (0: all the epochs)")
    batch_size: int = Field(64, ge=1, description="global batch size (independent of the worker count)")
    lr: float = Field(0.05, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    optimizer: str = Field(
        "sgd",
        pattern=rf"^(sgd|adam|adamw|{USER_CODE})$",
        description="server-side optimizer: sgd, adam, adamw, or module:factory, factory(model) returning a "
        "torch.optim.Optimizer over the model's trainable parameters (parameter groups allowed)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over the run: constant, or cosine decay to lr/10 after the warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0 to --lr")
    clip_grad: float = Field(
        0.0, ge=0, description="clip the mean gradient to this global L2 norm before each step (0: off)"
    )
    seed: int = Field(0, ge=0, description="seed of model init, batch order and each step's random draws (dropout)")
    micro_batch: int = Field(
        0, ge=0, description="accumulate a shard's gradient over pieces of at most this many rows (0: the whole shard)"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="forward and backward under bf16 autocast (parameters and optimizer stay fp32)"
    )
    code_dir: Path | None = Field(
        None, description="where user code given as pickle:<sha256> is kept (pangea.fit writes it there)"
    )
    compression: Literal["none", "fp16", "bf16", "int8", "topk"] = Field(
        "none", description="gradient compression on the wire (lossy ones use error feedback; none is exact)"
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: fraction of each chunk's elements sent")
    mode: Literal["sync", "diloco", "async"] = Field(
        "sync",
        description="sync: one step per global batch; diloco: local steps, then an outer step; async: apply gradients as they come",
    )
    local_steps: int = Field(20, ge=1, description="diloco: inner steps per worker per round (H)")
    inner_optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="diloco: the workers' inner optimizer"
    )
    inner_lr: float = Field(0.001, gt=0, description="diloco: the inner optimizer's learning rate")
    outer_lr: float = Field(0.7, gt=0, description="diloco: outer SGD (Nesterov) learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: outer SGD (Nesterov) momentum")
    staleness: int = Field(2, ge=0, description="async: apply a gradient only if at most this many updates old")

    @field_validator("mode")
    @classmethod
    def _optimizer_of_the_mode(cls, value: str, info: ValidationInfo) -> str:
        optimizer = info.data.get("optimizer", "sgd")
        if value == "diloco" and optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(
                f"--optimizer {optimizer} steps sync and async rounds; diloco's outer step is SGD with Nesterov "
                "momentum (--outer-lr, --outer-momentum) and its inner one --inner-optimizer"
            )
        return value

    @field_validator("hidden")
    @classmethod
    def _widths(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", value) or 0 in [int(v) for v in value.split(",")]:
            raise ValueError("expected positive integers separated by commas, e.g. 256,128")
        return value

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.hidden.split(","))


class OrchestratorSettings(BusSettings, TrainSettings):
    """The orchestrator owns the model, the optimizer and the round plan."""

    workers: int = Field(
        2, ge=1, description="workers that must be present before round 0 (reference: the K whose shards it computes)"
    )
    out: Path = Field(Path("runs/latest"), description="directory for params.npz, metrics.json, curves.png")
    round_warn_seconds: float = Field(30.0, gt=0, description="log a warning when a round waits this long")
    lookahead: bool = Field(
        True, description="plan each round's batches while the round before is reduced (off: one round at a time)"
    )
    policy: Literal["exact", "quorum"] = Field(
        "exact", description="past the deadline: re-issue slow shards (exact) or close the round without them (quorum)"
    )
    straggler_deadline: float = Field(0.0, ge=0, description="seconds a round waits for a shard (0: adaptive)")
    deadline_factor: float = Field(3.0, gt=1, description="adaptive deadline: this many times the median recent round")
    deadline_floor: float = Field(2.0, gt=0, description="adaptive deadline: at least this many seconds")
    deadline_cap: float = Field(60.0, gt=0, description="adaptive deadline: at most this many seconds")
    overdue_beats: float = Field(
        3.0,
        gt=1,
        description="a worker whose heartbeat is this many of its periods late is not planned into new rounds",
    )
    source_job: str | None = Field(
        None, pattern=NAME_PATTERN, description="replay: train on this job's stored batches (set by pangea replay)"
    )
    aggregator: Literal["mean", "trimmed-mean", "median", "krum"] = Field(
        "mean", description="how shard gradients are combined (the robust ones resist poisoned gradients)"
    )
    byzantine: int = Field(1, ge=0, description="trimmed-mean/krum: how many contributions may be malicious")
    min_workers: int | None = Field(
        None, ge=1, description="autoscaling signal: fewest workers to ask for (default: --workers)"
    )
    max_workers: int | None = Field(
        None, ge=1, description="autoscaling signal: most workers to ask for (default: --workers, no scaling)"
    )
    scale_efficiency: float = Field(
        0.7,
        gt=0,
        le=1,
        description="autoscaling signal: ask for another worker while the last one added at least this "
        "fraction of a worker's samples/s",
    )

    scale_cooldown: int = Field(
        50, ge=0, description="autoscaling signal: rounds to hold after stepping back before trying more again"
    )

    @field_validator("max_workers")
    @classmethod
    def _bounds_in_order(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_workers")
        if value is not None and low is not None and value < low:
            raise ValueError(f"below --min-workers {low}")
        return value

    @field_validator("aggregator")
    @classmethod
    def _one_at_a_time(cls, value: str, info: ValidationInfo) -> str:
        if value != "mean" and info.data.get("mode") == "async":
            raise ValueError("--mode async applies gradients one at a time: there is nothing to combine robustly")
        return value

    clip_norm: float = Field(0.0, ge=0, description="clip each shard gradient to this L2 norm first (0: off)")
    resume: bool = Field(False, description="continue an existing job from its last checkpoint on the bus")
    checkpoint_every: int = Field(10, ge=0, description="store a checkpoint every N rounds (0: only at the end)")
    checkpoint_keep: int = Field(
        10, ge=1, description="per-round checkpoints kept for replays (the latest is always kept)"
    )
    from_round: int = Field(0, ge=0, description="replay: start at the source's checkpoint at or before this round")
    shards: int = Field(
        1, ge=1, le=16, description="orchestrator shards: S processes each average one slice of the gradient"
    )

    @field_validator("shards")
    @classmethod
    def _shardable(cls, value: int, info: ValidationInfo) -> int:
        if value > 1:
            data = info.data
            if data.get("aggregator", "mean") != "mean" or data.get("clip_norm", 0) > 0:
                raise ValueError(
                    "orchestrator shards need --aggregator mean and no --clip-norm (they see one slice each)"
                )
            if data.get("mode", "sync") == "async":
                raise ValueError(
                    "orchestrator shards need --mode sync or diloco (async applies whole gradients one by one)"
                )
            if data.get("policy", "exact") != "exact":
                raise ValueError("orchestrator shards need --policy exact (every shard must close the same rounds)")
        return value


class ReducerSettings(BusSettings):
    """An orchestrator shard: averages slice `shard` of every round's gradient."""

    shard: int = Field(1, ge=1, le=15, description="which slice of the parameter vector this shard averages (1..S-1)")


class PreprocessorSettings(BusSettings):
    """The preprocessor reads the dataset named in the job spec and publishes shards."""

    dataset: str | None = Field(None, description="override the job spec's dataset path on this host")
    data_workers: int = Field(
        1, ge=1, le=64, description="processes that decode and transform samples (the batches do not depend on it)"
    )
    code_dir: Path | None = Field(
        None, description="where user code given as pickle:<sha256> is kept (pangea.fit writes it there)"
    )


class WorkerSettings(BusSettings):
    """A worker needs only the job name and the bus: the rest comes from the job spec."""

    worker_id: str | None = Field(None, pattern=NAME_PATTERN, description="worker id (default: host-pid)")
    code_dir: Path | None = Field(
        None, description="where user code given as pickle:<sha256> is kept (pangea.fit writes it there)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for gradients")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of each worker (0: torch's default for `pangea worker`; cpu_count // workers for run and reference)",
    )
    test_delay: float = Field(0.0, ge=0, description="test only: sleep this long before each shard (a straggler)")
    test_sample_delay: float = Field(
        0.0, ge=0, description="test only: sleep this long per sample of each shard (compute that scales out)"
    )
    test_attack: Literal["none", "scale", "random"] = Field(
        "none", description="test only: send a poisoned gradient (x-20, or random noise)"
    )


class RunSettings(OrchestratorSettings):
    """`pangea run`: an embedded server (unless nats_url), all roles as supervised processes."""

    job: str | None = Field(None, pattern=NAME_PATTERN, description="job name (default: generated)")
    out: Path | None = Field(None, description="output directory (default: runs/<job>)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for workers")
    store_dir: Path | None = Field(
        None, description="JetStream store of the embedded server (default: temporary; set it to replay later)"
    )
    data_workers: int = Field(
        1, ge=1, le=64, description="processes that decode and transform samples (the batches do not depend on it)"
    )
    secure: Literal["off", "password", "nkey", "jwt"] = Field(
        "off",
        description="embedded server with a least-privilege user per role: password, nkey (the server "
        "holds public keys only) or jwt (an operator, an account, a creds file per role); true: password",
    )

    @field_validator("secure", mode="before")
    @classmethod
    def _secure_switch(cls, value: object) -> object:
        """`--secure` alone and PANGEA_SECURE=true (before NKeys and JWTs) mean passwords."""
        switch = {"true": "password", "1": "password", "yes": "password", "false": "off", "0": "off", "no": "off"}
        if isinstance(value, bool):
            return "password" if value else "off"
        return switch.get(str(value).lower(), value)

    autoscale: str | None = Field(
        None,
        pattern=r"^[0-9]+:[0-9]+$",
        description="MIN:MAX: workers follow the orchestrator's signal through `pangea autoscale` "
        "instead of a fixed --workers (round 0 waits for MIN)",
    )

    @field_validator("autoscale")
    @classmethod
    def _scale_range(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            low, high = (int(v) for v in value.split(":"))
            if not 1 <= low <= high:
                raise ValueError("MIN:MAX with 1 <= MIN <= MAX")
            if info.data.get("secure", "off") != "off":
                raise ValueError("not with --secure yet (each autoscaled worker would need its own login)")
        return value

    @property
    def autoscale_range(self) -> tuple[int, int] | None:
        return tuple(int(v) for v in self.autoscale.split(":")) if self.autoscale else None

    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of each worker (0: torch's default for `pangea worker`; cpu_count // workers for run and reference)",
    )


class ReplaySettings(BusSettings):
    """`pangea replay`: train again on a job's stored batch stream, as a new job."""

    nats_url: str | None = Field(None, description="NATS URL(s) of the server holding the job")
    job: str = Field("pangea", pattern=NAME_PATTERN, description="the job to replay")
    workers: int = Field(2, ge=1, description="workers of the replay (may differ from the original)")
    out: Path | None = Field(None, description="output directory (default: runs/<replay job>)")
    replay_job: str | None = Field(
        None, pattern=NAME_PATTERN, description="name of the replay job (default: <job>-replay-<time>)"
    )
    store_dir: Path | None = Field(None, description="without a URL: the embedded server's store holding the job")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for workers")
    from_round: int = Field(0, ge=0, description="replay: start at the source's checkpoint at or before this round")


class AutoscaleSettings(BusSettings):
    """`pangea autoscale`: run as many local workers for each job on the server as its orchestrator asks for."""

    jobs: str = Field("*", description="which jobs on the server to serve: a glob over job names")
    min_workers: int = Field(0, ge=0, description="fewest workers for a job that asks for any")
    max_workers: int = Field(4, ge=1, description="most workers for one job, whatever it asks for")
    period: float = Field(1.0, gt=0, description="seconds between two looks at the jobs' signals")
    torch_threads: int = Field(1, ge=0, description="torch intra-op threads of each worker started")
    log_dir: Path = Field(Path("runs/autoscale"), description="where each started worker's log goes")
    until_idle: bool = Field(False, description="exit once every job that asked for workers is finished and none run")
    compose: str | None = Field(
        None,
        description="scale a docker compose deployment's workers instead of local processes: the compose command, "
        "e.g. 'docker compose -f infra/docker-compose.yaml -p pangea'",
    )
    compose_service: str = Field("worker", min_length=1, description="the compose service that runs the workers")

    @field_validator("max_workers")
    @classmethod
    def _above_min(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("min_workers", 0):
            raise ValueError(f"below --min-workers {info.data['min_workers']}")
        return value


class ReferenceSettings(TrainSettings):
    """`pangea reference`: the same training in one process with no bus."""

    workers: int = Field(
        2, ge=1, description="shards per round, as K workers would compute them (1: the whole-batch loop)"
    )
    out: Path = Field(Path("runs/reference"), description="directory for params.npz, metrics.json, curves.png")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of each worker (0: torch's default for `pangea worker`; cpu_count // workers for run and reference)",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch device for gradients")
    plans_from: Path | None = Field(
        None, description="reference: recompute the rounds a run recorded in DIR/plans.jsonl, with its settings"
    )
    allow_pickled_code: bool = Field(False, description=ALLOW_PICKLED_CODE)


class VerifySettings(_Base):
    """`pangea verify DIR`: recompute a finished run from its recorded plans and compare."""

    allow_pickled_code: bool = Field(False, description=ALLOW_PICKLED_CODE)

    tolerance: float = Field(1e-6, ge=0, description="verify: largest max |run - recomputed| accepted as exact")
    dataset: str | None = Field(None, description="override the job spec's dataset path on this host")
    out: Path | None = Field(None, description="verify: where the recomputed run goes (default DIR/verify)")


def load(cls: type[_Base], **overrides) -> _Base:
    """Build settings from env/.env plus non-None overrides; one-line `SettingsError` if invalid."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        source = f"--{field.replace('_', '-')}" if field in given else f"PANGEA_{field.upper()}"
        value = given.get(field, err.get("input"))
        raise SettingsError(f"invalid setting {source} = {value!r}: {err['msg']}") from None
