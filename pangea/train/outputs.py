"""A run's files: params.npz, metrics.json, plans.jsonl and curves.png (the same for run, reference, replay)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pangea.train.layout import Layout
from pangea.train.plans import write_jsonl


@dataclass
class Metrics:
    """Everything a person may want to plot or compare after a run."""

    job: str
    mode: str  # "run" or "reference"
    settings: dict
    loss: list[float] = field(default_factory=list)  # per round
    round_seconds: list[float] = field(default_factory=list)  # per round
    samples: list[int] = field(default_factory=list)  # per round
    workers: list[int] = field(default_factory=list)  # per round: workers in the plan
    test_accuracy: list[float] = field(default_factory=list)  # per epoch (classify)
    final_test_accuracy: float = math.nan
    evaluations: list[dict] = field(default_factory=list)  # {"round": r, figure: value...} per evaluation
    final: dict = field(default_factory=dict)  # the last evaluation's figures
    targets_per_sample: int = 1  # lm: tokens per window (what tokens/s counts)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    desired_workers: list[int] = field(default_factory=list)  # the autoscaling signal after each round
    events: list[dict] = field(default_factory=list)  # notable things: joins, leaves, reassignments
    quorum_rounds: list[dict] = field(default_factory=list)  # rounds closed without every sample
    bytes_sent: dict[str, int] = field(default_factory=dict)  # worker -> gradient bytes it published
    staleness: dict[str, int] = field(default_factory=dict)  # async: applied gradients by staleness
    total_seconds: float = 0.0
    kernels: dict = field(default_factory=dict)  # who computed with what: see pangea.train.kernels
    format: int = 2  # 2: workers sent loss-sum gradients and counts (pangea.train.exactness.FORMAT)
    plans: list[dict] = field(default_factory=list)  # per round: plans.RoundRecord, written to plans.jsonl

    def add_evaluation(self, round_: int, figures: dict[str, float], epochs_ended: int) -> None:
        """Record an evaluation after round `round_`; accuracy also once per epoch that ended."""
        self.evaluations.append({"round": round_, **figures})
        self.final = dict(figures)
        if "test_accuracy" in figures:
            self.test_accuracy += [figures["test_accuracy"]] * epochs_ended
            self.final_test_accuracy = figures["test_accuracy"]

    def fields_shared(self) -> dict:
        """The fields as a dict sharing their values, no copy: for a serialiser that writes it at once
        (a checkpoint: `asdict`'s deep copy grew with every round, 36 ms at 1,320 rounds)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        data = asdict(self)
        del data["plans"]  # one line per round in plans.jsonl instead
        data["samples_per_second"] = sum(self.samples) / self.total_seconds if self.total_seconds > 0 else None
        if self.targets_per_sample > 1:
            data["tokens_per_second"] = (
                data["samples_per_second"] and data["samples_per_second"] * self.targets_per_sample
            )
        # Per sample trained on (a diloco round trains on H global batches): comparable across modes.
        data["bytes_per_sample"] = (
            sum(self.bytes_sent.values()) / sum(self.samples) if self.bytes_sent and sum(self.samples) else None
        )
        return json.dumps(_finite(data), indent=2, default=str)


def _finite(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_outputs(out: Path, layout: Layout, flat_params: np.ndarray, metrics: Metrics) -> None:
    """Write a run's files into `out`: params.npz, metrics.json, plans.jsonl, curves.png."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "params.npz", **layout.named_arrays(flat_params))
    (out / "metrics.json").write_text(metrics.to_json())
    write_jsonl(metrics.plans, out / "plans.jsonl")
    plot_curves(metrics, out / "curves.png")


def plot_curves(metrics: Metrics, path: Path) -> None:
    """Loss per round and test accuracy per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    _plot_loss(ax_loss, metrics.loss, f"{metrics.job}: loss")
    if metrics.test_accuracy:
        epochs = range(1, len(metrics.test_accuracy) + 1)
        ax_acc.plot(epochs, metrics.test_accuracy, marker="o")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", title=f"final {metrics.final_test_accuracy:.4f}")
    else:  # lm, user tasks: the validation curve over rounds
        _plot_validation(ax_acc, metrics.evaluations, metrics.final)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_loss(ax, loss: list, title: str) -> None:
    """The loss per round thin and light under its smoothed line; a log scale when every loss is positive."""
    raw = np.asarray(loss, dtype=float)  # metrics.json's null (a NaN) becomes NaN again
    weight = smoothing_weight(len(raw))
    rounds = np.arange(len(raw))
    ax.plot(rounds, raw, lw=0.6, alpha=0.3, color="C0", label="per round")
    ax.plot(rounds, smooth(raw, weight), lw=1.5, color="C0", label=f"smoothed (EMA {weight:.3g})")
    finite = raw[np.isfinite(raw)]
    log = finite.size > 0 and bool(np.all(finite > 0))
    ax.set(xlabel="round", ylabel="training loss", title=title, yscale="log" if log else "linear")
    ax.legend(loc="upper right")


def smoothing_weight(rounds: int) -> float:
    """0.9, or for a long run an average over about its last 1% of rounds.

    At 0.9 the average spans ~10 rounds, while a 17,000-round curve puts ~20 rounds in each pixel:
    the smoothed line would still be a band."""
    return 1 - 1 / max(10, rounds / 100)


def smooth(values, weight: float) -> np.ndarray:
    """An exponential moving average with TensorBoard's bias correction (0 <= weight < 1).

    The correction divides by the weight the average has gathered so far, so the first point is the
    first value rather than (1 - weight) x it.  A non-finite value is kept as it is and left out of
    the average, as TensorBoard does."""
    values = np.asarray(values, dtype=float)
    smoothed = np.empty_like(values)
    last, count = 0.0, 0
    for i, value in enumerate(values.tolist()):  # a Python loop: 17,000 rounds take a few ms
        if not math.isfinite(value):
            smoothed[i] = value
            continue
        last = weight * last + (1 - weight) * value
        count += 1
        smoothed[i] = last / (1 - weight**count)
    return smoothed


def _plot_validation(ax, evaluations: list[dict], final: dict) -> None:
    """The task's validation figure (bits per byte for text, else its first) after each evaluation."""
    key = "bits_per_byte" if "bits_per_byte" in final else next(iter(final), "test_loss")
    points = [(e["round"] + 1, e[key]) for e in evaluations if e.get(key) is not None]
    ax.plot(*zip(*points) if points else ([], []), marker="o")
    ax.set(xlabel="round", ylabel=key.replace("_", " "), title=f"final {final.get(key) or math.nan:.4f}")


def load_params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest |a - b| over all parameters; inf if the names or shapes differ."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    return max((float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0) for k in a)


def plot_dashboard(metrics: dict, path: Path) -> None:
    """`pangea plot`: loss, test accuracy, round time and throughput of a run's metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, seconds, samples = metrics.get("loss", []), metrics.get("round_seconds", []), metrics.get("samples", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (ax_loss, ax_acc), (ax_time, ax_rate) = axes
    _plot_loss(ax_loss, loss, "loss")
    accuracy = [a for a in metrics.get("test_accuracy", []) if a is not None]
    if accuracy:
        ax_acc.plot(range(1, len(accuracy) + 1), accuracy, marker="o")
        ax_acc.set(
            xlabel="epoch",
            ylabel="test accuracy",
            title=f"final {metrics.get('final_test_accuracy') or float('nan'):.4f}",
        )
    else:  # lm and user tasks: the validation figure over rounds
        _plot_validation(ax_acc, metrics.get("evaluations", []), metrics.get("final") or {})
    ax_time.plot(seconds, lw=1)
    ax_time.set(xlabel="round", ylabel="seconds", title="round time")
    window = 20
    rate = [
        sum(samples[max(0, i - window + 1) : i + 1]) / max(1e-9, sum(seconds[max(0, i - window + 1) : i + 1]))
        for i in range(min(len(samples), len(seconds)))
    ]
    ax_rate.plot(rate, lw=1)
    ax_rate.set(xlabel="round", ylabel="samples / s", title=f"throughput ({window}-round window)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics.get('job', '')} ({metrics.get('mode', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
