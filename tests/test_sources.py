"""Sources of samples in one process (no bus): global batches keyed by (seed, epoch, step) whatever
the cut and the pool, per-sample transforms keyed by (seed, epoch, index), built-in tables
(.npy, Parquet, Hugging Face directories, image folders), sharded token files, and the inputs a
step gets (uint8 image bytes as float in [0, 1])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pangea.errors import DataError, SettingsError
from pangea.train import inputs
from pangea.train.data import load_dataset
from pangea.train.samples import sample_rng
from pangea.train.sources import load_data
from pangea.train.tokens import load_tokens

# A user's module, as tests/test_own_model.py does it: importable by a spawned data worker too.
_USER = '''
import numpy as np
import torch


class Squares:
    """x: (4,) floats of i, y: i % 3; 60 samples, 20 held out."""

    def __init__(self, n):
        self.n = n
        self.num_classes = 3

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(4, float(i), np.float32), i % 3


def splits():
    return Squares(60), Squares(20)


def noisy(sample, rng):
    """numpy's keyed generator and torch's global one, both keyed by the sample."""
    if rng is None:
        return sample
    x = np.asarray(sample["x"]) + rng.normal(size=4).astype(np.float32) + torch.rand(4).numpy()
    return {"x": x, "y": sample["y"]}


class Random:
    """A torchvision-style dataset: its own __getitem__ draws (from torch's and numpy's generators)."""

    num_classes = 2

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"x": torch.rand(3).numpy() + np.random.random(3).astype(np.float32), "y": i % 2}


def random_only():
    return Random(), None


def training_only(sample, rng):
    """A transform that forgets evaluation samples (rng None)."""
    return {"x": sample["x"] * rng.random(), "y": sample["y"]}


def uint16():
    return [{"x": np.zeros(2, np.uint16), "y": 0}] * 4


def scaled(samples, rng):
    """One factor per global batch, from the batch's keyed generator."""
    factor = 1.0 if rng is None else float(rng.uniform(1, 2))
    return {"x": np.stack([s["x"] for s in samples]) * factor, "y": np.stack([s["y"] for s in samples])}
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    where = tmp_path_factory.mktemp("user")
    (where / "pangea_data_user.py").write_text(_USER)
    return where


@pytest.fixture
def on_path(user, monkeypatch):
    monkeypatch.syspath_prepend(str(user))


def _source(**kw):
    return load_data("classify", "pangea_data_user:splits", transform="pangea_data_user:noisy", **kw)


# ---------------------------------------------------------------- keyed by the plan, not the process


def test_a_global_batch_does_not_depend_on_its_cut_or_on_the_pool(on_path):
    """Rows [a, b) of global batch g are the same however the batch is cut, and whether one
    process or a pool of two computed its samples (spawned processes: their own generators)."""
    one = _source()
    whole = one.rows(7, 16, 5, 0, 16)
    parts = [one.rows(7, 16, 5, a, b) for a, b in ((0, 5), (5, 11), (11, 16))]
    for name in whole:
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])
    pooled = _source(workers=2)
    try:
        again = pooled.rows(7, 16, 5, 0, 16)
    finally:
        pooled.close()
    assert all(again[k].tobytes() == whole[k].tobytes() for k in whole)
    assert not np.array_equal(one.rows(7, 16, 6, 0, 16)["x"], whole["x"])  # another step: other draws


def test_a_datasets_own_draws_are_keyed_too(on_path):
    """A dataset whose __getitem__ draws (a torchvision-style transform inside it): the same bytes
    whatever the process computed before and whichever pool computes them."""
    one = load_data("classify", "pangea_data_user:random_only")
    one.rows(0, 8, 3, 0, 8)  # another history of the process's generators
    torch.rand(5)
    first = one.rows(0, 8, 0, 0, 8)["x"]
    pooled = load_data("classify", "pangea_data_user:random_only", workers=2)
    try:
        assert pooled.rows(0, 8, 0, 0, 8)["x"].tobytes() == first.tobytes()
    finally:
        pooled.close()
    assert not np.array_equal(one.rows(0, 8, 1, 0, 8)["x"], first)


def test_a_samples_draws_are_keyed_by_seed_epoch_and_index(on_path):
    """The transform's numpy and torch draws for sample i in epoch e: what a one-process
    computation of the same samples gives, and other draws in another epoch."""
    from pangea.train import randomness
    from pangea.train.data import global_batch

    source = _source()
    n, batch = 60, 16
    got = source.rows(3, batch, 4, 0, batch)["x"]  # epoch 1 (4 batches of 16 per epoch), step 0
    indices = global_batch(n, batch, 3, 1, 0)
    expected = []
    for i in indices:
        rng = sample_rng(3, 1, int(i))
        with randomness.seeded(randomness.sample_seed(3, 1, int(i))):
            expected.append(
                np.full(4, float(i), np.float32) + rng.normal(size=4).astype(np.float32) + torch.rand(4).numpy()
            )
    np.testing.assert_array_equal(got, np.stack(expected))


def test_the_collate_sees_the_whole_global_batch_once(on_path):
    """One factor for the whole global batch, from its (seed, epoch, step) generator: every shard
    of it is scaled alike, and another process computes the same."""
    collated = load_data("classify", "pangea_data_user:splits", collate="pangea_data_user:scaled")
    plain = load_data("classify", "pangea_data_user:splits").rows(1, 12, 2, 0, 12)["x"]
    whole = collated.rows(1, 12, 2, 0, 12)["x"]
    ratio = (whole / np.where(plain == 0, 1, plain))[plain != 0]
    assert np.allclose(ratio, ratio[0]) and 1 < ratio[0] < 2
    fresh = load_data("classify", "pangea_data_user:splits", collate="pangea_data_user:scaled")
    np.testing.assert_array_equal(fresh.rows(1, 12, 2, 4, 9)["x"], whole[4:9])


def test_a_transform_that_cannot_take_evaluation_samples_fails_before_round_0(on_path):
    from pangea.settings import ReferenceSettings
    from pangea.train.server import Server

    with pytest.raises(DataError, match="the transform failed on sample 0: AttributeError"):
        Server.build(ReferenceSettings(dataset="pangea_data_user:splits", transform="pangea_data_user:training_only"))


def test_evaluation_samples_are_not_randomized(on_path):
    source = _source()
    first, second = (np.concatenate([b["x"] for b in source.eval_rows(7)]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert first[:, 0].tolist() == [float(i) for i in range(20)]


def test_a_bad_dataset_factory_is_one_line(on_path, tmp_path):
    (tmp_path / "pangea_bad_data.py").write_text(
        "def nothing():\n    return 3\n\ndef pairs():\n    return [(1, 2, 3)]\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DataError, match=r"returned int: a map-style dataset"):
            load_data("classify", "pangea_bad_data:nothing")
        with pytest.raises(DataError, match="a mapping of arrays or an \\(x, y\\) pair"):
            load_data("classify", "pangea_bad_data:pairs")
        with pytest.raises(DataError, match="'x' is uint16, which a Batch cannot carry"):
            load_data("classify", "pangea_data_user:uint16")
    finally:
        sys.path.remove(str(tmp_path))


# ---------------------------------------------------------------- built-in tables


def _digits_images(root, per_class: int = 4, size: int = 10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_image_folder_crops_and_flips_per_sample_and_keeps_bytes(tmp_path):
    _digits_images(tmp_path / "images")
    source = load_data("classify", f"imagefolder:{tmp_path / 'images'}", image_size=6)
    assert source.num_samples == 12 and source.num_classes == 3 and source.input_shape == (3, 6, 6)
    rows = source.rows(0, 12, 0, 0, 12)
    assert rows["x"].dtype == np.uint8 and rows["x"].shape == (12, 3, 6, 6)
    assert sorted(rows["y"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    again = load_data("classify", f"imagefolder:{tmp_path / 'images'}", image_size=6).rows(0, 12, 0, 0, 12)
    assert rows["x"].tobytes() == again["x"].tobytes()
    other_epoch = source.rows(0, 12, 1, 0, 12)  # the same samples in another order, other crops
    assert not np.array_equal(np.sort(other_epoch["x"].reshape(12, -1), 0), np.sort(rows["x"].reshape(12, -1), 0))
    evaluation = list(source.eval_rows())
    assert evaluation[0]["x"].shape == (6, 3, 6, 6)


def test_parquet_row_groups_columns_and_images(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(i: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((5, 4), i, np.uint8)).save(out, format="PNG")
        return out.getvalue()

    n = 50
    table = pa.table(
        {
            "features": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 3, dtype=np.float32)), 3),
            "label": pa.array(np.arange(n) % 4),
            "picture": pa.array([png(i) for i in range(n)], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=7)
    source = load_data("classify", str(tmp_path / "part-0.parquet"), columns="x=features,y=label")
    assert source.num_samples == n and source.num_classes == 4
    sample = source.train[9]
    assert sample["features"].tolist() == [27.0, 28.0, 29.0] and sample["picture"].shape == (1, 5, 4)
    assert (sample["picture"] == 9).all()
    rows = source.rows(2, 10, 0, 0, 10)
    np.testing.assert_array_equal(rows["y"], (rows["x"][:, 0] / 3).astype(int) % 4)  # a row's columns together
    with pytest.raises(DataError, match="--columns x=pixels: the samples have no 'pixels'"):
        load_data("classify", f"parquet:{tmp_path}", columns="x=pixels,y=label")


def test_a_hugging_face_directory_gives_its_splits_and_classes(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (the test extras) is not installed")
    features = datasets.Features(
        {"x": datasets.Sequence(datasets.Value("float32"), length=2), "label": datasets.ClassLabel(num_classes=7)}
    )

    def split(n: int):
        return datasets.Dataset.from_dict(
            {"x": [[i, -i] for i in range(n)], "label": [i % 3 for i in range(n)]}, features=features
        )

    datasets.DatasetDict({"train": split(30), "test": split(8)}).save_to_disk(str(tmp_path / "hf"))
    source = load_data("classify", str(tmp_path / "hf"), columns="y=label")
    assert source.num_samples == 30 and source.num_classes == 7  # the ClassLabel's, not the largest label + 1
    other = datasets.Features(
        {"domain": datasets.ClassLabel(num_classes=3), "x": datasets.Value("float32"), "label": datasets.Value("int64")}
    )
    table = datasets.Dataset.from_dict({"domain": [0] * 6, "x": [0.5] * 6, "label": list(range(6))}, features=other)
    table.save_to_disk(str(tmp_path / "two"))
    assert load_data("classify", f"hf:{tmp_path / 'two'}", columns="y=label").num_classes == 6  # y's, not domain's
    assert source.rows(0, 30, 0, 0, 30)["x"].dtype == np.float32
    assert sum(len(b["y"]) for b in source.eval_rows()) == 8


def test_text_columns_reach_a_transform_and_a_missing_pair_is_none(tmp_path, on_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ab", "abcd", "a"] * 4, "label": [0, 1, 0] * 4}), tmp_path / "t.parquet")
    (tmp_path / "pangea_text.py").write_text(
        "import numpy as np\n\ndef lengths(sample, rng):\n"
        "    return {'x': np.array([len(sample['text'])], np.float32), 'y': sample['label']}\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        source = load_data("classify", str(tmp_path / "t.parquet"), transform="pangea_text:lengths")
        assert sorted(source.rows(0, 12, 0, 0, 12)["x"][:, 0].tolist()) == [1.0] * 4 + [2.0] * 4 + [4.0] * 4
        with pytest.raises(DataError, match="'text' holds <U"):
            load_data("classify", str(tmp_path / "t.parquet"), columns="y=label")
    finally:
        sys.path.remove(str(tmp_path))


def test_npy_files_keep_their_dtype_and_are_read_by_row(tmp_path):
    np.save(tmp_path / "x_train.npy", np.arange(40 * 6, dtype=np.uint8).reshape(40, 6))
    np.save(tmp_path / "y_train.npy", np.arange(40) % 5)
    np.save(tmp_path / "mask_train.npy", np.ones((40, 2), bool))
    np.save(tmp_path / "x_test.npy", np.zeros((4, 6), np.uint8))
    np.save(tmp_path / "y_test.npy", np.zeros(4, np.int64))
    np.save(tmp_path / "mask_test.npy", np.ones((4, 2), bool))
    source = load_data("classify", f"npy:{tmp_path}")
    rows = source.rows(0, 8, 0, 0, 8)
    assert rows["x"].dtype == np.uint8 and rows["mask"].dtype == bool and source.num_classes == 5
    np.testing.assert_array_equal(rows["x"][:, 0] // 6 % 5, rows["y"])


def test_an_npz_reads_its_inputs_as_float32_as_it_always_has(tmp_path):
    """Jobs and replays of .npz data stay what they were (npy:DIR is where dtypes travel as stored)."""
    x = np.arange(20 * 4, dtype=np.uint8).reshape(20, 4)
    np.savez(tmp_path / "bytes.npz", x_train=x, y_train=np.arange(20) % 2, x_test=x[:4], y_test=np.zeros(4, int))
    data = load_dataset(str(tmp_path / "bytes.npz"))
    assert data.x_train.dtype == np.float32 and data.x_train.max() == 79.0


# ---------------------------------------------------------------- the inputs a step gets


def test_image_bytes_reach_the_model_as_floats_in_zero_one_normalized():
    x = np.array([[[[0, 255]], [[51, 102]], [[255, 0]]]], np.uint8)  # (1, 3, 1, 2)
    plain = inputs.tensors({"x": x, "y": np.zeros(1, np.int64)}, "cpu")
    assert plain["x"].dtype == torch.float32 and plain["x"].max() == 1.0 and plain["y"].dtype == torch.int64
    normalized = inputs.tensors({"x": x}, "cpu", "0.5,0.5,0.5/0.5,0.25,0.5")
    np.testing.assert_allclose(normalized["x"][0, :, 0, 0].numpy(), [-1.0, (0.2 - 0.5) / 0.25, 1.0], rtol=1e-6)
    assert inputs.tensors({"x": np.ones((2, 3), np.int64)}, "cpu")["x"].dtype == torch.int64  # token ids stay
    floats = inputs.tensors({"x": np.full((1, 2, 1), 0.5, np.float32)}, "cpu", "0.25,0.5/0.5,0.25")
    assert floats["x"].flatten().tolist() == [0.5, 0.0]  # floats normalized as they are
    with pytest.raises(SettingsError, match="x is torch.int64, not image bytes or floats"):
        inputs.tensors({"x": np.ones((2, 3), np.int64)}, "cpu", "imagenet")


# ---------------------------------------------------------------- token files


def _llmc(path, tokens: np.ndarray, magic: int) -> None:
    header = np.zeros(256, np.int32)
    header[:3] = [magic, 1 if magic == 20240520 else 7, len(tokens)]
    path.write_bytes(header.tobytes() + tokens.tobytes())


def test_token_shards_are_one_stream_and_llmc_headers_say_their_width(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100_000, 5000).astype(np.uint32)  # a vocabulary past 65,535
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "all.bin").write_bytes(tokens.tobytes())
    (tmp_path / "shards").mkdir()
    for i, part in enumerate(np.split(tokens, [1234, 3999])):
        _llmc(tmp_path / "shards" / f"train_{i:06d}.bin", part, 20240801)
    val = rng.integers(0, 100_000, 600).astype(np.uint32)
    _llmc(tmp_path / "val_000000.bin", val, 20240801)
    whole = load_tokens(
        tmp_path / "whole" / "all.bin",
        context=16,
        vocab=100_000,
        token_dtype="uint32",
        val_path=str(tmp_path / "val_000000.bin"),
    )
    shards = load_tokens(
        str(tmp_path / "shards" / "train_*.bin"), context=16, vocab=100_000, val_path=str(tmp_path / "val_000000.bin")
    )
    assert shards.train.dtype == np.uint32 and shards.num_samples == whole.num_samples == (5000 - 1) // 16
    for g in range(4):  # windows crossing the shards' boundaries included
        assert all(np.array_equal(a, b) for a, b in zip(shards.batch(5, 32, g, 0, 32), whole.batch(5, 32, g, 0, 32)))
    xs = np.concatenate([x for x, _ in shards.eval_batches()])
    assert set(np.unique(xs)) <= set(np.unique(val))  # the validation windows come from the validation file


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"a.bin": ("llmc16", 100), "b.bin": ("llmc32", 100)}, "tokens of different widths"),
        ({"a.bin": ("short", 100)}, "should be"),
    ],
)
def test_bad_token_shards_are_one_line(tmp_path, files, needle):
    for name, (kind, n) in files.items():
        tokens = np.arange(n)
        if kind == "short":
            _llmc(tmp_path / name, tokens.astype(np.uint16), 20240520)
            (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-2])
        else:
            _llmc(
                tmp_path / name,
                tokens.astype(np.uint16 if kind == "llmc16" else np.uint32),
                20240520 if kind == "llmc16" else 20240801,
            )
    with pytest.raises(DataError, match=needle):
        load_tokens(tmp_path, context=8, vocab=200)


# ---------------------------------------------------------------- the order of samples past memory


@pytest.mark.parametrize("n", [2, 3, 1000, 4097, 70_001])
def test_past_the_bound_an_epoch_is_still_every_sample_once(monkeypatch, n):
    """Above PERMUTE_WHOLE a batch's indices come from a keyed permutation computed per batch: the
    epoch's batches still cover every sample once, in an order that depends on (seed, epoch)."""
    from pangea.train import data

    monkeypatch.setattr(data, "PERMUTE_WHOLE", 1)
    batch = 64
    epoch = np.concatenate([data.global_batch(n, batch, 5, 2, s) for s in range(-(-n // batch))])
    assert sorted(epoch.tolist()) == list(range(n)) and epoch.dtype == np.int64
    if n > 3:
        assert not np.array_equal(epoch, np.arange(n))
        assert not np.array_equal(epoch[:batch], data.global_batch(n, batch, 5, 3, 0))
    np.testing.assert_array_equal(data.global_batch(n, batch, 5, 2, 0), epoch[:batch])
