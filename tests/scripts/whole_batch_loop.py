"""The loop everyone writes by hand: digits, an MLP, Adam over whole global batches; writes params.

Run in a fresh process by tests/test_exactness.py (argv: output .npz, epochs, batch size, seed,
lr), on the kernels `pangea reference --workers 1` uses: a process of its own, like the
reference, not the test process that hundreds of tests went through before.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pangea.train import kernels
from pangea.train.data import global_batch, load_dataset, position
from pangea.train.layout import Layout
from pangea.train.models import build_model
from pangea.train.tasks import classify_loss
from pangea.train.training import make_optimizer


def main(out: str, epochs: int, batch: int, seed: int, lr: float) -> None:
    digits = load_dataset("digits")
    model = build_model("mlp", digits.input_shape, digits.num_classes, (128,), seed)
    settings = type("S", (), {"optimizer": "adam", "lr": lr, "weight_decay": 0.0})()
    optimizer = make_optimizer(settings, model.parameters())
    n = len(digits.x_train)
    steps = epochs * -(-n // batch)
    kernels.set_threads(kernels.worker_threads(1))
    for r in range(steps):
        idx = global_batch(n, batch, seed, *position(r, n, batch))
        optimizer.zero_grad()
        x, y = torch.from_numpy(digits.x_train[idx]), torch.from_numpy(digits.y_train[idx])
        classify_loss(model(x), y).backward()
        optimizer.step()
    layout = Layout.of(model)
    np.savez(out, **layout.named_arrays(layout.flatten_params(model)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
