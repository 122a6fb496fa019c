"""`pangea checkpoint export`: a job's last checkpoint as a plain torch state_dict file."""

from __future__ import annotations

from pathlib import Path

import torch

from pangea import codec
from pangea.bus import subjects
from pangea.bus.client import Bus, BusError
from pangea.checkpoint import Checkpoint
from pangea.layout import Layout
from pangea.messages import JobSpec
from pangea.models import build_model


async def export_checkpoint(bus: Bus, out: Path) -> int:
    """Write `model.state_dict()` at the job's last checkpoint to `out`; the round it holds."""
    raw_spec = await bus.kv_get(subjects.job_bucket(bus.job), "spec")
    if raw_spec is None:
        raise BusError(f"no job {bus.job!r} on this server")
    raw = await bus.get_object(subjects.checkpoint_bucket(bus.job), "latest")
    if raw is None:
        raise BusError(f"job {bus.job!r} has no checkpoint yet")
    spec = codec.decode(raw_spec, JobSpec)
    ckpt = Checkpoint.from_bytes(raw)
    model = build_model(spec.model, spec.input_shape, spec.num_classes, spec.hidden, spec.seed)
    layout = Layout.of(model)
    if layout.hash != ckpt.layout_hash:
        raise BusError(f"model {spec.model} builds another layout here than the checkpoint's")
    layout.load_params(model, ckpt.params)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return ckpt.round
