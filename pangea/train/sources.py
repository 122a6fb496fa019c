"""Where a task's samples come from: in-memory arrays (`data.Dataset`) or a token file
(`tokens.TokenData`).  No torch here: the preprocessor needs none."""

from __future__ import annotations

from pathlib import Path

from pangea.train.data import load_dataset
from pangea.train.tokens import load_tokens


def load_data(
    task: str,
    dataset: str,
    *,
    step: str = "",
    context: int = 128,
    vocab: int = 0,
    val_fraction: float = 0.1,
    eval_windows: int = 256,
):
    """The samples a task trains on: in-memory arrays (`Dataset`), or for `lm` a token file
    (`pangea.train.tokens.TokenData`).  No torch here: the preprocessor needs none.

    Targets must be class labels for `classify` with its own step; a user's `step` (or loss)
    decides what any numeric targets mean."""
    if task == "lm":
        return load_tokens(
            Path(dataset), context=context, vocab=vocab, val_fraction=val_fraction, eval_windows=eval_windows
        )
    return load_dataset(dataset, labels=task == "classify" and not step)
