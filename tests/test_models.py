"""Unit tests of the built-in `gpt` and `cnn` models; `mlp` and user factories still build."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

from pangea.train import data, models
from pangea.train.layout import Layout

# The reference size: vocab 256, context 128, layers 2, dim 128, heads 4. By hand:
# embeddings 256*128 + 128*128; per block 2 LayerNorms (2*256), qkv 128*384+384,
# proj 128*128+128, MLP 128*512+512 + 512*128+128; final LayerNorm 256; the head is tied.
REFERENCE_PARAMS = 256 * 128 + 128 * 128 + 2 * (512 + 49_536 + 16_512 + 66_048 + 65_664) + 256


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def _gpt(seed: int = 0, context: int = 16, **sizes) -> models.GPT:
    sizes = {"layers": 2, "heads": 4, "dim": 32, **sizes}
    return models.build_model("gpt", (context,), 50, (), seed, **sizes)


@pytest.fixture
def one_thread():
    """Tiny training loops run faster on one thread than on threads fighting for busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- gpt


def test_gpt_reference_size_has_the_expected_parameter_count():
    model = models.build_model("gpt", (128,), 256, (), 0, layers=2, heads=4, dim=128)
    assert REFERENCE_PARAMS == 445_952
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS
    assert Layout.of(model).numel == REFERENCE_PARAMS  # what travels on the bus
    assert model.context == 128
    assert len(model.blocks) == 2


def test_gpt_output_weight_is_the_token_embedding():
    model = _gpt()
    assert model.lm_head.weight is model.token_embedding.weight
    names = [name for name, _ in model.named_parameters()]
    assert names.count("token_embedding.weight") == 1 and "lm_head.weight" not in names
    assert {"token_embedding.weight", "lm_head.weight"} <= model.state_dict().keys()
    # One Parameter: a gradient step through the head moves the embedding too.
    model(torch.randint(0, 50, (2, 16))).sum().backward()
    before = model.token_embedding.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert torch.equal(model.lm_head.weight, model.token_embedding.weight)
    assert not torch.equal(model.token_embedding.weight, before)


def test_gpt_logits_shape_for_full_and_shorter_windows():
    model = _gpt(context=16)
    assert model(torch.randint(0, 50, (3, 16))).shape == (3, 16, 50)
    assert model(torch.randint(0, 50, (3, 5))).shape == (3, 5, 50)


def test_gpt_is_causal():
    model = _gpt(context=16)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    t = 9
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 50
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])  # the model does see the token itself


def test_gpt_is_deterministic_per_seed():
    a, b, c = _weights(_gpt(seed=5)), _weights(_gpt(seed=5)), _weights(_gpt(seed=6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token_embedding.weight"], c["token_embedding.weight"])
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_gpt_initialisation_follows_gpt2():
    model = models.build_model("gpt", (128,), 256, (), 0, layers=8, heads=4, dim=128)
    block = model.blocks[3]
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / 4  # 1/sqrt(2 * 8 layers)
    assert abs(block.attn.proj.weight.std().item() - scaled) < 0.001
    assert abs(block.mlp[2].weight.std().item() - scaled) < 0.001
    assert not block.attn.qkv.bias.any() and not block.mlp[0].bias.any()


def test_gpt_refuses_more_tokens_than_its_context():
    model = _gpt(context=16)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, 17, dtype=torch.long))
    text = _one_line(info.value)
    assert "17" in text and "16" in text


@pytest.mark.parametrize(
    "input_shape, sizes, flag",
    [
        ((16,), {"heads": 3, "dim": 32}, "--heads"),
        ((16,), {"heads": 3, "dim": 32}, "--dim"),
        ((16,), {"dim": 0}, "--dim"),
        ((16,), {"heads": 0}, "--heads"),
        ((16,), {"layers": 0}, "--layers"),
        ((0,), {}, "--context"),
        ((8, 8), {}, "--context"),
    ],
    ids=[
        "dim-not-multiple-of-heads-names-heads",
        "dim-not-multiple-of-heads-names-dim",
        "zero-dim",
        "zero-heads",
        "zero-layers",
        "zero-context",
        "2d-input",
    ],
)
def test_bad_gpt_sizes_are_refused_naming_the_flag(input_shape, sizes, flag):
    with pytest.raises(models.ModelError) as info:
        models.build_model("gpt", input_shape, 50, (), 0, **sizes)
    assert flag in _one_line(info.value)


def test_gpt_learns_a_repeated_sequence(one_thread):
    model = _gpt(context=8, layers=1, heads=2, dim=16)
    idx = torch.arange(9).remainder(7).unsqueeze(0)  # 0..6 repeated: the next token is determined
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 50), y.reshape(-1))
        loss.backward()
        opt.step()
    assert loss.item() < 0.5  # starts near ln(50) = 3.9


# ---------------------------------------------------------------- cnn


@pytest.mark.parametrize("input_shape", [(64,), (8, 8), (1, 8, 8), (3, 16, 16)])
def test_cnn_takes_batches_as_stored(input_shape):
    model = models.build_model("cnn", input_shape, 10, (), 0)
    assert model(torch.randn(5, *input_shape)).shape == (5, 10)


def test_cnn_sees_flattened_samples_as_the_same_images():
    # Same seed, so the same weights: only the reshape differs between these three.
    shapes = ((64,), (8, 8), (1, 8, 8))
    built = {shape: models.build_model("cnn", shape, 10, (), 3).eval() for shape in shapes}
    x = torch.rand(4, 8, 8)
    with torch.no_grad():
        want = built[(1, 8, 8)](x.reshape(4, 1, 8, 8))
        assert torch.equal(built[(64,)](x.reshape(4, 64)), want)
        assert torch.equal(built[(8, 8)](x), want)


@pytest.mark.parametrize("input_shape", [(63,), (2, 3, 4, 5), (1, 5)])
def test_cnn_refuses_shapes_it_cannot_see_as_images(input_shape):
    with pytest.raises(models.ModelError) as info:
        models.build_model("cnn", input_shape, 10, (), 0)
    assert "cnn" in _one_line(info.value)


def test_cnn_batchnorm_statistics_move_in_train_mode_only():
    model = models.build_model("cnn", (64,), 10, (), 0)
    buffers = _weights(model)
    for suffix in ("running_mean", "running_var", "num_batches_tracked"):
        assert any(name.endswith(suffix) for name in buffers), suffix
    model.eval()
    model(torch.rand(8, 64))
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    model.train()
    model(torch.rand(8, 64))
    after = model.state_dict()
    for name, before in buffers.items():
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[name], before), name
        if name.endswith("num_batches_tracked"):
            assert after[name].item() == before.item() + 1, name


def test_cnn_is_deterministic_per_seed():
    a, b, c = (_weights(models.build_model("cnn", (64,), 10, (), s)) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cnn_learns_digits(one_thread):
    ds = data.load_dataset("digits")
    model = models.build_model("cnn", ds.input_shape, ds.num_classes, (), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    order = torch.Generator().manual_seed(0)
    for _ in range(10):
        model.train()
        for idx in torch.randperm(len(x), generator=order).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()  # judged with the running statistics, as `training.evaluate` does
    with torch.no_grad():
        predicted = model(torch.from_numpy(ds.x_test)).argmax(1)
    accuracy = (predicted == torch.from_numpy(ds.y_test)).float().mean().item()
    assert accuracy >= 0.97


# ---------------------------------------------------------------- mlp and user factories


def test_mlp_still_builds_from_five_positional_arguments():
    model = models.build_model("mlp", (8, 8), 10, (32,), 0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64, 32), (32, 10)]
    assert torch.equal(model[1].weight, models.build_model("mlp", (8, 8), 10, (32,), 0)[1].weight)


def test_user_factory_still_builds(tmp_path, monkeypatch):
    name = f"pangea_user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
        import torch

        def make(in_features, num_classes):
            return torch.nn.Linear(in_features, num_classes)
        """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = models.build_model(f"{name}:make", (2, 3), 4, (), 0)
    finally:
        sys.modules.pop(name, None)
    assert (model.in_features, model.out_features) == (6, 4)


def test_unknown_model_names_the_built_ins():
    with pytest.raises(models.ModelError) as info:
        models.build_model("resnet", (64,), 10, (), 0)
    text = _one_line(info.value)
    assert all(word in text for word in ("mlp", "cnn", "gpt", "module:factory"))
