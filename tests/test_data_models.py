"""Unit tests of datasets, batch order, models, the flat parameter layout and settings."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from pangea import settings
from pangea.train import data, models
from pangea.train.layout import Layout


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# ---------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_types():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = data.load_dataset("digits")
    n = len(bunch.data)
    assert len(ds.x_train) + len(ds.x_test) == n
    assert len(ds.x_test) == round(n * 0.25)
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == (bunch.data.shape[1],)
    assert ds.input_shape == (bunch.data.shape[1],)
    assert ds.y_train.shape == (len(ds.x_train),) and ds.y_test.shape == (len(ds.x_test),)
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.num_classes == 10
    assert set(np.unique(ds.y_train)) == set(range(10))
    # Train + test is a partition of the original samples (as a multiset of rows).
    rows = np.concatenate([ds.x_train, ds.x_test]) * 16.0
    labels = np.concatenate([ds.y_train, ds.y_test])
    got = np.unique(np.column_stack([rows, labels]), axis=0, return_counts=True)
    want = np.unique(np.column_stack([bunch.data, bunch.target]), axis=0, return_counts=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_digits_split_is_the_same_on_every_call():
    a, b = data.load_dataset("digits"), data.load_dataset("digits")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# ---------------------------------------------------------------- batch order


def test_global_batch_is_a_pure_function_of_seed_epoch_step():
    first = data.global_batch(500, 32, seed=3, epoch=2, step=4)
    again = data.global_batch(500, 32, seed=3, epoch=2, step=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, data.global_batch(500, 32, seed=4, epoch=2, step=4))


@pytest.mark.parametrize("num_samples, batch_size", [(103, 10), (100, 10), (7, 64), (64, 1)])
def test_every_sample_once_per_epoch(num_samples, batch_size):
    steps = data.steps_per_epoch(num_samples, batch_size)
    batches = [data.global_batch(num_samples, batch_size, 11, 0, s) for s in range(steps)]
    assert all(len(b) == batch_size for b in batches[:-1])
    assert 1 <= len(batches[-1]) <= batch_size
    assert len(batches[-1]) == num_samples - (steps - 1) * batch_size
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(num_samples))
    assert len(data.global_batch(num_samples, batch_size, 11, 0, steps)) == 0


def test_different_epochs_give_different_orders():
    orders = [np.concatenate([data.global_batch(200, 50, 0, epoch, s) for s in range(4)]) for epoch in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(orders[i], orders[j])
            np.testing.assert_array_equal(np.sort(orders[i]), np.sort(orders[j]))


def test_position_walks_epochs_and_steps():
    steps = data.steps_per_epoch(103, 10)
    assert steps == 11
    seen = [data.position(r, 103, 10) for r in range(3 * steps)]
    assert seen == [(e, s) for e in range(3) for s in range(steps)]


# ---------------------------------------------------------------- .npz datasets


def _arrays(n_train=12, n_test=5, shape=(2, 3)):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.standard_normal((n_train, *shape)),
        "y_train": np.arange(n_train) % 4,
        "x_test": rng.standard_normal((n_test, *shape)),
        "y_test": np.arange(n_test) % 4,
    }


def test_npz_dataset_loads(tmp_path):
    arrays = _arrays()
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    ds = data.load_dataset(str(path))
    assert ds.name == "toy"
    assert ds.input_shape == (2, 3)
    assert ds.num_classes == 4
    for key, want in arrays.items():
        got = getattr(ds, key)
        assert got.dtype == (np.float32 if key.startswith("x") else np.int64)
        np.testing.assert_allclose(got, want.astype(got.dtype))


def test_npz_missing_key_is_named(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as info:
        data.load_dataset(str(path))
    assert "y_test" in _one_line(info.value)


def test_npz_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(data.DataError) as info:
        data.load_dataset(str(path))
    text = _one_line(info.value)
    assert str(path) in text and "not exist" in text


def test_npz_mismatched_lengths_are_named(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    path = tmp_path / "skewed.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as info:
        data.load_dataset(str(path))
    text = _one_line(info.value)
    assert "x_train" in text and "y_train" in text


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda a: a.update(y_test=a["y_test"].astype(np.float64)), "y_test"),
        (lambda a: a.update(y_train=a["y_train"] - 1), "y_train"),
        (lambda a: a.update(x_test=a["x_test"][:, :1]), "shape"),
        (lambda a: a.update(x_train=a["x_train"][:0], y_train=a["y_train"][:0]), "x_train"),
    ],
    ids=["float-labels", "negative-labels", "shape-mismatch", "empty-train"],
)
def test_npz_bad_contents_are_refused(tmp_path, change, word):
    arrays = _arrays()
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as info:
        data.load_dataset(str(path))
    assert word in _one_line(info.value)


def test_npz_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"definitely not numpy")
    with pytest.raises(data.DataError) as info:
        data.load_dataset(str(path))
    assert str(path) in _one_line(info.value)


def test_truncated_npz_is_a_data_error(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **_arrays())
    path = tmp_path / "truncated.npz"
    raw = good.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError):
        data.load_dataset(str(path))


def test_unknown_dataset_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError) as info:
        data.load_dataset("nope")
    assert "nope" in _one_line(info.value)


# ---------------------------------------------------------------- models


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mlp_is_deterministic_per_seed():
    a = _weights(models.build_model("mlp", (8, 8), 10, (32, 16), seed=5))
    b = _weights(models.build_model("mlp", (8, 8), 10, (32, 16), seed=5))
    c = _weights(models.build_model("mlp", (8, 8), 10, (32, 16), seed=6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_mlp_has_the_requested_widths():
    model = models.build_model("mlp", (2, 4), 3, (5, 7), seed=0)
    linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(8, 5), (5, 7), (7, 3)]
    assert model(torch.zeros(6, 2, 4)).shape == (6, 3)


_USER_MODULE = textwrap.dedent(
    """
    import torch

    calls = []

    def make(in_features, num_classes):
        calls.append((in_features, num_classes))
        return torch.nn.Linear(in_features, num_classes)

    def make_fixed():
        calls.append(())
        return torch.nn.Linear(3, 2)

    def not_a_module(in_features, num_classes):
        return "a string"

    def frozen():
        model = torch.nn.Linear(2, 2)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    not_callable = 42
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"pangea_user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory_gets_in_features_and_num_classes(user_module):
    model = models.build_model(f"{user_module}:make", (2, 3, 4), 5, (), seed=1)
    calls = sys.modules[user_module].calls
    assert calls == [(24, 5)]
    assert isinstance(model, torch.nn.Linear)
    assert (model.in_features, model.out_features) == (24, 5)
    again = models.build_model(f"{user_module}:make", (2, 3, 4), 5, (), seed=1)
    assert torch.equal(model.weight, again.weight)


def test_user_factory_without_parameters_is_called_bare(user_module):
    model = models.build_model(f"{user_module}:make_fixed", (9,), 4, (), seed=0)
    assert sys.modules[user_module].calls == [()]
    assert (model.in_features, model.out_features) == (3, 2)


@pytest.mark.parametrize(
    "spec",
    [
        "nomodule_pangea_xyz:f",
        "mlp2",
        ":make",
        "{mod}:",
        "{mod}:missing",
        "{mod}:not_callable",
        "{mod}:not_a_module",
        "{mod}:frozen",
    ],
)
def test_bad_model_specs_are_refused(user_module, spec):
    with pytest.raises(models.ModelError) as info:
        models.build_model(spec.format(mod=user_module), (4,), 2, (8,), seed=0)
    _one_line(info.value)


# ---------------------------------------------------------------- layout


def _model(hidden=(5, 4), seed=0):
    return models.build_model("mlp", (8,), 3, hidden, seed=seed)


def test_layout_describes_every_trainable_parameter():
    model = _model()
    layout = Layout.of(model)
    params = list(model.named_parameters())
    assert layout.names == tuple(n for n, _ in params)
    assert layout.shapes == tuple(tuple(p.shape) for _, p in params)
    assert layout.numel == sum(p.numel() for _, p in params)
    assert layout.offsets == tuple(np.cumsum([0] + [p.numel() for _, p in params])[:-1])


def test_flatten_and_load_round_trip():
    source, target = _model(seed=0), _model(seed=1)
    layout = Layout.of(source)
    flat = layout.flatten_params(source)
    assert flat.dtype == np.float32 and flat.shape == (layout.numel,)
    expected = torch.cat([p.detach().reshape(-1) for p in source.parameters()]).numpy()
    np.testing.assert_array_equal(flat, expected)
    assert not np.array_equal(layout.flatten_params(target), flat)
    layout.load_params(target, flat)
    np.testing.assert_array_equal(layout.flatten_params(target), flat)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 8)
    assert torch.equal(source(x), target(x))


def test_set_grads_fills_each_parameter_grad():
    model = _model()
    layout = Layout.of(model)
    flat = np.random.default_rng(3).standard_normal(layout.numel).astype(np.float32)
    layout.set_grads(model, flat)
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets):
        grad = dict(model.named_parameters())[name].grad
        size = int(np.prod(shape))
        np.testing.assert_array_equal(grad.numpy(), flat[offset : offset + size].reshape(shape))
    np.testing.assert_array_equal(layout.flatten_grads(model), flat)
    # The grads are copies: a later change of the source buffer does not leak into them.
    flat[:] = 0
    assert np.any(layout.flatten_grads(model) != 0)


def test_set_grads_without_copy_shares_the_vector():
    model = _model()
    layout = Layout.of(model)
    flat = np.random.default_rng(4).standard_normal(layout.numel).astype(np.float32)
    layout.set_grads(model, flat, copy=False)
    np.testing.assert_array_equal(layout.flatten_grads(model), flat)
    flat[:] = 0  # shared: the orchestrator hands over a fresh vector and never touches it again
    assert not np.any(layout.flatten_grads(model) != 0)
    read_only = np.ones(layout.numel, np.float32)
    read_only.flags.writeable = False
    layout.set_grads(model, read_only, copy=False)  # not shareable: copied, and no torch warning
    assert layout.flatten_grads(model).sum() == layout.numel


def test_flatten_grads_matches_autograd():
    model = _model()
    layout = Layout.of(model)
    model(torch.randn(6, 8)).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(layout.flatten_grads(model), expected)


def test_wrong_flat_size_is_refused():
    model = _model()
    layout = Layout.of(model)
    with pytest.raises(ValueError):
        layout.load_params(model, np.zeros(layout.numel + 1, np.float32))
    with pytest.raises(ValueError):
        layout.set_grads(model, np.zeros(layout.numel - 1, np.float32))


def test_layout_hash_depends_on_architecture_only():
    base = Layout.of(_model((5, 4), seed=0)).hash
    assert Layout.of(_model((5, 4), seed=9)).hash == base
    assert Layout.of(_model((4, 5))).hash != base
    assert Layout.of(_model((5,))).hash != base


def test_named_arrays_have_parameter_shapes():
    model = _model()
    layout = Layout.of(model)
    arrays = layout.named_arrays(layout.flatten_params(model))
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(arrays[name], p.detach().numpy())


# ---------------------------------------------------------------- settings


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No PANGEA_* variables and no .env file from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("PANGEA_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_settings_read_the_environment(clean_env):
    clean_env.setenv("PANGEA_LR", "0.125")
    clean_env.setenv("PANGEA_EPOCHS", "3")
    clean_env.setenv("PANGEA_OPTIMIZER", "adam")
    clean_env.setenv("PANGEA_HIDDEN", "32, 16")
    clean_env.setenv("PANGEA_JOB", "exp_1-a")
    clean_env.setenv("PANGEA_WORKERS", "5")
    s = settings.load(settings.OrchestratorSettings)
    assert s.lr == 0.125
    assert s.epochs == 3
    assert s.optimizer == "adam"
    assert s.hidden_sizes == (32, 16)
    assert s.job == "exp_1-a"
    assert s.workers == 5


def test_settings_read_a_dotenv_file(clean_env, tmp_path):
    (tmp_path / ".env").write_text("PANGEA_BATCH_SIZE=17\n")
    assert settings.load(settings.OrchestratorSettings).batch_size == 17


def test_overrides_beat_the_environment_and_none_is_ignored(clean_env):
    clean_env.setenv("PANGEA_LR", "0.125")
    clean_env.setenv("PANGEA_EPOCHS", "3")
    s = settings.load(settings.OrchestratorSettings, lr=0.5, epochs=None)
    assert s.lr == 0.5
    assert s.epochs == 3


@pytest.mark.parametrize(
    "var, value",
    [
        ("PANGEA_LR", "-1"),
        ("PANGEA_OPTIMIZER", "rmsprop"),
        ("PANGEA_HIDDEN", "12,x"),
        ("PANGEA_HIDDEN", "12,0"),
        ("PANGEA_JOB", "a.b"),
        ("PANGEA_BATCH_SIZE", "0"),
        ("PANGEA_MOMENTUM", "1"),
    ],
)
def test_bad_environment_value_names_the_variable(clean_env, var, value):
    clean_env.setenv(var, value)
    with pytest.raises(settings.SettingsError) as info:
        settings.load(settings.OrchestratorSettings)
    text = _one_line(info.value)
    assert var in text
    assert value in text


def test_zero_width_written_with_two_digits_is_refused(clean_env):
    clean_env.setenv("PANGEA_HIDDEN", "128,00")
    with pytest.raises(settings.SettingsError):
        settings.load(settings.OrchestratorSettings)


@pytest.mark.parametrize(
    "overrides, flag",
    [({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"), ({"optimizer": "rmsprop"}, "--optimizer")],
)
def test_bad_override_names_the_flag(clean_env, overrides, flag):
    with pytest.raises(settings.SettingsError) as info:
        settings.load(settings.OrchestratorSettings, **overrides)
    text = _one_line(info.value)
    assert flag in text
    assert "PANGEA_" not in text
