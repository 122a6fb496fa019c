"""`pangea checkpoint export`: a job's last checkpoint as a plain torch state_dict file."""

from __future__ import annotations

from pathlib import Path

import torch

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.errors import JobError, ModelError
from pangea.roles.checkpoints import CheckpointStore
from pangea.roles.code import fetch_code
from pangea.train.layout import Layout
from pangea.train.models import build_for
from pangea.wire import codec
from pangea.wire.messages import JobSpec


async def export_checkpoint(bus: Bus, out: Path, code_dir: Path | None = None, allow_pickle: bool = False) -> int:
    """Write `model.state_dict()` at the job's last checkpoint to `out` (parameters and buffers:
    it loads with strict=True); the round it holds.  A model shipped as pickled code is read from
    `code_dir` or the job's code bucket, if `allow_pickle`."""
    raw_spec = await bus.kv_get(subjects.job_bucket(bus.job), subjects.JobKey.SPEC)
    if raw_spec is None:
        raise JobError(f"no job {bus.job!r} on this server")
    ckpt = await CheckpointStore(bus, bus.job, keep=1).latest()
    if ckpt is None:
        raise JobError(f"job {bus.job!r} has no checkpoint yet")
    spec = codec.decode(raw_spec, JobSpec)
    code_dir = await fetch_code(bus, [spec.model], code_dir, allow_pickle)
    model = build_for(spec, code_dir=code_dir, allow_pickle=allow_pickle)
    layout = Layout.of(model)
    if layout.hash != ckpt.layout_hash:
        raise ModelError(f"model {spec.model} builds another layout here than the checkpoint's")
    layout.load_params(model, ckpt.params)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return ckpt.round
