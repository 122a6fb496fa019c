"""A shard's step in one process (no bus): its random draws keyed by its rows, its loss summed over
counted targets so that any cut gives the global batch's mean, micro-batches, bf16, models called
by name (Hugging Face's conventions), user steps and optimizers held to their contracts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pangea.errors import TaskError
from pangea.settings import ReferenceSettings, SettingsError
from pangea.train import plans, steps
from pangea.train.aggregate import RoundAccumulator
from pangea.train.layout import Layout
from pangea.train.training import StepSettings, apply_mean, build_optimizer, gradient
from pangea.wire.messages import Chunk


def _dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def _batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, 6, generator=g), "y": torch.randint(0, 3, (rows,), generator=g)}


# ---------------------------------------------------------------- randomness keyed by the plan


def test_a_steps_dropout_masks_are_a_function_of_its_rows_only():
    """The same rows of the same global batch draw the same masks whatever ran before in the process
    (a re-issue on another worker, the reference computing every shard in turn), and the step leaves
    the process's own generator where it was."""
    model = _dropout_net()
    layout = Layout.of(model)
    batch = _batch(8)
    first = gradient(model, layout, batch, steps.classify, StepSettings(seed=3), (5, 0, 8))
    torch.rand(1000)  # another history of the process's generator
    state = torch.get_rng_state()
    again = gradient(model, layout, batch, steps.classify, StepSettings(seed=3), (5, 0, 8))
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(first.values, again.values)
    for other in [((6, 0, 8), 3), ((5, 1, 9), 3), ((5, 0, 8), 4)]:  # another batch, other rows, another seed
        key, seed = other
        changed = gradient(model, layout, batch, steps.classify, StepSettings(seed=seed), key)
        assert np.abs(changed.values - first.values).max() > 1e-4, other


# ---------------------------------------------------------------- a loss summed over counted targets


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def masked_mse(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error summed over the targets the mask keeps; their count."""
    mask = batch["mask"].to(batch["y"].dtype)
    return (((model(batch["x"]) - batch["y"]) ** 2) * mask).sum(), batch["mask"].sum()


def _masked_data(n: int = 23):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.normal(size=(n, 4)).astype(np.float32)
    mask = rng.random((n, 4)) < np.linspace(0.05, 0.95, n)[:, None]  # rows hold 0..4 targets: uneven shards
    mask[3] = False  # a row with nothing to count
    return {"x": x, "y": y, "mask": mask}


def _float64_mean_gradient(model: nn.Module, data) -> np.ndarray:
    """The gradient of the whole batch's mean over counted targets, in float64."""
    double = _Regressor().double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    batch = {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in data.items()}
    loss, count = masked_mse(double, batch)
    (loss / count).backward()
    return torch.cat([p.grad.reshape(-1) for p in double.parameters()]).numpy()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_rounds_mean_is_the_global_batchs_mean_over_counted_targets_for_any_k(k):
    """Shards with different numbers of counted targets: the orchestrator's sum of loss-sum
    gradients over the sum of counts equals the float64 gradient of the whole batch's masked mean;
    a mean per shard weighted by rows (what a per-row loss gives) does not."""
    torch.manual_seed(0)
    model = _Regressor()
    layout = Layout.of(model)
    data = _masked_data()
    n = len(data["x"])
    cut = plans.cut(n, n, range(0, 1), [f"w{i}" for i in range(k)])
    acc = RoundAccumulator(0, layout.numel, {i: b - a for i, (_, ((a, b),)) in enumerate(cut)}, summed=True)
    by_rows = np.zeros(layout.numel, np.float64)
    for i, (_, ((a, b),)) in enumerate(cut):
        shard = {name: torch.from_numpy(v[a:b]) for name, v in data.items()}
        result = gradient(model, layout, shard, masked_mse, StepSettings(), (0, a, b))
        assert result.count == data["mask"][a:b].sum()
        acc.add(i, b - a, result.loss, Chunk(0, 1, 0, layout.numel), result.values, result.count)
        by_rows += result.values / max(result.count, 1) * (b - a) / n
    expected = _float64_mean_gradient(model, data)
    np.testing.assert_allclose(acc.mean(), expected, rtol=0, atol=1e-6)
    if k > 1:
        assert np.abs(by_rows - expected).max() > 1e-3  # the test can tell a per-row mean apart


# ---------------------------------------------------------------- micro-batches, bf16


@pytest.mark.parametrize("micro_batch", [1, 3, 5, 16])
def test_micro_batches_move_the_gradient_only_by_float_order(micro_batch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    layout = Layout.of(model)
    batch = _batch(13, seed=2)
    whole = gradient(model, layout, batch, steps.classify, StepSettings(), (0, 0, 13))
    pieces = gradient(model, layout, batch, steps.classify, StepSettings(micro_batch=micro_batch), (0, 0, 13))
    assert pieces.count == whole.count == 13
    np.testing.assert_allclose(pieces.values, whole.values, rtol=0, atol=2e-6)
    assert pieces.loss == pytest.approx(whole.loss, abs=1e-6)


def test_bf16_autocast_is_its_own_deterministic_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))
    layout = Layout.of(model)
    batch = _batch(32, seed=4)
    fp32 = gradient(model, layout, batch, steps.classify, StepSettings(), (0, 0, 32))
    bf16 = [gradient(model, layout, batch, steps.classify, StepSettings(precision="bf16"), (0, 0, 32)) for _ in "ab"]
    np.testing.assert_array_equal(bf16[0].values, bf16[1].values)
    assert bf16[0].values.dtype == np.float32  # gradients of fp32 parameters
    assert 1e-5 < np.abs(bf16[0].values - fp32.values).max() < 0.05 * np.abs(fp32.values).max()


# ---------------------------------------------------------------- models called by name


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _NamedInputs(nn.Module):
    """Hugging Face's conventions: the main input by name, an output object with .logits."""

    main_input_name = "input_ids"

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.seen: list[str] = []

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        self.seen = sorted(
            k for k, v in {"input_ids": input_ids, "attention_mask": attention_mask}.items() if v is not None
        )
        self.seen += sorted(kwargs) + (["labels"] if labels is not None else [])
        out = self.embed(input_ids)
        if attention_mask is not None:
            out = out * attention_mask[..., None]
        return _Output(out)


def test_a_model_is_called_by_its_input_name_with_the_tensors_its_forward_names():
    model = _NamedInputs()
    batch = {
        "x": torch.randint(0, 10, (2, 5)),
        "y": torch.randint(0, 3, (2, 5)),
        "attention_mask": torch.ones(2, 5),
        "labels": torch.zeros(2, 5, dtype=torch.int64),  # never passed: the step's loss uses y
        "loss_mask": torch.ones(2, 5),  # not a name forward declares: not passed through **kwargs
    }
    loss, count = steps.run(steps.lm, model, batch, "--task lm")
    assert model.seen == ["attention_mask", "input_ids"]
    assert count == 10 and loss.shape == ()


def test_outputs_give_their_logits_and_anything_else_is_one_line():
    t = torch.ones(2, 3)
    assert steps.logits(t) is t and steps.logits(_Output(t)) is t
    assert steps.logits((t, "cache")) is t and steps.logits({"logits": t}) is t
    with pytest.raises(TaskError, match="returned str: return a tensor"):
        steps.logits("nonsense")


@pytest.mark.parametrize(
    ("result", "needle"),
    [
        (lambda m, b: torch.tensor(1.0), "must return (loss_sum, count)"),
        (lambda m, b: (torch.ones(2), 2), "loss_sum must be a tensor holding one number"),
        (lambda m, b: (torch.tensor(1.0), -1), "count must be a finite number >= 0"),
        (lambda m, b: (torch.tensor(1.0), "many"), "count must be a number"),
    ],
)
def test_a_step_that_breaks_its_contract_is_one_line(result, needle):
    with pytest.raises(TaskError) as info:
        steps.run(result, nn.Linear(1, 1), {"x": torch.ones(1, 1), "y": torch.ones(1)}, "--step mine:step")
    assert needle in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the user's optimizer


def two_groups(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """nanoGPT's split: weight decay on matrices, none on biases; the biases at twice the rate."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": matrices, "weight_decay": 0.1, "name": "decay"},
            {"params": vectors, "weight_decay": 0.0, "lr": 2 * lr, "name": "no_decay"},
        ],
        lr=lr,
    )


def only_weights(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([model[0].weight], lr=0.1)


def test_an_optimizer_factory_keeps_its_groups_and_the_schedule_scales_each():
    settings = ReferenceSettings(optimizer="tests.test_steps:two_groups", lr=0.01, lr_schedule="cosine", warmup_steps=2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = Layout.of(model)
    optimizer = build_optimizer(settings, model, layout)
    assert [g["base_lr"] for g in optimizer.param_groups] == [0.01, 0.02]
    apply_mean(settings, layout, model, optimizer, np.zeros(layout.numel, np.float32), 0, 10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.005, 0.01]  # half way through the warmup
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_an_optimizer_that_leaves_out_parameters_or_is_none_is_one_line():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    layout = Layout.of(model)
    with pytest.raises(SettingsError, match=r"leaves out 3 trainable parameters \(0.bias, 1.weight, 1.bias\)"):
        build_optimizer(ReferenceSettings(optimizer="tests.test_steps:only_weights"), model, layout)
    with pytest.raises(SettingsError, match="returned list, not a torch.optim.Optimizer"):
        build_optimizer(ReferenceSettings(optimizer="tests.test_steps:_not_an_optimizer"), model, layout)


def _not_an_optimizer(model: nn.Module) -> list:
    return list(model.parameters())


# ---------------------------------------------------------------- what a worker claims, and older writers


def test_a_claimed_count_does_not_steer_a_robust_round():
    """The plain mean trusts counts as it trusts gradients; a robust round weighs each shard's mean
    by its planned rows: a shard claiming 1e9 targets (with a gradient to match) counts as its rows."""
    honest = np.ones(4, np.float32) * 32  # a loss sum over 32 targets: mean 1
    liar = np.full(4, -1e9, np.float32)  # mean -1 over "1e9" targets
    acc = RoundAccumulator(0, 4, {0: 32, 1: 32, 2: 32}, keep_rows=True, summed=True)
    for shard, (values, count) in enumerate([(honest, 32), (honest, 32), (liar, 1e9)]):
        acc.add(shard, 32, 1.0, Chunk(0, 1, 0, 4), values, count)
    np.testing.assert_allclose(acc.robust("mean", 1, 10.0), np.full(4, 1 / 3), rtol=1e-6)  # (1 + 1 - 1) / 3
    assert acc.robust("median", 1, 0.0).tolist() == [1.0] * 4


def test_a_round_that_counted_nothing_has_a_zero_gradient_robust_or_not():
    for robust in (False, True):
        acc = RoundAccumulator(0, 3, {0: 2, 1: 2}, keep_rows=robust, summed=True)
        for shard in (0, 1):
            acc.add(shard, 2, 0.0, Chunk(0, 1, 0, 3), np.zeros(3, np.float32), 0.0)
        mean = acc.robust("mean", 1, 1.0) if robust else acc.mean()
        assert mean.tolist() == [0.0, 0.0, 0.0]


def test_a_gradient_without_a_count_is_refused_as_an_older_writers():
    from pangea.errors import Rejected
    from pangea.wire import codec
    from pangea.wire.messages import Gradient, Tensor

    old = Gradient("j", "w0", 0, 0, 2, 0.5, 0, Chunk(0, 1, 0, 3), Tensor.from_numpy(np.zeros(3, np.float32), "grad"))
    decoded = codec.decode(codec.encode(old), Gradient)
    assert decoded.count == -1.0  # the schema's default: what a writer older than counts sends
    acc = RoundAccumulator(0, 3, {0: 2}, summed=True)
    with pytest.raises(Rejected, match="a worker older than counts"):
        acc.add(0, 2, 0.5, decoded.chunk, decoded.values.numpy(), decoded.count)


class _NumpyNoise(nn.Module):
    """Draws from numpy's and Python's global generators in its forward (older code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        import random

        noise = torch.from_numpy(np.random.normal(size=x.shape).astype(np.float32)) * random.random()
        return self.linear(x + noise)


def test_numpy_and_python_draws_in_a_step_are_keyed_too():
    model = _NumpyNoise()
    layout = Layout.of(model)
    batch = _batch(8)
    first = gradient(model, layout, batch, steps.classify, StepSettings(seed=1), (2, 0, 8))
    np.random.random(17)  # other histories of the process's generators
    import random

    random.random()
    before = np.random.get_state()[1].copy()
    again = gradient(model, layout, batch, steps.classify, StepSettings(seed=1), (2, 0, 8))
    np.testing.assert_array_equal(first.values, again.values)
    assert np.array_equal(np.random.get_state()[1], before)  # restored


# ---------------------------------------------------------------- settings and data that cannot work


def test_a_user_optimizer_with_diloco_is_one_line():
    from pangea.settings import load

    with pytest.raises(SettingsError, match="diloco's outer step is SGD with Nesterov momentum"):
        load(ReferenceSettings, mode="diloco", optimizer="tests.test_steps:two_groups")


def test_an_npz_keeps_named_pairs_reads_no_strays_and_refuses_what_a_batch_cannot_carry(tmp_path):
    from pangea.errors import DataError
    from pangea.train.data import load_dataset

    x, y = np.zeros((5, 2), np.float32), np.arange(5) % 2
    base = dict(x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    np.savez(
        tmp_path / "a.npz",
        **base,
        mask_train=np.ones((5, 3), bool),
        mask_test=np.ones((2, 3), bool),
        ids_train=np.arange(5, dtype=np.int32),  # no ids_test: not read
        classes=np.array([0, 1]),  # not a pair: not read
    )
    data = load_dataset(str(tmp_path / "a.npz"))
    rows = data.rows(0, 4, 0, 0, 4)
    assert sorted(rows) == ["mask", "x", "y"] and rows["mask"].dtype == bool and rows["mask"].shape == (4, 3)
    assert sorted(next(data.eval_rows())) == ["mask", "x", "y"]
    np.savez(
        tmp_path / "b.npz", **base, tokens_train=np.zeros((5, 4), np.uint16), tokens_test=np.zeros((2, 4), np.uint16)
    )
    with pytest.raises(DataError, match="tokens_train is uint16, which a Batch cannot carry"):
        load_dataset(str(tmp_path / "b.npz"))


def test_a_replay_of_a_job_older_than_precisions_trains_in_fp32():
    from pangea.roles.jobspec import settings_from_spec, spec_from_settings
    from pangea.settings import OrchestratorSettings

    spec = spec_from_settings(
        OrchestratorSettings(),
        "orchestrator",
        input_shape=(64,),
        num_classes=10,
        num_params=1,
        layout_hash="h",
        total_rounds=1,
        vocab=0,
    )
    older = dataclasses.replace(spec, precision="")  # what a JobSpec written before the field decodes to
    assert settings_from_spec(older)["precision"] == "fp32"
