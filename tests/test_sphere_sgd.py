"""SphereSGD: sphere invariants, hand-written float64 references, geometry of a step, groups.

The generic optimizer tests (fast vs reference path, state_dict and resume, None grads,
schedulers, bad hyper-parameters, copies, closures) are table-driven in tests/test_optim_common.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from normlab.optim import SphereSGD

GRANULARITIES = ("global", "tensor", "row")
SHAPES = [(4, 3), (5, 2, 2), (6,), (3, 2, 1, 2)]


def _params(seed: int, dtype=torch.float64, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _set_grads(params, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _rows_np(t: np.ndarray, granularity: str) -> np.ndarray:
    if granularity == "tensor" or t.ndim <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _spheres_np(arrays: list[np.ndarray], granularity: str) -> list[np.ndarray]:
    """Every sphere as one flat vector (global: all tensors; else tensors or rows)."""
    if granularity == "global":
        return [np.concatenate([a.ravel() for a in arrays])]
    return [row for a in arrays for row in _rows_np(a, granularity)]


def _norms(params, granularity: str) -> np.ndarray:
    arrays = [p.detach().double().numpy() for p in params]
    return np.array([np.linalg.norm(v) for v in _spheres_np(arrays, granularity)])


def _si_loss(params: list[torch.Tensor], seed: int = 7) -> torch.Tensor:
    """A loss that is scale-invariant in every row of every tensor (hence per tensor and jointly).

    ``sum_r softplus(<a_r, x_r / |x_r|>) + (<b_r, x_r / |x_r|>)^2`` over the rows of the (out, -1)
    views, with fixed random ``a_r``, ``b_r``.
    """
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for p in params:
        rows = p.reshape(p.shape[0], -1) if p.dim() > 1 else p.reshape(1, -1)
        unit = rows / rows.norm(dim=1, keepdim=True)
        a = torch.randn(rows.shape, generator=gen, dtype=p.dtype)
        b = torch.randn(rows.shape, generator=gen, dtype=p.dtype)
        total = total + torch.nn.functional.softplus((a * unit).sum(1)).sum()
        total = total + ((b * unit).sum(1) ** 2).sum()
    return total


# ------------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~10 s on one loaded core: 10,000 optimizer steps
def test_norm_stays_at_initial_value_for_10000_steps_float32():
    """One optimizer, three groups: global (momentum), tensor (plain), row (momentum, projection)."""
    groups = [
        {"params": _params(0, torch.float32), "granularity": "global", "momentum": 0.9},
        {"params": _params(1, torch.float32), "granularity": "tensor"},
        {
            # two tensors only: the row path loops over tensors, the slow part of this test
            "params": _params(2, torch.float32, shapes=[(5, 2, 2), (3, 2, 1, 2)]),
            "granularity": "row",
            "momentum": 0.5,
            "project_gradient": True,
        },
    ]
    start = [_norms(g["params"], g["granularity"]) for g in groups]
    opt = SphereSGD(groups, elr=0.05)
    gen = torch.Generator().manual_seed(1)
    params = [p for g in groups for p in g["params"]]
    grads = [torch.randn((100,) + p.shape, generator=gen) for p in params]
    for step in range(10_000):
        for p, g in zip(params, grads):
            p.grad = g[step % 100]
        opt.step()
    for group, norms in zip(groups, start):
        np.testing.assert_allclose(_norms(group["params"], group["granularity"]), norms, rtol=1e-6)
        assert all(torch.isfinite(p).all() for p in group["params"])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_keeps_the_radius_to_its_precision(granularity, foreach):
    """Radii, factors and step sizes stay in float32: no 0.4 % bfloat16 rounding of the radius."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in [(40, 30)]]
    start = _norms(params, granularity)
    opt = SphereSGD(params, elr=0.01, momentum=0.9, granularity=granularity, foreach=foreach)
    for _ in range(50):
        params[0].grad = torch.randn(params[0].shape, generator=gen).bfloat16()
        opt.step()
    np.testing.assert_allclose(_norms(params, granularity), start, rtol=1.5e-3)
    radius = opt.state[params[0]]["radius"]
    assert radius.dtype == torch.float32
    np.testing.assert_allclose(radius.reshape(-1).numpy(), start, rtol=1e-6)
    # torch's load_state_dict casts state to the parameter dtype; the radius must survive it
    other = SphereSGD(params, elr=0.01, momentum=0.9, granularity=granularity)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(other.state[params[0]]["radius"], radius)
    # the momentum too is float32 state (geometry.compute_dtype, as SGD-G/Adam-G), and survives
    buf = opt.state[params[0]]["momentum_buffer"]
    assert buf.dtype == torch.float32
    assert torch.equal(other.state[params[0]]["momentum_buffer"], buf)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_radius_option_puts_every_sphere_on_that_radius(granularity):
    params = _params(2)
    _set_grads(params, 3)
    SphereSGD(params, elr=0.01, granularity=granularity, radius=2.5).step()
    np.testing.assert_allclose(_norms(params, granularity), 2.5, rtol=1e-12)


def test_elr_zero_leaves_the_point_unchanged():
    params = _params(4)
    before = [p.detach().clone() for p in params]
    _set_grads(params, 5)
    SphereSGD(params, elr=0.0).step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# one step against hand-written float64 formulas (numpy, independent of normlab.geometry)
# ------------------------------------------------------------------------------------------------


def _expected_steps(w0, grads_per_step, *, elr, momentum, project, granularity):
    """The update of the module docstring, per sphere, in numpy float64."""
    spheres = _spheres_np(w0, granularity)
    rho = [np.linalg.norm(x) for x in spheres]
    buf = [np.zeros_like(x) for x in spheres]
    for grads in grads_per_step:
        gs = _spheres_np(grads, granularity)
        new = []
        for k, (x, g) in enumerate(zip(spheres, gs)):
            r2 = rho[k] ** 2
            d = g - (x @ g) / r2 * x if project else g
            if momentum > 0:
                v = momentum * buf[k] + g
                buf[k] = v - (x @ v) / r2 * x
                d = buf[k]
            u = x - elr * r2 * d
            new.append(rho[k] * u / np.linalg.norm(u))
        spheres = new
    return np.concatenate([s.ravel() for s in spheres]) if granularity != "global" else spheres[0]


def _flat(params, granularity) -> np.ndarray:
    arrays = [p.detach().numpy() for p in params]
    return np.concatenate([s.ravel() for s in _spheres_np(arrays, granularity)])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("momentum,project", [(0.0, False), (0.0, True), (0.8, False)])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_steps_match_hand_written_formula(granularity, momentum, project, foreach, seed):
    params = _params(seed)
    w0 = [p.detach().numpy().copy() for p in params]
    opt = SphereSGD(
        params,
        elr=0.03,
        momentum=momentum,
        granularity=granularity,
        project_gradient=project,
        foreach=foreach,
    )
    grads_per_step = []
    for step in range(3):
        _set_grads(params, 100 * seed + step)
        grads_per_step.append([p.grad.numpy().copy() for p in params])
        opt.step()
    expected = _expected_steps(
        w0, grads_per_step, elr=0.03, momentum=momentum, project=project, granularity=granularity
    )
    np.testing.assert_allclose(_flat(params, granularity), expected, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# geometry of a step
# ------------------------------------------------------------------------------------------------


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return 2.0 * math.atan2(np.linalg.norm(a - b), np.linalg.norm(a + b))


@pytest.mark.parametrize("elr", [1e-4, 1e-2, 0.3, 3.0])
def test_step_angle_satisfies_tan_theta_equals_elr_times_effective_grad_norm(elr):
    for seed in range(3):
        params = _params(seed)
        w = _flat(params, "global")
        _set_grads(params, seed + 50)
        # make the gradient tangent, as for an SI loss: g <- g - <w, g>/|w|^2 w
        g = np.concatenate([p.grad.numpy().ravel() for p in params])
        coef = (w @ g) / (w @ w)
        for p in params:
            p.grad -= coef * p.detach()
        g = np.concatenate([p.grad.numpy().ravel() for p in params])
        SphereSGD(params, elr=elr).step()
        theta = _angle(w, _flat(params, "global"))
        g_eff = np.linalg.norm(g) * np.linalg.norm(w)
        assert math.tan(theta) == pytest.approx(elr * g_eff, rel=1e-10)


def test_si_loss_trajectory_does_not_depend_on_the_radius():
    """lr = ELR rho^2 makes the unit-sphere trajectory independent of rho (exactly SI loss)."""
    runs = []
    for radius in (1.0, 7.0):
        params = _params(3)
        opt = SphereSGD(params, elr=0.002, radius=radius)
        for _ in range(20):
            opt.zero_grad()
            _si_loss(params).backward()
            opt.step()
        w = _flat(params, "global")
        runs.append(w / np.linalg.norm(w))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_si_loss_decreases_and_gradient_is_tangent(granularity):
    params = _params(5)
    opt = SphereSGD(params, elr=0.01, granularity=granularity)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = _si_loss(params)
        loss.backward()
        w = _flat(params, "global")
        g = np.concatenate([p.grad.numpy().ravel() for p in params])
        assert abs(w @ g) <= 1e-10 * np.linalg.norm(w) * np.linalg.norm(g)
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0] - 0.1


# ------------------------------------------------------------------------------------------------
# param groups, schedulers, state
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_non_si_group_is_torch_sgd(foreach, momentum):
    ours, theirs = _params(0), _params(0)
    si = _params(1)
    opt = SphereSGD(
        [
            {"params": si},
            {"params": ours, "scale_invariant": False, "lr": 0.1, "weight_decay": 5e-4},
        ],
        elr=1e-2,
        momentum=momentum,
        foreach=foreach,
    )
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=5e-4)
    for step in range(4):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        _set_grads(si, step + 10)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_frozen_group_with_lr_zero_does_not_move():
    head = _params(0, shapes=[(3, 4), (3,)])
    before = [p.detach().clone() for p in head]
    si = _params(1)
    opt = SphereSGD(
        [{"params": si}, {"params": head, "scale_invariant": False, "lr": 0.0}], elr=0.1
    )
    for step in range(3):
        _set_grads(head, step)
        _set_grads(si, step)
        opt.step()
    for p, b in zip(head, before):
        assert torch.equal(p.detach(), b)
    assert not opt.state[head[0]]


def test_lr_scheduler_schedules_the_elr():
    params = _params(0)
    opt = SphereSGD(params, elr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(params, 0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # the next step uses the scheduled ELR: check with a tangent gradient and the tan relation
    w = _flat(params, "global")
    _set_grads(params, 1)
    g = np.concatenate([p.grad.numpy().ravel() for p in params])
    coef = (w @ g) / (w @ w)
    for p in params:
        p.grad -= coef * p.detach()
    g_eff = np.linalg.norm(g - coef * w) * np.linalg.norm(w)
    opt.step()
    assert opt.param_groups[0]["elr"] == pytest.approx(0.05)
    assert math.tan(_angle(w, _flat(params, "global"))) == pytest.approx(0.05 * g_eff, rel=1e-10)


def test_setting_elr_directly_is_used():
    params = _params(0)
    opt = SphereSGD(params, elr=0.1)
    opt.param_groups[0]["elr"] = 0.0
    before = _flat(params, "global")
    _set_grads(params, 0)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.0
    np.testing.assert_allclose(_flat(params, "global"), before, rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_bad_groups_raise():
    with pytest.raises(ValueError, match="Invalid lr"):
        SphereSGD([{"params": _params(0), "scale_invariant": False}], elr=0.1)
    with pytest.raises(ValueError, match="Invalid lr"):
        SphereSGD([{"params": _params(0), "scale_invariant": False, "lr": -1.0}], elr=0.1)
    with pytest.raises(ValueError, match="alias"):
        SphereSGD([{"params": _params(0), "elr": 0.1, "lr": 0.2}])
    with pytest.raises(ValueError, match="Invalid scale_invariant"):
        SphereSGD([{"params": _params(0), "scale_invariant": "no"}], elr=0.1)
    # "lr" alone in an SI group is the ELR
    opt = SphereSGD([{"params": _params(0), "lr": 0.3}])
    assert opt.param_groups[0]["elr"] == 0.3


def test_zero_point_and_mixed_dtypes_raise():
    zero = [torch.nn.Parameter(torch.zeros(3, 2))]
    zero[0].grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="zero"):
        SphereSGD(zero, elr=0.1).step()
    rows = [torch.nn.Parameter(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))]
    rows[0].grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="zero row"):
        SphereSGD(rows, elr=0.1, granularity="row").step()
    mixed = _params(0, shapes=[(2, 2)]) + _params(1, torch.float32, shapes=[(3,)])
    _set_grads(mixed, 0)
    with pytest.raises(ValueError, match="foreach=True"):
        SphereSGD(mixed, elr=0.1, foreach=True).step()
    SphereSGD(mixed, elr=0.1).step()  # None picks the reference path
