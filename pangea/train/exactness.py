"""What "exact" means here, as code: compare a run with its yardstick, or verify a run on its own.

Exact: a run's parameters equal those of one process that computes the same shard results
with the same kernels (torch build, device, intra-op threads) and sums them the same way
(`pangea.train.reference`).  Two runs whose kernels differ are not compared at all: their float
results may differ by far more than any tolerance for reasons that have nothing to do with
Pangea, so `KernelsDiffer` says which kernels to align instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pangea.settings import ReferenceSettings, SettingsError, TrainSettings
from pangea.train import kernels, plans, usercode
from pangea.train.outputs import load_params, max_abs_diff
from pangea.train.sources import load_training_data

DEFAULT_TOLERANCE = 1e-6
FORMAT = 2  # metrics.json `format`: 2, workers send loss-sum gradients and counts (1: mean gradients)


class KernelsDiffer(SettingsError):
    """Two runs computed with different kernels: their parameters are not comparable."""


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read {path}: {exc.__class__.__name__}: {exc}") from None


def kernel_differences(run: dict, yardstick: dict) -> list[str]:
    """Why two runs' kernels differ (empty: they match), from their metrics.json `kernels`."""
    a, b = run.get("kernels") or {}, yardstick.get("kernels") or {}
    if not a or not b:
        return ["a run without a `kernels` record (written by an older Pangea) cannot be compared"]
    problems = []
    # The optimizer step is elementwise: its thread count does not change a bit (measured for
    # SGD and Adam, 1 vs 2 threads, 1.6M parameters), so only its torch build must match; but
    # clipping sums the gradient's squares, a reduction whose order threads may change.
    keys = (
        ("torch", "threads")
        if any((m.get("settings") or {}).get("clip_grad") for m in (run, yardstick))
        else ("torch",)
    )
    for key in keys:
        if a["optimizer"][key] != b["optimizer"][key]:
            problems.append(
                f"optimizer {'torch build' if key == 'torch' else 'intra-op threads'} "
                f"{a['optimizer'][key]} vs {b['optimizer'][key]}"
            )
    # bf16 autocast computes other numbers than fp32 by design: a run compares with its own precision.
    precisions = [(m.get("settings") or {}).get("precision") or "fp32" for m in (run, yardstick)]
    if precisions[0] != precisions[1]:
        problems.append(f"--precision {precisions[0]} vs {precisions[1]}")
    for what, key in (("torch build", "torch"), ("device", "device"), ("intra-op threads", "threads")):
        left = sorted({str(k[key]) for k in a["workers"].values()})
        right = sorted({str(k[key]) for k in b["workers"].values()})
        if left != right:
            hint = " (set --torch-threads)" if key == "threads" else ""
            problems.append(f"worker {what} {', '.join(left)} vs {', '.join(right)}{hint}")
    return problems


def compare(run_dir: Path, yardstick_dir: Path) -> float:
    """max |Δ| between two runs' params.npz; `KernelsDiffer` if their kernels differ."""
    run, yardstick = read_metrics(run_dir), read_metrics(yardstick_dir)
    for where, m in ((run_dir, run), (yardstick_dir, yardstick)):
        if m.get("format", 1) < FORMAT:
            raise KernelsDiffer(
                f"{where} was written by a Pangea whose workers sent mean gradients (now loss sums, which round "
                "otherwise): compare it with a run of that version"
            )
    problems = kernel_differences(run, yardstick)
    if problems:
        raise KernelsDiffer(f"{run_dir} and {yardstick_dir} ran on different kernels: {'; '.join(problems)}")
    return max_abs_diff(load_params(Path(run_dir) / "params.npz"), load_params(Path(yardstick_dir) / "params.npz"))


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """`pangea verify`'s finding about one run."""

    run: Path
    recomputed: Path
    rounds: int
    max_abs_diff: float
    tolerance: float
    problems: tuple[str, ...] = ()  # rounds that did not count each sample once
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.problems

    def line(self) -> str:
        verdict = "exact" if self.exact else "NOT exact"
        line = (
            f"{self.run}: {verdict}: {self.rounds} rounds recomputed from plans.jsonl, "
            f"max |run - recomputed| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:g})"
        )
        if self.problems:
            line += f"; {len(self.problems)} rounds did not count each sample once, the first: {self.problems[0]}"
        return line

    def to_json(self) -> str:
        data = {
            "run": str(self.run),
            "recomputed": str(self.recomputed),
            "rounds": self.rounds,
            "max_abs_diff": None if math.isinf(self.max_abs_diff) else self.max_abs_diff,
            "tolerance": self.tolerance,
            "exact": self.exact,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }
        return json.dumps(data, indent=2)


def recompute_settings(
    run_dir: Path, metrics: dict, out: Path, dataset: str | None, allow_pickle: bool = False
) -> ReferenceSettings:
    """The reference settings that recompute `run_dir`: its training settings, refused where
    the run cannot be recomputed exactly (by design).  A model, step or optimizer the run shipped
    as pickled code (in `run_dir/code`) is run only if `allow_pickle`: the directory supplies both
    the bytes and the names they are checked against."""
    given = metrics.get("settings") or {}
    if given.get("mode") == "async":
        raise SettingsError(
            f"{run_dir} ran --mode async: the order of its updates depends on timing, nothing to verify"
        )
    if given.get("compression", "none") != "none":
        raise SettingsError(f"{run_dir} ran --compression {given['compression']}: lossy by design, not verifiable")
    if metrics.get("quorum_rounds"):
        rounds = [q["round"] for q in metrics["quorum_rounds"]]
        raise SettingsError(
            f"{run_dir}: rounds {rounds[:5]} closed without every shard (--policy quorum): not exact by design"
        )
    train = {k: given[k] for k in TrainSettings.model_fields if k in given}
    if dataset:
        train["dataset"] = dataset
    code = ("model", "step", "optimizer", "task", "dataset", "transform", "collate", "val_dataset")
    pickled = usercode.pickled_hashes(train.get(k) or "" for k in code)
    if pickled and not allow_pickle:
        raise SettingsError(
            f"{run_dir} trained pickled code (pickle:{pickled[0][:12]}..., in {run_dir / 'code'}): recomputing it runs "
            "that code here; set PANGEA_ALLOW_PICKLED_CODE=true if you trust the directory"
        )
    if (Path(run_dir) / "code").is_dir():  # user code shipped by value (pangea.fit) travels with the run
        train["code_dir"] = Path(run_dir) / "code"
    workers = (metrics.get("kernels") or {}).get("workers") or {}
    devices = {k["device"] for k in workers.values()}
    return ReferenceSettings(**train, out=out, device="cuda" if "cuda" in devices else "cpu")


def verify(
    run_dir: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    out: Path | None = None,
    dataset: str | None = None,
    progress=None,
    allow_pickle: bool = False,
) -> Verdict:
    """Recompute a finished run from its recorded plans in this process; compare with its params.npz
    (`allow_pickle`: see `recompute_settings`)."""
    from pangea.train.reference import Aggregation, train_reference

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    out = out or run_dir / "verify"
    settings = recompute_settings(run_dir, metrics, out, dataset, allow_pickle)
    notes = list(_kernel_notes(metrics))
    try:
        records = plans.read_jsonl(run_dir / "plans.jsonl")
    except OSError as exc:
        raise SettingsError(f"cannot read {run_dir / 'plans.jsonl'}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if len(records) != len(metrics.get("loss", [])):
        raise SettingsError(
            f"{run_dir}/plans.jsonl has {len(records)} rounds, metrics.json {len(metrics.get('loss', []))}"
        )
    unknown = [r.round for r in records if any(s.threads == 0 for s in r.shards)]
    if unknown:
        notes.append(
            f"rounds {unknown[:5]} have shards of unknown thread count: recomputed with "
            f"{settings.torch_threads or kernels.worker_threads(settings.workers)}"
        )
    given = metrics.get("settings") or {}
    aggregation = Aggregation(
        aggregator=given.get("aggregator", "mean"),
        byzantine=given.get("byzantine", 1),
        clip_norm=given.get("clip_norm", 0.0),
    )
    optimizer_threads = ((metrics.get("kernels") or {}).get("optimizer") or {}).get("threads", 0)
    data = load_training_data(settings)
    n = data.num_samples
    problems = [p for r in records if (p := plans.partition_problem(r, n, settings.batch_size))]
    train_reference(
        settings, progress, records=records, aggregation=aggregation, optimizer_threads=optimizer_threads, dataset=data
    )
    diff = max_abs_diff(load_params(run_dir / "params.npz"), load_params(out / "params.npz"))
    verdict = Verdict(
        run=run_dir,
        recomputed=out,
        rounds=len(records),
        max_abs_diff=diff,
        tolerance=tolerance,
        problems=tuple(problems),
        notes=tuple(notes),
    )
    (out / "verify.json").write_text(verdict.to_json())
    return verdict


def _kernel_notes(metrics: dict):
    """Refuse kernels this process cannot reproduce; note those it may not (another CPU)."""
    recorded = metrics.get("kernels") or {}
    if not recorded:
        raise KernelsDiffer("the run has no `kernels` record (written by an older Pangea): cannot verify it exactly")
    if metrics.get("format", 1) < FORMAT:
        raise KernelsDiffer(
            "the run was written by a Pangea whose workers sent mean gradients (now loss sums, which round "
            "otherwise): verify it with that version"
        )
    here = kernels.current()
    builds = {k["torch"] for k in [recorded["optimizer"], *recorded["workers"].values()]}
    if builds != {here.torch}:
        raise KernelsDiffer(
            f"the run used torch {', '.join(sorted(builds))}, this process has {here.torch}: "
            "verify with the same torch build"
        )
    if any(k["device"] == "cuda" for k in recorded["workers"].values()) and not torch.cuda.is_available():
        raise KernelsDiffer("the run's workers computed on cuda and torch sees no CUDA device here")
    cpus = {k["cpu"] for k in [recorded["optimizer"], *recorded["workers"].values()]}
    if cpus != {here.cpu}:
        yield f"the run computed on {', '.join(sorted(cpus))}, this is {here.cpu}: float results may differ"
