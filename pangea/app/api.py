"""Pangea from Python: `pangea.fit`, `pangea.reference`, `pangea.verify` and the `Run` they return.

`fit` is `pangea run` and `reference` is `pangea reference`, with one addition: the model,
step, optimizer and task may be Python objects, not only names.  Each is shipped with
`pangea.train.usercode.ship`: by name when a fresh process imports it so, else pickled by value
into `<out>/code` (the run's code directory, PANGEA_CODE_DIR of every role), which is how a
model defined in a notebook cell or a script's `__main__` reaches the worker processes.  The
workers `fit` starts are told to run it (PANGEA_ALLOW_PICKLED_CODE); under `secure` they are
not, unless the caller says so.

    import pangea
    from torch import nn

    def model(in_features, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes))

    run = pangea.fit(model=model, workers=2, epochs=5)
    run.final["test_accuracy"], run.model()

Every other keyword is a setting (`pangea.settings.RunSettings`, `ReferenceSettings`), as the
flag of the same name; an unknown one is refused in one line (`SettingsError`).

Why one module of ~300 lines: it is the one public surface for scripts and notebooks; `fit` and
`reference` share the shipping of user code and the reading of settings, and `Run` is what both
return.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import SecretStr

from pangea import settings as cfg
from pangea.errors import JobError, ModelError, SettingsError
from pangea.train import usercode

if TYPE_CHECKING:
    from torch import nn

    from pangea.train.exactness import Verdict

# The settings that may be Python objects (a dataset as a factory of one, not the data itself).
USER_CODE = ("model", "step", "optimizer", "task", "dataset", "transform", "collate")
_ALLOW = "allow_pickled_code"


@dataclass(frozen=True, eq=False)
class Run:
    """A finished run (or reference) as its output directory holds it."""

    out: Path
    metrics: dict = field(repr=False)  # metrics.json
    params: dict[str, np.ndarray] = field(repr=False)  # params.npz: parameters, then buffers, by name
    final: dict = field(default_factory=dict)  # the last evaluation's figures, e.g. test_accuracy

    @classmethod
    def load(cls, out: Path | str) -> Run:
        """The run written to `out`; one line (`JobError`) if it holds no finished run."""
        from pangea.train.outputs import load_params

        out = Path(out)
        try:
            metrics = json.loads((out / "metrics.json").read_text())
            params = load_params(out / "params.npz")
        except (OSError, ValueError) as exc:
            raise JobError(f"{out} holds no finished run: {exc}") from None
        return cls(out=out, metrics=metrics, params=params, final=dict(metrics.get("final") or {}))

    @property
    def settings(self) -> dict:
        """The settings the run trained with, as metrics.json records them."""
        return dict(self.metrics.get("settings") or {})

    def model(self) -> nn.Module:
        """The run's model with its final parameters and buffers, in eval mode."""
        from pangea.train.layout import Layout
        from pangea.train.models import build_model
        from pangea.train.server import load_training_data

        train = cfg.TrainSettings(**{k: v for k, v in self.settings.items() if k in cfg.TrainSettings.model_fields})
        data = load_training_data(train)  # the model's shapes follow the data's
        model = build_model(
            train.model,
            data.input_shape,
            data.num_classes,
            train.hidden_sizes,
            train.seed,
            layers=train.layers,
            heads=train.heads,
            dim=train.dim,
            code_dir=self._code_dir(train),
        )
        layout = Layout.of(model)
        if set(layout.names) != set(self.params):
            raise ModelError(f"model {train.model} builds other parameters here than {self.out / 'params.npz'} holds")
        pieces = [np.asarray(self.params[name], np.float32).reshape(-1) for name in layout.names]
        layout.load_params(model, np.concatenate(pieces) if pieces else np.zeros(0, np.float32))
        return model.eval()

    def _code_dir(self, train: cfg.TrainSettings) -> Path | None:
        """Where the run's pickled code is: its recorded code directory, or `<out>/code` if the run moved."""
        hashes = usercode.pickled_hashes([getattr(train, name) for name in USER_CODE])
        for where in (train.code_dir, self.out / "code"):
            if where is not None and all(usercode.code_file(where, h).is_file() for h in hashes):
                return where
        return train.code_dir

    def verify(self, **kw) -> Verdict:
        """`pangea verify` of this run (keywords: tolerance, out, dataset)."""
        return verify(self, **kw)


def fit(
    *,
    model="mlp",
    step=None,
    optimizer=None,
    task=None,
    dataset: str = "digits",
    workers: int = 2,
    out: Path | str | None = None,
    job: str | None = None,
    **settings,
) -> Run:
    """`pangea run` from Python: the roles as processes of this machine (an embedded nats-server
    unless `nats_url`), a progress bar on stderr; the finished `Run`.

    `model`, `step`, `optimizer` and `task` may be names (`"mlp"`, `"module:factory"`) or
    objects: a model factory or an `nn.Module` instance (its weights are the initial weights),
    a step, an optimizer factory, a loss.  A role that fails ends it with `JobError`, the end of
    that role's log included."""
    from pangea.app.supervisor import default_job_name

    _refuse_unknown(cfg.RunSettings, settings, "pangea.fit")
    job = job or default_job_name()
    out = Path(out) if out is not None else Path("runs") / job
    given = {"workers": workers, "out": out, "job": job}
    code = dict(model=model, step=step, optimizer=optimizer, task=task, dataset=dataset)
    run = cfg.load(cfg.RunSettings, **given, **_shipped(code, out, settings))
    run = _allowed(run)
    if _can_supervise_here():
        code = _supervise(run)
    else:  # a running event loop (Jupyter): `pangea run` in a process of its own
        code = _supervise_elsewhere(run)
    if code == 130:
        raise KeyboardInterrupt
    return Run.load(run.out)


def reference(
    *,
    model="mlp",
    step=None,
    optimizer=None,
    task=None,
    dataset: str = "digits",
    workers: int = 2,
    out: Path | str | None = None,
    **settings,
) -> Run:
    """`pangea reference --workers K` from Python, in this process: the yardstick a `fit` with K
    workers and the same settings (and the same shipped code) equals; the finished `Run`."""
    from pangea.train.reference import train_reference

    _refuse_unknown(cfg.ReferenceSettings, settings, "pangea.reference")
    out = Path(out) if out is not None else cfg.ReferenceSettings.model_fields["out"].default
    given = {"workers": workers, "out": out}
    code = dict(model=model, step=step, optimizer=optimizer, task=task, dataset=dataset)
    ref = cfg.load(cfg.ReferenceSettings, **given, **_shipped(code, out, settings))
    train_reference(ref)
    return Run.load(ref.out)


def verify(run_or_dir: Run | Path | str, *, allow_pickled_code: bool = True, **kw) -> Verdict:
    """`pangea verify DIR`: recompute the run from its recorded plans in this process and compare
    (keywords: tolerance, out, dataset); `verdict.exact`, `verdict.line()`.

    A run that trained pickled code (a model from a notebook) is recomputed by running that code
    from its `code/` directory: pass `allow_pickled_code=False` for a directory you did not make
    (the `pangea verify` command refuses it unless PANGEA_ALLOW_PICKLED_CODE is set)."""
    from pangea.train.exactness import verify as verify_run

    run_dir = run_or_dir.out if isinstance(run_or_dir, Run) else Path(run_or_dir)
    return verify_run(run_dir, allow_pickle=allow_pickled_code, **kw)


# ------------------------------------------------------------------ settings


def _refuse_unknown(cls: type, settings: dict, caller: str) -> None:
    unknown = sorted(set(settings) - set(cls.model_fields))
    if unknown:
        raise SettingsError(
            f"{caller}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(the settings are those of pangea.settings.{cls.__name__}, named as their flags without --)"
        )


def _shipped(code: dict, out: Path, settings: dict) -> dict:
    """The settings with every user-code one (`USER_CODE`, from `code` or `settings`) as a spec,
    objects shipped into the code directory (`code_dir` when given, else `<out>/code`), and
    `code_dir` set when something was pickled."""
    code_dir = Path(settings.get("code_dir") or out / "code").absolute()
    given = {**code, **{name: settings[name] for name in USER_CODE if name in settings}}
    if isinstance(given.get("dataset"), os.PathLike):
        given["dataset"] = os.fspath(given["dataset"])  # a path names data; only a factory is code
    for name, obj in given.items():
        if obj is not None and not isinstance(obj, str) and not callable(obj) and name != "model":
            raise SettingsError(f"{name}={type(obj).__name__}: give a name, or a function (a factory, for a dataset)")
    specs = {name: usercode.ship(obj, code_dir) for name, obj in given.items() if obj is not None}
    rest = {k: v for k, v in settings.items() if k not in specs}
    if usercode.pickled_hashes(specs.values()) and "code_dir" not in settings:
        rest["code_dir"] = code_dir
    return {**rest, **specs}


def _allowed(run: cfg.RunSettings) -> cfg.RunSettings:
    """`run` with its workers allowed to run the code it pickled; one line where they must not."""
    pickled = [name for name in USER_CODE if usercode.pickled_hash(getattr(run, name))]
    if not pickled:
        return run
    what = ", ".join(f"{name}={getattr(run, name)}" for name in pickled)
    if _ALLOW in run.model_fields_set:  # the caller's choice, as a keyword or PANGEA_ALLOW_PICKLED_CODE
        if not run.allow_pickled_code:
            raise SettingsError(
                f"{what} is pickled code, but allow_pickled_code is false: the workers would refuse it; "
                "allow it, or put the code in an importable module (module:attribute)"
            )
        return run
    if run.secure != "off":
        raise SettingsError(
            f"{what} is pickled code, and --secure runs none unless told to: set PANGEA_ALLOW_PICKLED_CODE=true "
            "(or allow_pickled_code=True), or put the code in an importable module (module:attribute)"
        )
    return run.model_copy(update={_ALLOW: True})


# ------------------------------------------------------------------ supervising


def _can_supervise_here() -> bool:
    """The supervisor runs its own event loop and handles SIGTERM: the main thread, no loop running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread() is threading.main_thread()
    return False


def _supervise(run: cfg.RunSettings) -> int:
    """`pangea run` in this process; its exit status (0, or 130 when interrupted)."""
    from pangea.app.supervisor import Supervisor

    class Watched(Supervisor):
        """Remembers the role whose end stopped the run."""

        failed = None

        def _report(self, child) -> None:
            self.failed = child
            super()._report(child)

    supervisor = Watched(run)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = supervisor.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # the supervisor's handler was for its run only
    if code not in (0, 130):
        child = supervisor.failed
        if child is None:
            raise JobError(
                f"job {supervisor.job} failed (exit status {code}): the logs are in {supervisor.out / 'logs'}"
            )
        raise JobError(
            f"job {supervisor.job}: role {child.name} {child.how_it_ended()}; the end of {child.log_path}:\n"
            + child.log_tail(30)
        )
    return code


def _supervise_elsewhere(run: cfg.RunSettings) -> int:
    """`pangea run` as a child process with these settings, its output passed on to ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    for name, value in run.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"PANGEA_{name.upper()}"] = str(value)
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(
        [sys.executable, "-m", "pangea", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as child:
        try:
            for line in child.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
            code = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)  # it stops its roles and exits 130
            child.wait()
            raise
    if code not in (0, 130):
        raise JobError(
            f"job {run.job}: pangea run exited with status {code}; the end of its output:\n" + "\n".join(tail)
        )
    return code
