"""Your own data over a real nats-server: the batch bytes a run stores do not depend on K, on the
preprocessor's pool of data workers or on a SIGKILL of the preprocessor, and equal a one-process
computation of the same samples and transforms; image folders (random crop and flip), Parquet
files and Hugging Face directories verify exact; a uint32 token corpus in shards with a validation
file of its own equals its reference; a dataset larger than the machine streams in bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import nats
import numpy as np
import pytest
from nats.js import api

from pangea.bus import subjects
from pangea.train.data import load_dataset
from pangea.train.sources import load_data
from pangea.wire import codec
from pangea.wire.messages import Batch
from tests.cluster import metrics
from tests.helpers import pangea_cmd, role_env, run_pangea, start_run, wait_for_log
from tests.yardstick import assert_exact, assert_verified, reference


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def _run(nats_url, job: str, out, workers: int, settings: dict, *extra: str, env: dict | None = None) -> None:
    result = run_pangea(
        "run", "--workers", str(workers), "--job", job, "--out", str(out), *flags(settings), *extra,
        env=env or role_env(nats_url),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


async def _stored_batches(url: str, job: str) -> dict[int, dict[str, bytes]]:
    """Each round's global batch as the job's batch stream stores it: its shards' tensors joined in
    row order, by name (a shard stored twice, after a re-issue or a restart, counted once)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = subjects.stream(job, "batches")
        total = (await js.stream_info(stream)).state.messages
        sub = await js.subscribe(">", stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
        shards: dict[int, dict[int, Batch]] = {}
        for _ in range(total):
            batch = codec.decode((await sub.next_msg(timeout=10)).data, Batch)
            shards.setdefault(batch.round, {}).setdefault(batch.start, batch)
        await sub.unsubscribe()
    finally:
        await nc.close()
    rounds = {}
    for r, parts in shards.items():
        ordered = [parts[start] for start in sorted(parts)]
        rounds[r] = {name: b"".join(bytes(b.tensors[name].data) for b in ordered) for name in ordered[0].tensors}
    return rounds


def stored(url: str, job: str) -> dict[int, dict[str, bytes]]:
    return asyncio.run(_stored_batches(url, job))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder written with Pillow: digits as 16x16 RGB PNGs, 3 classes, train and val."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    digits = load_dataset("digits")
    for split, x, y, count in (
        ("train", digits.x_train, digits.y_train, 60),
        ("val", digits.x_test, digits.y_test, 15),
    ):
        seen = {0: 0, 1: 0, 2: 0}
        for pixels, label in zip(x, y):
            if label > 2 or seen[label] >= count:
                continue
            seen[label] += 1
            gray = np.kron((pixels.reshape(8, 8) * 255).astype(np.uint8), np.ones((2, 2), np.uint8))
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([gray, gray, 255 - gray], -1)).save(folder / f"{seen[label]}.png")
    return root


IMAGES = dict(
    model="mlp", image_size=12, epochs=2, batch_size=16, normalize="0.5,0.5,0.5/0.25,0.25,0.25", lr=0.05, seed=3
)


def _one_process(settings: dict, rounds: int) -> dict[int, dict[str, bytes]]:
    """The same rounds computed here, in this process, with no pool: global batch r, whole."""
    source = load_data("classify", settings["dataset"], image_size=settings["image_size"])
    return {
        r: {
            k: v.tobytes()
            for k, v in source.rows(settings["seed"], settings["batch_size"], r, 0, settings["batch_size"]).items()
        }
        for r in range(rounds)
    }


def test_an_image_folder_run_stores_the_one_process_bytes_and_verifies(nats_url, job, tmp_path, images):
    """Random resized crops and flips keyed per sample, two data workers, K=2: every round's stored
    batch (uint8 on the wire) is what one process computes, and the run verifies exact."""
    settings = dict(IMAGES, dataset=f"imagefolder:{images}")
    out = tmp_path / "run"
    _run(nats_url, job, out, 2, settings, "--data-workers", "2")
    m = metrics(out)
    batches = stored(nats_url, job)
    assert len(batches) == len(m["loss"]) == 2 * -(-180 // 16)
    expected = _one_process(settings, len(batches))
    assert all(batches[r] == expected[r] for r in batches)
    assert_verified(out)
    assert m["final_test_accuracy"] > 0.5, m["test_accuracy"]


@pytest.mark.slow
def test_stored_batches_do_not_depend_on_k_the_pool_or_a_preprocessor_kill(nats_url, job, tmp_path, images):
    settings = dict(IMAGES, dataset=f"imagefolder:{images}", epochs=3)
    seen = {}
    for k, pool in ((1, 1), (3, 4), (2, 1)):
        name = f"{job}-{k}-{pool}"
        _run(nats_url, name, tmp_path / name, k, settings, "--data-workers", str(pool))
        seen[(k, pool)] = stored(nats_url, name)
    killed = tmp_path / "killed"
    proc = start_run(killed, job + "-kill", nats_url, "--workers", "2", *flags(settings), test_delay=0.1)
    try:
        wait_for_log(killed / "logs" / "orchestrator.log", "starting at round")
        time.sleep(1.0)
        os.kill(json.loads((killed / "pids.json").read_text())["preprocessor"], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "role preprocessor killed by SIGKILL: restarting it" in stderr, stderr[-3000:]
    seen["killed"] = stored(nats_url, job + "-kill")
    expected = _one_process(settings, len(seen[(1, 1)]))
    for what, batches in seen.items():
        assert batches == expected, what
    assert_verified(killed)


# ---------------------------------------------------------------- Parquet, Hugging Face


def _digits_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    digits = load_dataset("digits")

    def table(x, y):
        pixels = pa.FixedSizeListArray.from_arrays(pa.array((x * 255).astype(np.uint8).reshape(-1)), 64)
        return pa.table({"pixels": pixels, "label": pa.array(y)})

    pq.write_table(table(digits.x_train, digits.y_train), tmp_path / "train.parquet", row_group_size=100)
    pq.write_table(table(digits.x_test, digits.y_test), tmp_path / "test.parquet", row_group_size=100)
    return digits


@pytest.mark.slow
def test_parquet_and_hugging_face_runs_verify(nats_url, job, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (the test extras) is not installed")
    digits = _digits_tables(tmp_path)
    features = datasets.Features(
        {"x": datasets.Sequence(datasets.Value("uint8"), length=64), "label": datasets.ClassLabel(num_classes=10)}
    )
    splits = {
        name: datasets.Dataset.from_dict(
            {"x": (x * 255).astype(np.uint8).tolist(), "label": y.tolist()}, features=features
        )
        for name, x, y in (("train", digits.x_train, digits.y_train), ("test", digits.x_test, digits.y_test))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    runs = {
        "parquet": dict(
            dataset=str(tmp_path / "train.parquet"),
            val_dataset=str(tmp_path / "test.parquet"),
            columns="x=pixels,y=label",
        ),
        "hf": dict(dataset=f"hf:{tmp_path / 'hf'}", columns="y=label"),
    }
    for name, source in runs.items():
        out = tmp_path / name
        _run(nats_url, f"{job}-{name}", out, 2, dict(source, epochs=3, seed=1), "--data-workers", "2")
        assert_verified(out)
        assert metrics(out)["final_test_accuracy"] > 0.85, (name, metrics(out)["test_accuracy"])


# ---------------------------------------------------------------- tokens at scale


def _llmc_shard(path, tokens: np.ndarray) -> None:
    header = np.zeros(256, np.int32)
    header[:3] = [20240801, 7, len(tokens)]  # llm.c's uint32 (Llama 3) shard
    path.write_bytes(header.tobytes() + tokens.astype(np.uint32).tobytes())


@pytest.mark.slow
def test_a_sharded_uint32_corpus_with_a_validation_file_trains_exactly(nats_url, job, tmp_path):
    """Three llm.c uint32 shards (a vocabulary of 70,000: past uint16) and a validation shard of its
    own: `pangea run --task lm` equals `pangea reference` with the same K."""
    from pangea.train.tokens import stdlib_corpus

    text = tmp_path / "stdlib.txt"
    stdlib_corpus(text)
    raw = np.frombuffer(text.read_bytes()[:60_000], np.uint8).astype(np.uint32) * 273  # ids up to 69,615
    (tmp_path / "shards").mkdir()
    for i, part in enumerate(np.array_split(raw[:50_000], 3)):
        _llmc_shard(tmp_path / "shards" / f"train_{i:06d}.bin", part)
    _llmc_shard(tmp_path / "val_000000.bin", raw[50_000:])
    settings = dict(
        task="lm", model="gpt", dataset=str(tmp_path / "shards"), val_dataset=str(tmp_path / "val_000000.bin"),
        vocab=70_000, context=32, dim=32, layers=1, heads=2, batch_size=16, max_steps=30, optimizer="adamw",
        lr=0.003, eval_every=15, eval_windows=16,
    )  # fmt: skip
    out = tmp_path / "run"
    _run(nats_url, job, out, 2, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=2, **settings))
    evaluations = metrics(out)["evaluations"]
    assert len(evaluations) == 2 and evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]


# ---------------------------------------------------------------- memory


@pytest.mark.slow
def test_a_dataset_larger_than_the_machine_streams_in_bounded_memory(nats_url, job, tmp_path):
    """A sparse 32 GiB x_train.npy (32M samples of 1,024 uint8; the machine has 24 GiB): the
    preprocessor reads the rows each batch needs, its peak RSS stays under 400 MB."""
    rows, width = 32 << 20, 1024
    x = np.lib.format.open_memmap(tmp_path / "x_train.npy", mode="w+", dtype=np.uint8, shape=(rows, width))
    del x  # a sparse file: no byte of it is on disk
    np.lib.format.open_memmap(tmp_path / "y_train.npy", mode="w+", dtype=np.int64, shape=(rows,))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x_test.npy", rng.integers(0, 256, (64, width), dtype=np.uint8))
    np.save(tmp_path / "y_test.npy", np.zeros(64, np.int64))
    settings = dict(dataset=f"npy:{tmp_path}", task="classify", batch_size=32, max_steps=40, hidden="16")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        pangea_cmd("run", "--job", job, "--out", str(out), "--workers", "2", *flags(settings)),
        env=role_env(nats_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(metrics(out)["loss"]) == 40
    line = [ln for ln in (out / "logs" / "preprocessor.log").read_text().splitlines() if "peak RSS" in ln][-1]
    peak = float(line.rsplit("peak RSS", 1)[1].split("MB")[0])
    print(f"32 GiB of samples: preprocessor peak RSS {peak:.0f} MB")
    assert peak < 400, line
