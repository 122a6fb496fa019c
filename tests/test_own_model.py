"""Your own model and step over a real nats-server, each run against `pangea reference` with the
same settings or against its own recorded plans (`pangea verify`):

- a model with dropout, K = 2 and 3, clean and with a worker SIGKILLed mid-run, and in diloco;
- Hugging Face `transformers` models built from tiny configs (nothing downloaded): GPT-2 on a
  `.txt`, a ResNet image classifier with BatchNorm on an (n, C, H, W) `.npz`;
- a user step with a masked loss, whose first round is the float64 gradient of the global batch's
  mean over counted targets;
- `--micro-batch` and `--precision bf16`;
- an optimizer factory with two parameter groups across an orchestrator SIGKILL and resume;
- TensorBoard event files, read back with TensorBoard's own reader.
"""

from __future__ import annotations

import signal
import textwrap

import numpy as np
import pytest
import torch

from pangea.train.data import load_dataset
from pangea.train.layout import Layout
from pangea.train.models import build_model
from pangea.train.outputs import load_params
from pangea.train.tokens import stdlib_corpus
from tests.cluster import Cluster, metrics
from tests.helpers import role_env, run_pangea
from tests.yardstick import assert_exact, assert_verified, reference

_USER = textwrap.dedent('''
    """A user's own module: models, a step and an optimizer, as `module:name` for pangea."""
    import torch
    from torch import nn


    def dropout_mlp(in_features, num_classes):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, num_classes)
        )


    def regressor(in_features, num_classes):
        return nn.Sequential(nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, num_classes))


    def masked_mse(model, batch):
        """Squared error summed over the targets the mask keeps, and how many it keeps."""
        mask = batch["mask"].to(batch["y"].dtype)
        return (((model(batch["x"]) - batch["y"]) ** 2) * mask).sum(), batch["mask"].sum()


    def two_groups(model, lr):
        """nanoGPT's split: decay on matrices, none on biases, which step at twice the rate."""
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW(
            [
                {"params": matrices, "weight_decay": 0.1, "name": "decay"},
                {"params": vectors, "weight_decay": 0.0, "lr": 2 * lr, "name": "no_decay"},
            ],
            lr=lr,
        )


    def gpt2(num_classes):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=num_classes, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config)  # dropout 0.1 in embeddings, attention and residuals: on


    def resnet(num_classes):
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_classes
        )
        return ResNetForImageClassification(config)
''')

DROPOUT = dict(model="pangea_own:dropout_mlp", epochs=3, seed=5)


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def own_module(tmp_path_factory):
    """The user's module in a directory of its own, importable by every role and the reference."""
    where = tmp_path_factory.mktemp("own")
    (where / "pangea_own.py").write_text(_USER)
    return where


@pytest.fixture
def env(own_module, nats_url, monkeypatch):
    monkeypatch.syspath_prepend(str(own_module))  # the reference process gets sys.path as PYTHONPATH
    env = role_env(nats_url)
    env["PYTHONPATH"] = str(own_module)
    return env


def _run(env, job: str, out, workers: int, settings: dict, *extra: str) -> None:
    result = run_pangea(
        "run", "--workers", str(workers), "--job", job, "--out", str(out), *flags(settings), *extra, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's event files, as TensorBoard's own reader reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("workers", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_dropout_equals_the_reference_and_verifies(env, job, tmp_path, workers):
    """Each shard draws its masks from (seed, round, its rows): a run of K workers equals
    `pangea reference --workers K` and verifies against its plans.  Its event files hold its loss,
    rate, throughput and evaluations, as TensorBoard reads them."""
    out = tmp_path / "run"
    _run(env, job, out, workers, DROPOUT)
    assert_exact(out, reference(tmp_path / "ref", workers=workers, **DROPOUT))
    assert_verified(out)
    m, series = metrics(out), _events(out)
    rounds = len(m["loss"])
    assert [s for s, _ in series["train/loss"]] == list(range(rounds))
    np.testing.assert_allclose([v for _, v in series["train/loss"]], m["loss"], rtol=1e-6)
    assert all(v == pytest.approx(0.05) for _, v in series["train/lr"])
    assert [v for _, v in series["train/workers"]] == m["workers"]
    assert all(v > 0 for _, v in series["train/samples_per_second"])
    accuracy = [(e["round"], e["test_accuracy"]) for e in m["evaluations"]]
    assert [(s, pytest.approx(v)) for s, v in series["eval/test_accuracy"]] == accuracy


def _kill_a_worker(env_nats, job, tmp_path, workers: int, settings: dict, out, kill_at: int = 25) -> None:
    """K workers started by hand; w1 SIGKILLed at round `kill_at` and started again under its name."""
    cluster = Cluster(env_nats["PANGEA_NATS_URL"], job, tmp_path)
    cluster.env["PYTHONPATH"] = env_nats["PYTHONPATH"]
    try:
        for i in range(workers):
            cluster.worker(f"w{i}", test_delay=0.02)
        cluster.start("pre", "preprocessor")
        cluster.start("orch", "orchestrator", "--workers", str(workers), "--out", str(out), *flags(settings))
        cluster.wait_for_round(kill_at)
        cluster.signal("w1", signal.SIGKILL)
        cluster.procs["w1"].wait()
        cluster.worker("w1", test_delay=0.02)  # as `pangea run` restarts it
        cluster.wait("orch", timeout=600)
    finally:
        cluster.close()


DILOCO = dict(mode="diloco", local_steps=5, inner_optimizer="adamw", inner_lr=0.003)


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "mode"), [(2, {}), (3, {}), (2, DILOCO)], ids=["sync-2", "sync-3", "diloco-2"])
def test_dropout_with_a_worker_killed_verifies(env, job, tmp_path, workers, mode):
    """A shard re-issued to another worker draws the masks its first owner drew (a diloco shard:
    each local step's): the run verifies against its recorded plans (which `pangea reference
    --plans-from` recomputes) to <= 1e-6."""
    out = tmp_path / "run"
    settings = dict(DROPOUT, epochs=5, **mode)
    _kill_a_worker(env, job, tmp_path, workers, settings, out, kill_at=25 if not mode else 5)
    events = metrics(out)["events"]
    assert any(e["kind"] == "reassign" for e in events) or any(e["kind"] == "leave" for e in events), events
    assert_verified(out)


@pytest.mark.slow
def test_diloco_with_dropout_equals_its_reference(env, job, tmp_path):
    """Each local step draws its masks from its own global batch and rows."""
    settings = dict(DROPOUT, epochs=2, **DILOCO)
    out = tmp_path / "run"
    _run(env, job, out, 2, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=2, **settings))
    assert_verified(out)


# ---------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    whole = tmp_path_factory.mktemp("text") / "stdlib.txt"
    stdlib_corpus(whole)
    small = whole.with_name("stdlib-60k.txt")
    small.write_bytes(whole.read_bytes()[:60_000])
    return small


@pytest.mark.slow
def test_a_hugging_face_gpt2_trains_on_a_text_file_exactly(env, job, tmp_path, text):
    """`GPT2LMHeadModel` (random init from a tiny config, its dropout on) with `--task lm`: called
    with `input_ids`, its `.logits` against the data's shifted targets (the shift done once)."""
    pytest.importorskip("transformers", reason="transformers (the test extras) is not installed")
    settings = dict(
        task="lm", model="pangea_own:gpt2", dataset=str(text), context=32, batch_size=16, max_steps=30,
        optimizer="adamw", lr=0.003, eval_every=15, eval_windows=32,
    )  # fmt: skip
    out = tmp_path / "run"
    _run(env, job, out, 2, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=2, **settings))
    evaluations = metrics(out)["evaluations"]
    assert len(evaluations) == 2 and evaluations[-1]["val_loss"] < evaluations[0]["val_loss"] < 5.6  # ln 256 = 5.55


@pytest.mark.slow
def test_a_hugging_face_image_classifier_with_batchnorm_trains_exactly(env, job, tmp_path):
    """`ResNetForImageClassification` takes `pixel_values` (n, C, H, W) and returns `.logits`; its
    BatchNorm statistics travel with its parameters."""
    pytest.importorskip("transformers", reason="transformers (the test extras) is not installed")
    digits = load_dataset("digits")
    images = tmp_path / "digits-images.npz"
    np.savez(
        images,
        x_train=digits.x_train.reshape(-1, 1, 8, 8),
        y_train=digits.y_train,
        x_test=digits.x_test.reshape(-1, 1, 8, 8),
        y_test=digits.y_test,
    )
    settings = dict(model="pangea_own:resnet", dataset=str(images), epochs=2, seed=2)
    out = tmp_path / "run"
    _run(env, job, out, 2, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=2, **settings))
    params = load_params(out / "params.npz")
    assert any(name.endswith("running_var") for name in params)
    assert metrics(out)["final_test_accuracy"] > 0.3


# ---------------------------------------------------------------- a masked step


def _masked_regression(path) -> None:
    """Regression targets with a mask per target: rows hold from none to all four."""
    rng = np.random.default_rng(3)
    n = 240
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 4))).astype(np.float32)
    mask = rng.random((n, 4)) < rng.uniform(0.0, 1.0, (n, 1))
    np.savez(
        path,
        x_train=x[:200],
        y_train=y[:200],
        mask_train=mask[:200],
        x_test=x[200:],
        y_test=y[200:],
        mask_test=mask[200:],
    )


@pytest.mark.parametrize("workers", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_a_masked_step_gives_the_global_batchs_mean_over_counted_targets(env, job, tmp_path, own_module, workers):
    """`--step` with a mask carried as a named tensor: after one SGD step at lr 1, the parameters
    moved by the float64 gradient of the global batch's mean over its counted targets (within 1e-6),
    for shards holding different numbers of them; and the run equals its reference."""
    data = tmp_path / "masked.npz"
    _masked_regression(data)
    settings = dict(
        model="pangea_own:regressor", step="pangea_own:masked_mse", dataset=str(data), batch_size=64,
        optimizer="sgd", lr=1.0, momentum=0.0, max_steps=1, epochs=1, seed=4,
    )  # fmt: skip
    out = tmp_path / "run"
    _run(env, job, out, workers, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=workers, **settings))

    import importlib

    own = importlib.import_module("pangea_own")
    dataset = load_dataset(str(data), labels=False)
    model = build_model("pangea_own:regressor", dataset.input_shape, dataset.num_classes, (), 4)
    layout = Layout.of(model)
    before = layout.flatten_params(model)
    rows = dataset.rows(4, 64, 0, 0, 64)
    model.double()
    batch = {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in rows.items()}
    loss, count = own.masked_mse(model, batch)
    (loss / count).backward()
    expected = np.concatenate([p.grad.reshape(-1).numpy() for p in layout.params(model)])
    after = np.concatenate([v.reshape(-1) for v in load_params(out / "params.npz").values()])
    np.testing.assert_allclose(before - after, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- micro-batches, bf16


@pytest.mark.slow
@pytest.mark.parametrize("how", [dict(micro_batch=5), dict(precision="bf16")], ids=["micro-batch", "bf16"])
def test_micro_batches_and_bf16_equal_the_reference_with_the_same_settings(env, job, tmp_path, how):
    settings = dict(DROPOUT, epochs=2, **how)
    out = tmp_path / "run"
    _run(env, job, out, 2, settings)
    assert_exact(out, reference(tmp_path / "ref", workers=2, **settings))
    assert metrics(out)["settings"] | how == metrics(out)["settings"]


# ---------------------------------------------------------------- the user's optimizer


@pytest.mark.slow
def test_an_optimizer_with_two_groups_survives_an_orchestrator_kill(env, job, tmp_path):
    """Its groups' rates and their Adam state are checkpointed; the restarted orchestrator resumes
    from them, and the run verifies against its plans."""
    settings = dict(
        DROPOUT, epochs=6, optimizer="pangea_own:two_groups", lr=0.003, lr_schedule="cosine", warmup_steps=20
    )
    out = tmp_path / "run"
    cluster = Cluster(env["PANGEA_NATS_URL"], job, tmp_path)
    cluster.env["PYTHONPATH"] = env["PYTHONPATH"]
    args = ["orchestrator", "--workers", "2", "--out", str(out), "--checkpoint-every", "10", *flags(settings)]
    try:
        for i in range(2):
            cluster.worker(f"w{i}", test_delay=0.02)
        cluster.start("pre", "preprocessor")
        cluster.start("orch", *args)
        cluster.wait_for_round(45)
        cluster.signal("orch", signal.SIGKILL)
        cluster.procs["orch"].wait()
        cluster.start("orch", *args, "--resume", "true")
        cluster.wait("orch", timeout=600)
    finally:
        cluster.close()
    m = metrics(out)
    assert any(e["kind"] == "resume" and "resumed from the checkpoint" in e["detail"] for e in m["events"]), m["events"]
    series = _events(out)
    assert {"train/lr/decay", "train/lr/no_decay"} <= set(series)
    ratios = {round(b / a, 6) for (_, a), (_, b) in zip(series["train/lr/decay"], series["train/lr/no_decay"])}
    assert ratios == {2.0}
    assert [s for s, _ in series["train/loss"]] == list(range(len(m["loss"])))  # the resumed rounds once
    assert_verified(out)
