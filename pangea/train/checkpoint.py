"""The orchestrator's state as bytes: parameters, optimizer state, round, metrics so far.

Stored on the bus (the job's Object Store bucket) by the orchestrator, read back by a
restarted orchestrator and by `pangea checkpoint export`.  No NATS here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

FORMAT = 1


@dataclass
class Checkpoint:
    round: int  # rounds done: training resumes at this round
    params: np.ndarray  # flat float32
    optimizer: dict
    metrics: dict
    layout_hash: str

    def write(self, file: BinaryIO) -> None:
        """Serialise into `file` (the orchestrator gives a temporary file: in memory, the bytes
        would be a second model-sized copy of the parameters and optimizer state)."""
        torch.save(
            {
                "format": FORMAT,
                "round": self.round,
                "params": torch.from_numpy(np.ascontiguousarray(self.params)),
                "optimizer": self.optimizer,
                "metrics": self.metrics,
                "layout_hash": self.layout_hash,
            },
            file,
        )

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        state = torch.load(io.BytesIO(data), weights_only=True)
        if state.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {FORMAT}")
        return cls(state["round"], state["params"].numpy(), state["optimizer"], state["metrics"], state["layout_hash"])
