"""Tests of normlab.optim.AdamG against an independent float64 transcription of Adam-G.

The generic optimizer tests (fast vs reference path, state_dict and resume, None grads,
schedulers, bad hyper-parameters, copies, closures) are table-driven in tests/test_optim_common.py.
"""

import math

import pytest
import torch

from normlab.optim import AdamG

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# independent reference (Cho & Lee 2017, Adam-G as in the authors' code), row by row
# ----------------------------------------------------------------------------------------------


def paper_adamg_step(
    W, grad, m, v, t, *, lr, betas=(0.9, 0.99), eps=1e-8, grad_clip=None, omega=0.0
):
    """One Adam-G step at step count t (1-based); returns (W_new, m_new, v_new)."""
    beta1, beta2 = betas
    rows = W.shape[0] if W.dim() > 1 else 1
    Y = W.reshape(rows, -1).double().clone()
    Y = Y / Y.norm(dim=1, keepdim=True)
    G = grad.reshape(rows, -1).double().clone()
    if omega and rows <= Y.shape[1]:
        G = G + 2 * omega * (Y @ Y.T @ Y - Y)
    M = m.reshape(rows, -1).double()
    Wn, Mn, Vn = torch.empty_like(Y), torch.empty_like(Y), v.double().clone()
    alpha = math.sqrt(1 - beta2**t) / (1 - beta1**t)
    for i in range(rows):
        y, g = Y[i], G[i]
        h = g - (y @ g) * y
        if grad_clip is not None and h.norm() > grad_clip:
            h = grad_clip * h / h.norm()
        mi = beta1 * M[i] + (1 - beta1) * h
        Vn[i] = beta2 * v[i] + (1 - beta2) * (h @ h)
        delta = -lr * alpha * mi / torch.sqrt(Vn[i] + eps)
        nd = delta.norm()
        if nd == 0:
            Wn[i], Mn[i] = y, mi
            continue
        u = delta / nd
        Wn[i] = y * torch.cos(nd) + u * torch.sin(nd)
        Mn[i] = mi - (u @ mi) * (y * torch.sin(nd) + u * (1 - torch.cos(nd)))
    return Wn.reshape(W.shape), Mn.reshape(W.shape), Vn


def _unit_rows(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    rows = w.reshape(shape[0] if len(shape) > 1 else 1, -1)
    return (rows / rows.norm(dim=1, keepdim=True)).reshape(shape)


def _row_norms(p):
    return p.detach().reshape(p.shape[0] if p.dim() > 1 else 1, -1).double().norm(dim=1)


def _grads(shapes, seed, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=dtype) for s in shapes]


SHAPES = [(8, 3, 3, 3), (16, 8, 3, 3), (5, 7), (6,), (20, 4)]
VARIANTS = [
    dict(),
    dict(grad_clip=0.1),
    dict(omega=0.1),
    dict(omega=0.1, grad_clip=0.1),
    dict(betas=(0.5, 0.9), eps=1e-4, grad_clip=0.3),
]


def _make(shapes, seed, variant, foreach, lr=0.05):
    params = [torch.nn.Parameter(_unit_rows(s, seed + k)) for k, s in enumerate(shapes)]
    return params, AdamG([dict(params=params, lr=lr, grassmann=True, **variant)], foreach=foreach)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_paper_equations(variant, foreach):
    params, opt = _make(SHAPES, 0, variant, foreach)
    W = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(w) for w in W]
    vs = [torch.zeros(w.shape[0] if w.dim() > 1 else 1, 1, dtype=F64) for w in W]
    for step in range(1, 6):
        grads = _grads(SHAPES, 100 + step, scale=0.3)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for k, g in enumerate(grads):
            W[k], ms[k], vs[k] = paper_adamg_step(W[k], g, ms[k], vs[k], step, lr=0.05, **variant)
    for k, p in enumerate(params):
        st = opt.state[p]
        torch.testing.assert_close(p.detach(), W[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(st["exp_avg"], ms[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(st["exp_avg_sq"], vs[k], rtol=0, atol=1e-14)
        assert st["exp_avg_sq"].shape == (W[k].shape[0] if W[k].dim() > 1 else 1, 1)  # per row
        assert st["step"].item() == 5


def test_direction_is_not_reweighted_per_coordinate():
    # first step, one row: the move is exactly along -h (Adam would rescale coordinates)
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64))
    opt = AdamG([w], lr=0.01, grassmann=True)
    w.grad = torch.tensor([[5.0, 1e-3, -2.0, 0.0]], dtype=F64)
    opt.step()
    move = w.detach()[0, 1:]
    h = torch.tensor([1e-3, -2.0, 0.0], dtype=F64)
    torch.testing.assert_close(move / move.norm(), -h / h.norm())
    # step length: lr * sqrt(1-b2)/(1-b1) * (1-b1)|h| / sqrt((1-b2)|h|^2 + eps) ~= lr
    assert math.asin(move.norm().item()) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.slow
def test_rows_stay_on_sphere_for_10000_steps():
    params = [torch.nn.Parameter(_unit_rows((5, 2, 2, 2), 0, dtype=torch.float32))]
    opt = AdamG([dict(params=params, lr=0.2, omega=0.1, grad_clip=0.5, grassmann=True)])
    grads = torch.randn(10_000, 5, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    p = params[0]
    for t in range(10_000):
        p.grad = grads[t]
        opt.step()
    assert (_row_norms(p) - 1).abs().max() < 1e-6
    m = opt.state[p]["exp_avg"].reshape(5, -1).double()
    y = p.detach().reshape(5, -1).double()
    assert ((m * y).sum(1).abs() / m.norm(dim=1)).max() < 1e-5  # first moment stays tangent


# ----------------------------------------------------------------------------------------------
# Euclidean groups, state, schedulers
# ----------------------------------------------------------------------------------------------


def _bn_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).double()


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=F64)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _paper_groups(model, **manifold):
    lin1, bn, _, lin2 = model
    return [
        dict(params=[lin1.weight], lr=0.05, momentum=0.9, grassmann=True, **manifold),
        dict(
            params=[bn.weight, bn.bias, lin1.bias, lin2.bias],
            lr=0.01,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.0,
        ),
        dict(params=[lin2.weight], lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ]


def test_euclidean_groups_equal_torch_sgd_and_adam():
    a, b = _bn_model(1), _bn_model(1)
    _train(a, AdamG(a.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), 6)
    _train(
        b,
        torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        6,
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)
    a, b = _bn_model(1), _bn_model(1)
    _train(
        a, AdamG(a.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=5e-4, euclidean="adam"), 6
    )
    _train(b, torch.optim.Adam(b.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=5e-4), 6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)


def test_seed_parameter_groups_work_unchanged():
    model = _bn_model(2)
    lin1, bn, _, lin2 = model
    dict_g = {
        "params": [lin1.weight],
        "lr": 0.05,
        "momentum": 0.9,
        "grassmann": True,
        "omega": 0.1,
        "grad_clip": 0.1,
    }
    dict_e0 = {
        "params": [bn.weight, bn.bias, lin1.bias, lin2.bias],
        "lr": 0.01,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": 0.0,
        "nesterov": True,
    }
    dict_e1 = {
        "params": [lin2.weight],
        "lr": 0.01,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": 5e-4,
        "nesterov": True,
    }
    opt = AdamG([dict_g, dict_e0, dict_e1])
    losses = _train(model, opt, 30)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(_row_norms(lin1.weight), torch.ones(5, dtype=F64))


def test_trajectory_invariant_to_prescaling_bn_fed_weights():
    base, scaled = _bn_model(0), _bn_model(0)
    with torch.no_grad():
        scaled[0].weight.mul_(42.0)
    la = _train(base, AdamG(_paper_groups(base, omega=0.1, grad_clip=0.1)), 10)
    lb = _train(scaled, AdamG(_paper_groups(scaled, omega=0.1, grad_clip=0.1)), 10)
    assert la == pytest.approx(lb, abs=1e-10)


def test_lr_scheduler_keeps_moments_and_step_count():
    shapes = [(4, 9)]
    pa, opt_a = _make(shapes, 0, dict(grad_clip=0.3), None)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    W, m, v = pa[0].detach().clone(), torch.zeros(4, 9, dtype=F64), torch.zeros(4, 1, dtype=F64)
    for step in range(1, 8):
        lr = opt_a.param_groups[0]["lr"]
        g = _grads(shapes, step)[0]
        pa[0].grad = g.clone()
        opt_a.step()
        sched.step()
        W, m, v = paper_adamg_step(W, g, m, v, step, lr=lr, grad_clip=0.3)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    torch.testing.assert_close(pa[0].detach(), W, rtol=0, atol=1e-12)
    assert opt_a.state[pa[0]]["step"].item() == 7


def test_none_grads_get_their_own_step_count():
    a = torch.nn.Parameter(_unit_rows((3, 4), 0))
    b = torch.nn.Parameter(_unit_rows((2, 5), 1))
    opt = AdamG([a, b], lr=0.05, grassmann=True, grad_clip=0.1)
    W, m, v = b.detach().clone(), torch.zeros(2, 5, dtype=F64), torch.zeros(2, 1, dtype=F64)
    t_b = 0
    for step in range(6):
        a.grad = torch.randn(3, 4, dtype=F64)
        b.grad = None if step % 2 else torch.randn(2, 5, dtype=F64)
        if b.grad is not None:
            t_b += 1
            W, m, v = paper_adamg_step(W, b.grad, m, v, t_b, lr=0.05, grad_clip=0.1)
        opt.step()
    assert opt.state[a]["step"].item() == 6 and opt.state[b]["step"].item() == 3
    torch.testing.assert_close(b.detach(), W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grads_and_zero_rows_are_safe(foreach):
    w = _unit_rows((4, 6), 0)
    w[1] = 0
    w = torch.nn.Parameter(w)
    opt = AdamG([w], lr=0.05, grassmann=True, omega=0.1, foreach=foreach)
    w.grad = torch.zeros_like(w)
    opt.step()
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.isfinite(w).all() and (w.detach()[1] == 0).all()
    assert torch.isfinite(opt.state[w]["exp_avg"]).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_channels_last_conv_weight(foreach):
    shape = (8, 4, 3, 3)
    w0 = _unit_rows(shape, 0)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
    kw = dict(lr=0.05, grassmann=True, grad_clip=0.1, omega=0.1, foreach=foreach)
    opt_a, opt_b = AdamG([a], **kw), AdamG([b], **kw)
    for step in range(5):
        g = _grads([shape], step)[0]
        a.grad = g.clone()
        b.grad = g.clone().to(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_converges_to_leading_eigenvector(foreach):
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(1.0, 3.0, 20, dtype=F64)) @ Q.T
    x = torch.nn.Parameter(torch.randn(20, generator=gen, dtype=F64))  # a 1-D weight: one row
    opt = AdamG([x], lr=0.05, grassmann=True, foreach=foreach)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.3)
    for _ in range(500):
        opt.zero_grad()
        loss = -(x @ A @ x)
        loss.backward()
        opt.step()
        sched.step()
    # Adam's normalized step hovers at a distance ~lr from the optimum: the decayed LR brings it in
    assert abs(x.detach() @ Q[:, -1]) > 1 - 1e-5
    assert -loss.item() == pytest.approx(3.0, abs=1e-5)
