"""BatchRenorm1d/2d/3d against torch.nn.BatchNorm* and an independent float64 Algorithm 1."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    renorm_limits_at,
    set_renorm_limits,
)
from normlab.nn.batch_renorm import batch_renorm, batch_renorm_reference

EPS = 1e-5
SEEDS = [0, 1, 2]

# (BatchRenorm class, BatchNorm class, input shape)
CASES = [
    (BatchRenorm1d, nn.BatchNorm1d, (6, 4)),
    (BatchRenorm1d, nn.BatchNorm1d, (5, 4, 3)),
    (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 5, 2)),
    (BatchRenorm3d, nn.BatchNorm3d, (3, 3, 2, 3, 2)),
]


# ----------------------------------------------------------------------------------------------
# Independent float64 reference written from the paper (Ioffe 2017, Algorithm 1 and Section 2)
# ----------------------------------------------------------------------------------------------


def rows(x):
    """(N, C, *) -> (m, C): one column per channel, the m = N * prod(spatial) values as rows."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def unrows(r, like):
    shape = (like.shape[0],) + tuple(like.shape[2:]) + (like.shape[1],)
    return r.reshape(shape).movedim(-1, 1)


def paper_correction(x, running_mean, running_var, r_max, d_max):
    xr = rows(x.detach())
    mu_b = xr.mean(0)
    sigma_b = torch.sqrt(EPS + ((xr - mu_b) ** 2).mean(0))
    sigma = torch.sqrt(running_var + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - running_mean) / sigma, -d_max, d_max)
    return r, d


def paper_forward(x, running_mean, running_var, gamma, beta, r_max, d_max, stop_gradient=True):
    """y = gamma * ((x - mu_B) / sigma_B * r + d) + beta, in autograd ops."""
    xr = rows(x)
    mu_b = xr.mean(0)
    sigma_b = torch.sqrt(EPS + ((xr - mu_b) ** 2).mean(0))
    sigma = torch.sqrt(running_var + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - running_mean) / sigma, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    return unrows(gamma * ((xr - mu_b) / sigma_b * r + d) + beta, x)


def paper_gradients(x, g, running_mean, running_var, gamma, r_max, d_max):
    """The paper's closed-form backward (Section 2) with r, d treated as constants."""
    xr, gr = rows(x), rows(g)
    m = xr.shape[0]
    mu_b = xr.mean(0)
    sigma_b = torch.sqrt(EPS + ((xr - mu_b) ** 2).mean(0))
    r, d = paper_correction(x, running_mean, running_var, r_max, d_max)
    x_hat = (xr - mu_b) / sigma_b * r + d
    dx_hat = gr * gamma
    dsigma_b = (dx_hat * (xr - mu_b) * (-r / sigma_b**2)).sum(0)
    dmu_b = (dx_hat * (-r / sigma_b)).sum(0)
    dx = dx_hat * r / sigma_b + dsigma_b * (xr - mu_b) / (m * sigma_b) + dmu_b / m
    return unrows(dx, x), (gr * x_hat).sum(0), gr.sum(0)


def make_stats(channels, seed, active=True):
    """Running statistics that make r and d non-trivial (some clipped, some not)."""
    gen = torch.Generator().manual_seed(seed + 100)
    mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    var = torch.rand(channels, generator=gen, dtype=torch.float64) * 3 + 0.2
    return (mean, var) if active else (torch.zeros(channels), torch.ones(channels))


def rand_affine(layer, seed):
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 1.5 + 0.25)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))


def rand_input(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.5 + 1.5).to(dtype)


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# r_max = 1, d_max = 0 is BatchNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("brn_cls,bn_cls,shape", CASES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_identity_limits_equal_batchnorm_train_and_eval(brn_cls, bn_cls, shape, affine, bias, seed):
    channels = shape[1]
    bn = bn_cls(channels, affine=affine, bias=bias, dtype=torch.float64)
    brn = brn_cls(
        channels,
        momentum=0.1,
        affine=affine,
        bias=bias,
        schedule="constant",
        r_max=1.0,
        d_max=0.0,
        running_stats="bn",
        dtype=torch.float64,
    )
    rand_affine(bn, seed)
    brn.load_state_dict(bn.state_dict(), strict=True)
    for step in range(3):
        x = rand_input(shape, seed * 10 + step)
        g = rand_input(shape, seed * 10 + step + 5)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), brn(xb)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert_close(yb, ya)
        assert_close(xb.grad, xa.grad)
        for name in ("weight", "bias"):
            pa, pb = getattr(bn, name), getattr(brn, name)
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert_close(pb.grad, pa.grad)
        assert_close(brn.running_mean, bn.running_mean)
        assert_close(brn.running_var, bn.running_var)
        assert int(brn.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
        bn.zero_grad()
        brn.zero_grad()
    bn.eval()
    brn.eval()
    x = rand_input(shape, seed + 50)
    assert_close(brn(x), bn(x))


@pytest.mark.parametrize("brn_cls,bn_cls,shape", CASES)
def test_default_layer_is_batchnorm_during_warmup(brn_cls, bn_cls, shape):
    """Paper schedule: r_max = 1, d_max = 0 for the first 5k steps -> BatchNorm's training path."""
    bn = bn_cls(shape[1], dtype=torch.float64)
    brn = brn_cls(shape[1], dtype=torch.float64)
    brn.num_batches_tracked.fill_(4999)  # last warm-up step
    brn.running_mean.fill_(3.0)  # far from the batch: would give d != 0 without warm-up
    x = rand_input(shape, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), brn(xb)
    ya.sum().backward()
    yb.sum().backward()
    assert_close(yb, ya)
    assert_close(xb.grad, xa.grad, tol=1e-9)
    assert_close(brn.weight.grad, bn.weight.grad)


# ----------------------------------------------------------------------------------------------
# The renormalized forward and backward against the paper
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("brn_cls,bn_cls,shape", CASES)
@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1.1, 0.05)])
def test_forward_and_gradients_match_paper(brn_cls, bn_cls, shape, r_max, d_max, seed):
    channels = shape[1]
    brn = brn_cls(channels, schedule="constant", r_max=r_max, d_max=d_max, dtype=torch.float64)
    rand_affine(brn, seed)
    mean, var = make_stats(channels, seed)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    x = rand_input(shape, seed).requires_grad_()
    g = rand_input(shape, seed + 1)
    r, d = paper_correction(x, mean, var, r_max, d_max)
    assert (r != 1).any() and (d != 0).any()
    y_expected = paper_forward(x, mean, var, brn.weight.detach(), brn.bias.detach(), r_max, d_max)
    y = brn(x)
    (y * g).sum().backward()
    assert_close(y, y_expected)
    dx, dgamma, dbeta = paper_gradients(x.detach(), g, mean, var, brn.weight.detach(), r_max, d_max)
    assert_close(x.grad, dx)
    assert_close(brn.weight.grad, dgamma)
    assert_close(brn.bias.grad, dbeta)


def test_gradient_without_stop_gradient_differs():
    """A version with differentiable r and d normalizes by the running stats: a different gradient."""
    shape, r_max, d_max = (8, 3, 4, 4), 3.0, 5.0
    mean, var = make_stats(3, 0)
    x = rand_input(shape, 0)
    g = rand_input(shape, 1)
    gamma, beta = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    r, d = paper_correction(x, mean, var, r_max, d_max)
    # Unclipped r and d, so that without stop_gradient their gradients flow.
    assert ((r > 1 / r_max) & (r < r_max)).all() and (d.abs() < d_max).all()
    dx_paper, _, _ = paper_gradients(x, g, mean, var, gamma, r_max, d_max)

    xn = x.clone().requires_grad_()
    y = paper_forward(xn, mean, var, gamma, beta, r_max, d_max, stop_gradient=False)
    (y * g).sum().backward()
    assert (xn.grad - dx_paper).abs().max() > 1e-2

    brn = BatchRenorm2d(3, schedule="constant", r_max=r_max, d_max=d_max, dtype=torch.float64)
    with torch.no_grad():
        brn.weight.copy_(gamma)
        brn.bias.copy_(beta)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    xs = x.clone().requires_grad_()
    (brn(xs) * g).sum().backward()
    assert_close(xs.grad, dx_paper)
    assert (xs.grad - xn.grad).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("running_stats", ["std", "var", "bn"])
def test_fast_path_matches_reference_path(shape, running_stats):
    mean, var = make_stats(3, 1)
    gamma = torch.rand(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = rand_input(shape, 2)
    results = []
    for fn in (batch_renorm, batch_renorm_reference):
        rm, rv = mean.clone(), var.clone()
        x = rand_input(shape, 1).requires_grad_()
        gamma.grad = beta.grad = None
        y = fn(x, rm, rv, gamma, beta, True, 0.2, EPS, 2.0, 1.0, running_stats)
        (y * g).sum().backward()
        results.append((y, x.grad, gamma.grad, beta.grad, rm, rv))
    for fast, ref in zip(*results):
        assert_close(fast, ref)


@pytest.mark.parametrize("running_stats", ["std", "var", "bn"])
def test_running_statistics_updates(running_stats):
    momentum, shape = 0.3, (6, 3, 4)
    brn = BatchRenorm1d(
        3,
        momentum=momentum,
        schedule="constant",
        running_stats=running_stats,
        dtype=torch.float64,
    )
    mean, var = make_stats(3, 4)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    x = rand_input(shape, 4)
    brn(x)
    xr = rows(x)
    mu_b, var_b = xr.mean(0), xr.var(0, unbiased=False)
    m = xr.shape[0]
    assert_close(brn.running_mean, mean + momentum * (mu_b - mean))
    if running_stats == "std":  # the paper: sigma <- sigma + a (sigma_B - sigma)
        sigma, sigma_b = (var + EPS).sqrt(), (var_b + EPS).sqrt()
        expected = (sigma + momentum * (sigma_b - sigma)) ** 2 - EPS
    elif running_stats == "var":
        expected = var + momentum * (var_b - var)
    else:
        expected = var + momentum * (var_b * m / (m - 1) - var)
    assert_close(brn.running_var, expected)
    for buffer in (brn.running_mean, brn.running_var):
        assert not buffer.requires_grad and buffer.grad_fn is None


def test_cumulative_average_when_momentum_is_none():
    bn = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    brn = BatchRenorm2d(3, momentum=None, running_stats="bn", dtype=torch.float64)
    for step in range(4):
        x = rand_input((4, 3, 2, 2), step)
        bn(x)
        brn(x)
    assert_close(brn.running_mean, bn.running_mean)
    assert_close(brn.running_var, bn.running_var)


def test_buffers_never_carry_a_graph():
    brn = BatchRenorm2d(3, schedule="constant")
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    brn(x).sum().backward()
    for name, buffer in brn.named_buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None, name


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("brn_cls,bn_cls,shape", CASES)
def test_eval_is_batchnorm_eval(brn_cls, bn_cls, shape):
    bn = bn_cls(shape[1], dtype=torch.float64)
    rand_affine(bn, 0)
    mean, var = make_stats(shape[1], 0)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    brn = brn_cls(shape[1], dtype=torch.float64)
    brn.load_state_dict(bn.state_dict())
    bn.eval()
    brn.eval()
    x = rand_input(shape, 9)
    y = brn(x)
    assert_close(y, bn(x))
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    expected = unrows(gamma * (rows(x) - mean) / (var + EPS).sqrt() + beta, x)
    assert_close(y, expected)
    assert int(brn.num_batches_tracked) == 0  # eval does not advance the schedule


def test_fuse_conv_bn_eval_works():
    conv = nn.Conv2d(3, 4, 3, dtype=torch.float64).eval()
    brn = BatchRenorm2d(4, dtype=torch.float64).eval()
    rand_affine(brn, 1)
    mean, var = make_stats(4, 1)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, brn)
    x = rand_input((2, 3, 6, 6), 0)
    assert_close(fused(x), brn(conv(x)))


# ----------------------------------------------------------------------------------------------
# State dict compatibility with BatchNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("brn_cls,bn_cls,shape", CASES)
def test_state_dict_round_trips_with_batchnorm(brn_cls, bn_cls, shape):
    bn = bn_cls(shape[1])
    rand_affine(bn, 2)
    bn.train()
    for step in range(3):
        bn(rand_input(shape, step, torch.float32))
    brn = brn_cls(shape[1], schedule="external", r_max=2.0)
    assert list(brn.state_dict()) == list(bn.state_dict())
    brn.load_state_dict(bn.state_dict(), strict=True)
    for key, value in bn.state_dict().items():
        assert torch.equal(brn.state_dict()[key], value), key
    brn(rand_input(shape, 7, torch.float32))  # train a step, then back into a fresh BatchNorm
    back = bn_cls(shape[1])
    back.load_state_dict(brn.state_dict(), strict=True)
    for key, value in brn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 4
    assert brn.r_max == 2.0  # external limits are attributes, untouched by loading


def test_state_dict_without_num_batches_tracked_loads():
    """Checkpoints from before BatchNorm's version 2 have no num_batches_tracked."""
    bn = nn.BatchNorm2d(3)
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    brn = BatchRenorm2d(3)
    brn.num_batches_tracked.fill_(7)
    brn.load_state_dict(state, strict=True)
    assert int(brn.num_batches_tracked) == 0


def test_not_a_torch_batchnorm_so_torch_converters_leave_it_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchRenorm2d(4), nn.BatchNorm2d(4))
    assert not isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is BatchRenorm2d
    assert type(converted[2]) is nn.SyncBatchNorm


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------


def test_paper_schedule_values():
    assert renorm_limits_at(0) == (1.0, 0.0)
    assert renorm_limits_at(5000) == (1.0, 0.0)
    r, d = renorm_limits_at(25000)
    assert math.isclose(r, 1 + 2 * 20000 / 35000) and d == 5.0
    assert renorm_limits_at(40000) == (3.0, 5.0)
    assert renorm_limits_at(10**6) == (3.0, 5.0)
    r, d = renorm_limits_at(15000)
    assert math.isclose(r, 1 + 2 * 10000 / 35000) and math.isclose(d, 2.5)


def test_layer_schedule_follows_num_batches_tracked():
    brn = BatchRenorm2d(2)
    for step in (0, 4999, 5000, 12345, 25000, 40000, 70000):
        brn.num_batches_tracked.fill_(step)
        assert brn.current_limits() == renorm_limits_at(step)
        r_t, d_t = brn._limits_for_forward()  # the on-device version used by forward
        r, d = renorm_limits_at(step)
        assert math.isclose(float(r_t), r, abs_tol=1e-12) and math.isclose(
            float(d_t), d, abs_tol=1e-12
        )
    brn.num_batches_tracked.zero_()
    brn(torch.randn(4, 2, 3, 3))
    assert int(brn.num_batches_tracked) == 1
    brn.eval()
    brn(torch.randn(4, 2, 3, 3))
    assert int(brn.num_batches_tracked) == 1


def test_r_and_d_stay_within_the_scheduled_bounds_over_a_long_run():
    """Effective r, d recovered from the outputs never exceed the limits of their step."""
    schedule = dict(
        r_max=3.0, d_max=5.0, warmup_steps=20, r_max_ramp_steps=140, d_max_ramp_steps=80
    )
    brn = BatchRenorm1d(4, momentum=0.05, affine=False, dtype=torch.float64, **schedule)
    gen = torch.Generator().manual_seed(0)
    r_clipped = d_clipped = 0
    for step in range(400):
        r_lim, d_lim = renorm_limits_at(step, **schedule)
        assert brn.current_limits() == (r_lim, d_lim)
        # Batches whose statistics jump around, so the clipping is often active.
        loc = torch.randn(4, generator=gen, dtype=torch.float64) * 4
        scale = torch.exp(torch.randn(4, generator=gen, dtype=torch.float64) * 1.5)
        x = torch.randn(16, 4, generator=gen, dtype=torch.float64) * scale + loc
        r_exp, d_exp = paper_correction(
            x, brn.running_mean.clone(), brn.running_var.clone(), r_lim, d_lim
        )
        y = brn(x)
        x_hat = (x - x.mean(0)) / (x.var(0, unbiased=False) + EPS).sqrt()
        d = y.mean(0)
        r = ((y - d) * x_hat).sum(0) / (x_hat * x_hat).sum(0)
        assert_close(r, r_exp, tol=1e-9)
        assert_close(d, d_exp, tol=1e-9)
        assert ((r >= 1 / r_lim - 1e-9) & (r <= r_lim + 1e-9)).all(), step
        assert (d.abs() <= d_lim + 1e-9).all(), step
        at_r_bound = ((r - r_lim).abs() < 1e-9) | ((r - 1 / r_lim).abs() < 1e-9)
        r_clipped += int(r_lim > 1 and bool(at_r_bound.any()))
        d_clipped += int(d_lim > 0 and bool(((d.abs() - d_lim).abs() < 1e-9).any()))
    assert r_clipped > 10 and d_clipped > 10  # the bounds were actually exercised


def test_constant_and_external_schedules():
    const = BatchRenorm2d(2, schedule="constant", r_max=2.0, d_max=1.0)
    const.num_batches_tracked.fill_(10)
    assert const.current_limits() == (2.0, 1.0)
    with pytest.raises(ValueError, match="external"):
        const.set_limits(1.5, 0.5)

    model = nn.Sequential(
        BatchRenorm2d(2, schedule="external", r_max=1.0, d_max=0.0),
        nn.Sequential(BatchRenorm1d(2, schedule="external")),
    )
    assert set_renorm_limits(model, *renorm_limits_at(30000)) == 2
    assert model[0].current_limits() == renorm_limits_at(30000)
    assert model[1][0].current_limits() == renorm_limits_at(30000)
    model.append(const)
    with pytest.raises(ValueError, match="external"):
        set_renorm_limits(model, 1.0, 0.0)
    assert model[0].current_limits() == renorm_limits_at(30000)  # nothing changed


def test_external_limits_are_used_by_forward():
    brn = BatchRenorm1d(3, schedule="external", r_max=1.0, d_max=0.0, dtype=torch.float64)
    mean, var = make_stats(3, 5)
    brn.running_mean.copy_(mean)
    brn.running_var.copy_(var)
    brn.set_limits(2.0, 0.7)
    x = rand_input((10, 3), 5)
    gamma, beta = brn.weight.detach().clone(), brn.bias.detach().clone()
    expected = paper_forward(x, mean, var, gamma, beta, 2.0, 0.7)
    assert_close(brn(x), expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r_max": 0.5}, "r_max"),
        ({"d_max": -1.0}, "d_max"),
        ({"momentum": 1.5}, "momentum"),
        ({"eps": 0.0}, "eps"),
        ({"schedule": "cosine"}, "schedule"),
        ({"running_stats": "ema"}, "running_stats"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        BatchRenorm2d(3, **kwargs)


# ----------------------------------------------------------------------------------------------
# Shapes, layouts, dtypes, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "brn_cls,bn_cls,bad_shape",
    [
        (BatchRenorm1d, nn.BatchNorm1d, (2, 3, 4, 4)),
        (BatchRenorm2d, nn.BatchNorm2d, (2, 3, 4)),
        (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 4, 4)),
    ],
)
def test_wrong_input_dims_error_like_batchnorm(brn_cls, bn_cls, bad_shape):
    x = torch.randn(bad_shape)
    with pytest.raises(ValueError) as expected:
        bn_cls(3)(x)
    with pytest.raises(ValueError) as got:
        brn_cls(3)(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    "brn_cls,bn_cls,shape",
    [
        (BatchRenorm1d, nn.BatchNorm1d, (1, 3)),
        (BatchRenorm1d, nn.BatchNorm1d, (1, 3, 1)),
        (BatchRenorm2d, nn.BatchNorm2d, (1, 3, 1, 1)),
        (BatchRenorm3d, nn.BatchNorm3d, (1, 3, 1, 1, 1)),
    ],
)
def test_single_value_per_channel_errors_like_batchnorm(brn_cls, bn_cls, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as expected:
        bn_cls(3)(x)
    brn = brn_cls(3)
    with pytest.raises(ValueError) as got:
        brn(x)
    assert str(got.value) == str(expected.value)
    brn.eval()
    assert brn(x).shape == x.shape  # inference needs no batch statistics


def test_batch_of_one_with_spatial_extent_trains():
    x = rand_input((1, 3, 2, 2), 0)
    bn, brn = nn.BatchNorm2d(3, dtype=torch.float64), BatchRenorm2d(3, dtype=torch.float64)
    assert_close(brn(x), bn(x))


@pytest.mark.parametrize(
    "brn_cls,shape,fmt",
    [
        (BatchRenorm2d, (4, 6, 5, 3), torch.channels_last),
        (BatchRenorm3d, (3, 6, 2, 3, 4), torch.channels_last_3d),
    ],
)
def test_channels_last_is_kept_and_matches_contiguous(brn_cls, shape, fmt):
    ref = brn_cls(6, schedule="constant", r_max=2.0, d_max=1.0, dtype=torch.float64)
    rand_affine(ref, 3)
    mean, var = make_stats(6, 3)
    ref.running_mean.copy_(mean)
    ref.running_var.copy_(var)
    cl = copy.deepcopy(ref)
    x = rand_input(shape, 3)
    g = rand_input(shape, 4)
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=fmt).requires_grad_()
    ya, yb = ref(xa), cl(xb)
    (ya * g).sum().backward()
    (yb * g.to(memory_format=fmt)).sum().backward()
    assert yb.is_contiguous(memory_format=fmt)
    assert xb.grad.is_contiguous(memory_format=fmt)
    assert_close(yb, ya)
    assert_close(xb.grad, xa.grad)
    assert_close(cl.weight.grad, ref.weight.grad)
    cl.eval()
    assert cl(xb.detach()).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics_without_nan(dtype):
    ref = BatchRenorm2d(4, schedule="constant", r_max=3.0, d_max=5.0)
    low = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        # Large mean, small spread: statistics accumulated in half precision would be useless.
        x = (torch.randn(8, 4, 6, 6, generator=gen) * 2.0 + 300.0).to(dtype)
        xr = x.float().requires_grad_()  # the float32 layer sees the same rounded values
        xl = x.clone().requires_grad_()
        yr, yl = ref(xr), low(xl)
        yr.square().sum().backward()
        yl.float().square().sum().backward()
        assert yl.dtype == dtype and xl.grad.dtype == dtype
        assert torch.isfinite(yl).all() and torch.isfinite(xl.grad).all()
        assert torch.isfinite(low.weight.grad).all()
        # Output precision is the input dtype's (a few ulps of values of size ~5).
        assert (yl.float() - yr).abs().max() < 0.1
    assert low.running_mean.dtype == torch.float32 and low.running_var.dtype == torch.float32
    torch.testing.assert_close(low.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(low.weight.grad, ref.weight.grad, rtol=0.05, atol=0.5)


def test_bfloat16_autocast_with_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchRenorm2d(8, schedule="constant"))
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert model[1].running_var.dtype == torch.float32
    assert torch.isfinite(model[0].weight.grad).all()


def test_half_module_and_input():
    brn = BatchRenorm2d(3, schedule="constant").to(torch.bfloat16)
    x = (torch.randn(4, 3, 5, 5) * 2 + 10).to(torch.bfloat16).requires_grad_()
    y = brn(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and brn.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_double_backward_reference_path():
    """The fast path is first-order only; the reference path supports gradient penalties."""
    x = rand_input((6, 3), 0).requires_grad_()
    rm, rv = make_stats(3, 0)
    y = batch_renorm_reference(x, rm.clone(), rv.clone(), None, None, True, 0.1, EPS, 2.0, 1.0)
    (grad,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    grad.sum().backward()
    assert torch.isfinite(x.grad).all()
    y = batch_renorm(x, rm.clone(), rv.clone(), None, None, True, 0.1, EPS, 2.0, 1.0)
    (grad,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_eval_is_functional_batch_norm_with_running_stats():
    brn = BatchRenorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    assert_close(brn(x), F.batch_norm(x, brn.running_mean, brn.running_var, brn.weight, brn.bias))


def test_torch_compile_matches_eager():
    """fullgraph compile (AOT autograd) gives eager's outputs, gradients and buffers.

    Guards against torch's partitioner recomputing r, d in the backward from the running buffers
    after the forward updated them (wrong gradients from the second step on).
    """
    kwargs = dict(warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2, momentum=0.5)
    eager = BatchRenorm2d(3, dtype=torch.float64, **kwargs)
    compiled_layer = BatchRenorm2d(3, dtype=torch.float64, **kwargs)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for step in range(4):
        x = rand_input((4, 3, 5, 5), step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert_close(yb, ya)
        assert_close(xb.grad, xa.grad)
        assert_close(compiled_layer.weight.grad, eager.weight.grad)
        assert_close(compiled_layer.running_var, eager.running_var)
    assert int(compiled_layer.num_batches_tracked) == 4


@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (BatchRenorm1d, nn.BatchNorm1d, (0, 3)),
        (BatchRenorm2d, nn.BatchNorm2d, (0, 3, 4, 5)),
        (BatchRenorm3d, nn.BatchNorm3d, (0, 3, 2, 2, 2)),
    ],
)
def test_empty_batch_gives_an_empty_output_as_batchnorm(layer, bn, shape):
    """N = 0 (a rank's share of a short last batch): an empty output, no statistics change, and
    backward runs, as torch's BatchNorm."""
    torch.manual_seed(0)
    ours, ref = layer(3, schedule="constant"), bn(3)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        ours.load_state_dict(ref.state_dict())
    for m in (ours, ref):
        m.train()
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert y1.shape == y2.shape == torch.Size(shape) and y1.dtype == y2.dtype
    y1.sum().backward()
    y2.sum().backward()
    assert x1.grad.shape == x2.grad.shape
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)  # running stats untouched, num_batches_tracked counted alike
    assert torch.equal(ours.weight.grad, ref.weight.grad)
    assert torch.equal(ours.bias.grad, ref.bias.grad)
    for fn in (batch_renorm, batch_renorm_reference):
        mean, var = ours.running_mean.clone(), ours.running_var.clone()
        y = fn(x1.detach(), mean, var, ours.weight, ours.bias, True, 0.1, 1e-5, 3.0, 5.0)
        assert y.shape == torch.Size(shape)
        assert torch.equal(mean, ours.running_mean) and torch.equal(var, ours.running_var)
