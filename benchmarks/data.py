"""Images/s of the preprocessor's data path against a torch DataLoader doing the same work.

    python -m benchmarks.data            # a minute or two on 2 cores

An image folder of JPEGs (written here with Pillow) is decoded, randomly crop-resized and flipped
into (3, 32, 32) uint8 global batches of 64: by Pangea's source (`load_data("classify",
"imagefolder:...")`, what the preprocessor runs, with its pool of P data workers), and by a
`torch.utils.data.DataLoader` with P workers over a Dataset that calls the same decode and the
same transform with the same per-sample generators, the same order of samples and batch size.
The DataLoader prefetches (2 batches a worker); Pangea's pool computes one global batch at a time.
Reported: images/s of each (the median of 3 passes over 24 batches after one warm-up batch) and
their ratio (the goal is >= 0.8).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import record

IMAGES, SIDE, CROP, BATCH, BATCHES, PASSES = 1536, 96, 32, 64, 24, 3


def write_images(root: Path, images: int = IMAGES) -> None:
    """JPEGs of SIDE x SIDE pixels in 4 class folders (random, so every decode is work)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


class _Same:
    """A torch Dataset doing what Pangea's source does for sample i of epoch 0: decode, keyed crop and flip."""

    def __init__(self, root: Path, seed: int) -> None:
        from pangea.train.images import ImageFolder, ImageTransform

        self.folder, self.transform, self.seed = ImageFolder(root), ImageTransform(CROP), seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        from pangea.train.samples import sample_rng

        sample = self.transform(self.folder[i], sample_rng(self.seed, 0, i))
        return sample["x"], sample["y"]


def _pangea(root: Path, workers: int, batches: int) -> float:
    from pangea.train.sources import load_data

    source = load_data("classify", f"imagefolder:{root}", image_size=CROP, workers=workers)
    try:
        source.rows(0, BATCH, batches, 0, BATCH)  # warm-up: starts the pool (a batch outside the timed ones)
        times = []
        for _ in range(PASSES):
            start = time.perf_counter()
            for g in range(batches):
                source.global_batch(0, BATCH, g)  # computed every pass (rows() would keep the last)
            times.append(time.perf_counter() - start)
    finally:
        source.close()
    return BATCH * batches / sorted(times)[len(times) // 2]


def _dataloader(root: Path, workers: int, images: int, batches: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from pangea.train.data import global_batch

    order = np.concatenate([global_batch(images, BATCH, 0, 0, g) for g in range(batches + 1)]).tolist()
    loader = DataLoader(
        _Same(root, 0), batch_size=BATCH, sampler=order, num_workers=workers, persistent_workers=True,
        multiprocessing_context="spawn",
    )  # fmt: skip
    torch.set_num_threads(1)
    times = []
    for _ in range(PASSES + 1):
        start = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - start)
    del loader
    return BATCH * (batches + 1) / sorted(times[1:])[len(times[1:]) // 2]  # the first pass starts the workers


def goal_line(rows: list[dict]) -> str:
    ratios = ", ".join(f"{r['ratio']:.2f} with {r['data workers']}" for r in rows)
    met = all(r["ratio"] >= 0.8 for r in rows)
    return f"goal >= 0.8 of the DataLoader's images/s: {'met' if met else 'missed'} ({ratios})"


def run(images: int = IMAGES, batches: int = BATCHES) -> list[dict]:
    """A row per pool size (1, 2); fewer `images` and `batches`: a smaller run (the smoke test's)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_images(root, images)
        for workers in (1, 2):
            ours, theirs = _pangea(root, workers, batches), _dataloader(root, workers, images, batches)
            rows.append(
                {
                    "data workers": workers,
                    "pangea images/s": round(ours, 1),
                    "DataLoader images/s": round(theirs, 1),
                    "ratio": round(ours / theirs, 3),
                }
            )
    record("data", rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
