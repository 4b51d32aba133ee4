"""Tests of normlab.optim.AdamG against an independent float64 transcription of Adam-G.

The generic optimizer tests (fast vs reference path, state_dict and resume, None grads,
schedulers, bad hyper-parameters, copies, closures) are table-driven in tests/test_optim_common.py.
"""

import math

import pytest
import torch

from normlab.optim import AdamG
from row_sphere_helpers import bn_model as _bn_model
from row_sphere_helpers import random_grads as _grads
from row_sphere_helpers import train as _train

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
