"""A worker's copy of the model and what it computes on it: a shard's gradient (or, for
DiLoCo, its local steps' pseudo-gradient), cut into the chunks and compressed as the job says."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pangea.errors import ModelError, SettingsError
from pangea.settings import WorkerSettings
from pangea.train import diloco, inputs
from pangea.train.aggregate import sums_on_wire
from pangea.train.layout import Layout
from pangea.train.models import build_for
from pangea.train.tasks import get_task
from pangea.train.training import ShardResult, StepSettings, gradient
from pangea.wire.chunking import bounds, split
from pangea.wire.compress import ErrorFeedback
from pangea.wire.messages import GRADIENT_TENSOR, Batch, Chunk, JobSpec, Tensor


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda requested but torch sees no CUDA device")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class Replica:
    """The job's model built here, checked against the orchestrator's layout."""

    def __init__(
        self, spec: JobSpec, settings: WorkerSettings, device: torch.device, code_dir: Path | None = None
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        allow = settings.allow_pickled_code
        self.model = build_for(spec, code_dir=code_dir, allow_pickle=allow).to(device)
        self.task = get_task(spec.task or "classify", spec.step, code_dir=code_dir, allow_pickle=allow)
        self.how = StepSettings.of(spec)
        self.model.train()
        self.layout = Layout.of(self.model)
        if self.layout.hash != spec.layout_hash:
            raise ModelError(f"model {spec.model} builds a different layout here than on the orchestrator")
        self.feedback: ErrorFeedback | None = None  # lossy compression: what was not sent yet
        self.start: np.ndarray | None = None  # diloco: the round's parameters, where local steps begin
        if spec.mode == "diloco":  # the first optimizer torch builds takes seconds: not in round 0
            diloco.inner_optimizer(spec.inner_optimizer, spec.inner_lr, self.layout.params(self.model))

    def load(self, flat: np.ndarray) -> None:
        """Take a complete parameter version."""
        self.layout.load_params(self.model, flat)
        if self.spec.mode == "diloco":  # local steps move the model: keep the start
            self.start = flat.copy()

    # ------------------------------------------------------------------ computing (on the compute thread)

    def _test_delay(self, samples: int) -> None:
        """Test only: a straggler (per shard) or compute that scales with the shard (per sample)."""
        delay = self.settings.test_delay + self.settings.test_sample_delay * samples
        if delay:
            time.sleep(delay)

    def gradient(self, batch: Batch) -> ShardResult:
        """The shard's step: the gradient of its loss sum, its mean loss and counted targets."""
        self._test_delay(batch.stop - batch.start)
        key = (batch.round, batch.start, batch.stop)  # a sync or async round is one global batch
        result = gradient(self.model, self.layout, self._inputs(batch), self.task.step, self.how, key, self.task.label)
        if not sums_on_wire(self.spec.mode, self.spec.compression) and result.count > 0:
            # Compressed: the mean over counted targets travels (a sum may pass fp16's range).
            result.values[: self.layout.param_numel] /= np.float32(result.count)
        if self.settings.test_attack == "scale":  # test only: a poisoned gradient
            result = replace(result, values=result.values * -20.0)
        elif self.settings.test_attack == "random":
            noise = np.random.default_rng().normal(scale=10.0, size=result.values.shape).astype(np.float32)
            result = replace(result, values=noise)
        return result

    def local_steps(self, batches: list[Batch]) -> tuple[np.ndarray, float, int, float]:
        """diloco: the round's inner steps from the round's parameters; the pseudo-gradient, the
        mean loss, samples and counted targets."""
        self._test_delay(sum(b.stop - b.start for b in batches))
        spec = self.spec
        data = [((b.round * spec.local_steps + b.inner, b.start, b.stop), self._inputs(b)) for b in batches]
        return diloco.local_steps(
            self.model, self.layout, self.start, data, spec.inner_optimizer, spec.inner_lr, self.task.step, self.how,
            self.task.label,
        )  # fmt: skip

    def _inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return inputs.tensors({name: t.torch() for name, t in batch.tensors.items()}, self.device, self.spec.normalize)

    # ------------------------------------------------------------------ what goes on the wire

    def parts(self, flat: np.ndarray, chunk_bytes: int) -> list[tuple[int, int, Chunk, np.ndarray]]:
        """(slice, slice start, chunk within the slice, values) covering the gradient.

        Slice s of the vector goes to orchestrator shard s, chunked within the slice.  The
        orchestrator's own slice 0 comes last: once it holds a shard's slice, the other
        shards (almost always) hold theirs.
        """
        shards = max(1, self.spec.shards)
        parts = []
        for slice_ in reversed(range(shards)):
            lo, hi = bounds(flat.shape[0], shards, slice_)
            parts += [(slice_, lo, chunk, values) for chunk, values in split(flat[lo:hi], chunk_bytes)]
        return parts

    def compress(self, flat: np.ndarray, parts: list) -> list[tuple[Tensor, float, Tensor]]:
        """(values, scale, indices) per chunk, compressed as the job says, with error feedback."""
        none = Tensor("uint32", (0,), memoryview(b""))
        if self.spec.compression == "none":
            return [(Tensor.from_numpy(values, GRADIENT_TENSOR), 1.0, none) for *_, values in parts]
        if self.feedback is None:
            self.feedback = ErrorFeedback(self.spec.compression, self.spec.topk_fraction)
        slices = [(lo + c.offset, lo + c.offset + v.shape[0]) for _, lo, c, v in parts]
        out = []
        for c in self.feedback.compress_slices(flat, slices):
            if c.kind == "bf16":
                values = Tensor("bfloat16", c.values.shape, memoryview(c.values).cast("B"), GRADIENT_TENSOR)
            else:
                values = Tensor.from_numpy(c.values, GRADIENT_TENSOR)
            indices = Tensor.from_numpy(c.indices) if c.indices is not None else none
            out.append((values, c.scale, indices))
        return out
