"""Model state beyond the parameters (buffers) and the server step (schedule, clipping): pure torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pangea.settings import ReferenceSettings, SettingsError
from pangea.train import diloco, steps
from pangea.train.layout import Layout
from pangea.train.training import StepSettings, apply_mean, check_model, gradient, lr_at, make_optimizer


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def test_the_state_vector_is_parameters_then_buffers():
    model = bn_net()
    layout = Layout.of(model)
    params = sum(p.numel() for p in model.parameters())
    assert layout.param_numel == params and layout.numel == params + 3 + 3 + 1
    assert layout.buffer_names == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    flat = layout.flatten_params(model)
    flat[layout.param_numel :] = np.arange(7, dtype=np.float32) + 0.25
    flat[-1] = 41.0
    other = bn_net()
    layout.load_params(other, flat)
    assert other[1].num_batches_tracked.dtype == torch.int64 and int(other[1].num_batches_tracked) == 41
    arrays = layout.named_arrays(layout.flatten_params(other))
    assert arrays["1.num_batches_tracked"].dtype == np.int64 and arrays["1.num_batches_tracked"] == 41
    assert set(arrays) == set(other.state_dict())  # params.npz holds what load_state_dict(strict=True) needs
    other.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


def test_a_gradient_message_carries_the_buffers_its_forward_left():
    model = bn_net()
    layout = Layout.of(model)
    x = torch.randn(8, 4)
    batch = {"x": x, "y": torch.zeros(8, dtype=torch.int64)}
    flat = gradient(model, layout, batch, steps.classify, StepSettings(), (0, 0, 8)).values
    h = model[0](x).detach()  # what BatchNorm saw (the first Linear did not move)
    p = layout.param_numel
    np.testing.assert_allclose(flat[p : p + 3], 0.1 * h.mean(0).numpy(), atol=1e-6)  # momentum 0.1 from 0
    np.testing.assert_allclose(flat[p + 3 : p + 6], 0.9 + 0.1 * h.var(0).numpy(), atol=1e-6)  # from 1, unbiased
    assert flat[-1] == 1.0  # one forward in training mode


def test_the_mean_of_shard_buffers_becomes_the_servers_buffers():
    model = bn_net()
    layout = Layout.of(model)
    optimizer = make_optimizer(ReferenceSettings(), layout.params(model))
    mean = np.zeros(layout.numel, np.float32)
    mean[layout.param_numel :] = 0.5
    mean[-1] = 3.0
    before = [p.detach().clone() for p in layout.params(model)]
    apply_mean(ReferenceSettings(lr=0.1, momentum=0.0), layout, model, optimizer, mean, 0, 10)
    assert torch.equal(model[1].running_mean, torch.full((3,), 0.5)) and int(model[1].num_batches_tracked) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, layout.params(model)))  # zero gradient: no move


def test_diloco_pseudo_gradients_carry_end_buffers_not_their_change():
    model = bn_net()
    layout = Layout.of(model)
    start = layout.flatten_params(model)
    batches = [((h, 0, 6), {"x": torch.randn(6, 4), "y": torch.zeros(6, dtype=torch.int64)}) for h in range(3)]
    delta, _, samples, count = diloco.local_steps(
        model, layout, start, batches, "sgd", 0.1, steps.classify, StepSettings()
    )
    end = layout.flatten_params(model)
    assert samples == 18 and count == 18 and delta[-1] == 3.0  # three forwards
    np.testing.assert_array_equal(delta[layout.param_numel :], end[layout.param_numel :])
    np.testing.assert_allclose(delta[: layout.param_numel], (start - end)[: layout.param_numel])


def test_lossy_compression_of_a_model_with_buffers_is_refused():
    with pytest.raises(SettingsError, match="--compression int8: the model has buffers"):
        check_model(Layout.of(bn_net()), ReferenceSettings(compression="int8"))
    check_model(Layout.of(nn.Linear(2, 2)), ReferenceSettings(compression="int8"))


def test_warmup_then_cosine_to_a_tenth():
    s = ReferenceSettings(lr=1.0, lr_schedule="cosine", warmup_steps=4)
    assert [lr_at(s, i, 14) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(s, 4, 14) == 1.0 and math.isclose(lr_at(s, 13, 14), 0.1)
    assert math.isclose(lr_at(s, 9, 14), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert lr_at(ReferenceSettings(lr=0.3), 99, 100) == 0.3
    assert lr_at(ReferenceSettings(mode="diloco", outer_lr=0.7, lr_schedule="cosine"), 0, 10) == 0.7


def test_clipping_bounds_the_global_norm_of_the_step():
    model = nn.Linear(3, 1, bias=False)
    layout = Layout.of(model)
    settings = ReferenceSettings(lr=1.0, momentum=0.0, clip_grad=0.5)
    optimizer = make_optimizer(settings, layout.params(model))
    before = layout.flatten_params(model)
    apply_mean(settings, layout, model, optimizer, np.array([3.0, 0.0, 4.0], np.float32), 0, 1)
    np.testing.assert_allclose(before - layout.flatten_params(model), [0.3, 0.0, 0.4], rtol=1e-6)
