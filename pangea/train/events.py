"""TensorBoard event files in a run's own directory, so `tensorboard --logdir runs` shows each run by name.

Tags; the step of every one is the 0-based round r it follows:

    train/loss                  the round's training loss
    train/lr                    the learning rate, when the optimizer has one parameter group;
    train/lr/<group>            one tag per group when it has several
    train/samples_per_second    the round's samples over its seconds
    train/tokens_per_second     the same in tokens (samples x targets_per_sample), only when that is > 1
    train/round_seconds         the round's seconds, as the caller measured them
    train/workers               workers in the round's plan
    eval/<figure>               each figure of an evaluation after round r: eval/test_accuracy,
                                eval/test_loss, eval/val_loss, eval/bits_per_byte, ...

TensorBoard groups its charts by the part before the first slash: a section for the rounds, one for
the evaluations.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import Summary

# A person watching a live run sees a round within this many seconds.  Writing is queued to
# SummaryWriter's own thread and flushed on this timer, never per round: add_round costs 85-100 µs
# a call (timeit over 5,000 rounds of 6 tags, 2 shared CPU cores; `python -m pangea.train.events`).
FLUSH_SECONDS = 5
# Events waiting for that thread (one a round or evaluation); a full queue makes add_round wait.
QUEUE = 100


class EventLog:
    """A run's per-round and per-evaluation figures as TensorBoard scalars (the tags: see the module).

    Non-finite values (a NaN loss, an infinite evaluation figure) are written as they are: where a
    run went wrong is what a person looks for.  A figure that is None (not computed) is skipped.
    """

    def __init__(self, directory: Path, *, first_round: int = 0, targets_per_sample: int = 1) -> None:
        """Write into `directory` from round `first_round` on.

        A writer that starts at round R drops, in TensorBoard's view, whatever an earlier writer in the
        same directory wrote at step R or later: a run resumed from its checkpoint at round R does not
        show the rounds after R twice, and a fresh run (R = 0) replaces an earlier one there.
        """
        # Imported here: its writer takes 0.16 s to import, which a process that writes no run skips.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(directory), purge_step=first_round, flush_secs=FLUSH_SECONDS, max_queue=QUEUE)
        self._targets_per_sample = targets_per_sample

    def add_round(
        self, r: int, *, loss: float, lrs: Mapping[str, float], samples: int, seconds: float, workers: int
    ) -> None:
        """Round r's loss, learning rate per parameter group (name -> lr), throughput, seconds and workers."""
        scalars = {"train/loss": loss, **lr_tags(lrs), "train/round_seconds": seconds, "train/workers": workers}
        if seconds > 0:  # a round too short for the clock has no rate
            scalars["train/samples_per_second"] = samples / seconds
            if self._targets_per_sample > 1:
                scalars["train/tokens_per_second"] = samples * self._targets_per_sample / seconds
        self._write(r, scalars)

    def add_evaluation(self, r: int, figures: Mapping[str, float | None]) -> None:
        """An evaluation after round r: each figure as eval/<name>."""
        self._write(r, {f"eval/{name}": value for name, value in figures.items() if value is not None})

    def close(self) -> None:
        """Write what is queued to disk and close the file."""
        self._writer.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        # One event holding every scalar, not add_scalar's one event each: the writer thread
        # checksums each record byte by byte in Python, and one record a round cost a quarter
        # as much (64-115 µs against 320-460 µs for 6 tags).  TensorBoard reads both alike.
        # file_writer: the SummaryWriter's own file, the one its purge_step marked.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()])
        self._writer.file_writer.add_summary(summary, step)


def lr_tags(lrs: Mapping[str, float]) -> dict[str, float]:
    """One tag per parameter group: train/lr for a single group, train/lr/<group> for several."""
    if len(lrs) == 1:
        return {"train/lr": next(iter(lrs.values()))}
    return {f"train/lr/{group}": lr for group, lr in lrs.items()}


def _measure(rounds: int = 5000) -> float:
    """Seconds per add_round call, with the tags of an lm run (the figure quoted at FLUSH_SECONDS)."""
    import tempfile
    import timeit

    with tempfile.TemporaryDirectory() as directory, EventLog(Path(directory), targets_per_sample=64) as log:
        rounds_done = iter(range(rounds))

        def one() -> None:
            log.add_round(next(rounds_done), loss=2.5, lrs={"lr": 1e-3}, samples=256, seconds=0.2, workers=4)

        return timeit.timeit(one, number=rounds) / rounds


if __name__ == "__main__":
    print(f"add_round: {_measure() * 1e6:.0f} µs a call")
