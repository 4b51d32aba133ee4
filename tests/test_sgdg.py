"""Tests of normlab.optim.SGDG against an independent float64 transcription of Algorithm 1.

The generic optimizer tests (fast vs reference path, state_dict and resume, None grads,
schedulers, bad hyper-parameters, copies, closures) are table-driven in tests/test_optim_common.py.
"""

import pytest
import torch

from normlab.optim import SGDG, AdamG
from row_sphere_helpers import bn_model as _bn_model
from row_sphere_helpers import paper_groups, seed_groups
from row_sphere_helpers import random_grads as _grads
from row_sphere_helpers import row_norms as _row_norms
from row_sphere_helpers import train as _train

# an independent reference (the test extra installs it); skipped with the reason if absent
geoopt = pytest.importorskip("geoopt", reason="geoopt (test extra) is not installed")

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# independent reference: Cho & Lee 2017, Algorithm 1 (+ orthogonality gradient as in the PT code),
# written row by row from the paper's formulas with explicit unit directions (no normlab code)
# ----------------------------------------------------------------------------------------------


def paper_sgdg_step(W, grad, tau, *, lr, momentum, grad_clip=None, omega=0.0, nesterov=False):
    """One SGD-G step on a weight W (rows = points); returns (W_new, tau_new) in float64."""
    rows = W.shape[0] if W.dim() > 1 else 1
    Y = W.reshape(rows, -1).double().clone()
    Y = Y / Y.norm(dim=1, keepdim=True)  # re-normalized point
    G = grad.reshape(rows, -1).double().clone()
    if omega and rows <= Y.shape[1]:
        G = G + 2 * omega * (Y @ Y.T @ Y - Y)
    T = tau.reshape(rows, -1).double()
    Wn, Tn = torch.empty_like(Y), torch.empty_like(Y)
    for i in range(rows):
        y, g, t = Y[i], G[i], T[i]
        h = g - (y @ g) * y
        if grad_clip is not None and h.norm() > grad_clip:
            h = grad_clip * h / h.norm()
        m = momentum * t - lr * h
        d = momentum * m - lr * h if nesterov else m
        nd = d.norm()
        if nd == 0:
            Wn[i], Tn[i] = y, m
            continue
        u = d / nd
        Wn[i] = y * torch.cos(nd) + u * torch.sin(nd)
        # pt_y(m; d) = m - (u.m)(y sin|d| + u (1 - cos|d|))
        Tn[i] = m - (u @ m) * (y * torch.sin(nd) + u * (1 - torch.cos(nd)))
    return Wn.reshape(W.shape), Tn.reshape(W.shape)


def _unit_rows(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    rows = w.reshape(shape[0] if len(shape) > 1 else 1, -1)
    return (rows / rows.norm(dim=1, keepdim=True)).reshape(shape)


SHAPES = [(8, 3, 3, 3), (16, 8, 3, 3), (5, 7), (6,), (20, 4), (3, 2, 1, 1)]
VARIANTS = [
    dict(momentum=0.9),
    dict(momentum=0.0),
    dict(momentum=0.9, grad_clip=0.1),
    dict(momentum=0.9, omega=0.1),
    dict(momentum=0.9, omega=0.1, grad_clip=0.1),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.5, nesterov=True, omega=0.2, grad_clip=0.05),
]


def _make(shapes, seed, variant, foreach, lr=0.2):
    params = [torch.nn.Parameter(_unit_rows(s, seed + k)) for k, s in enumerate(shapes)]
    group = dict(params=params, lr=lr, grassmann=True, **variant)
    return params, SGDG([group], foreach=foreach)


# ----------------------------------------------------------------------------------------------
# the update rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.01, 3.7, 250.0])
@pytest.mark.parametrize("cls, lrs", [(SGDG, (0.2, 0.05)), (AdamG, (0.05, 0.01))])
def test_trajectory_invariant_to_prescaling_bn_fed_weights(cls, lrs, factor):
    base, scaled = _bn_model(0), _bn_model(0)
    with torch.no_grad():
        scaled[0].weight.mul_(factor)
    opt_a = cls(paper_groups(base, *lrs, omega=0.1, grad_clip=0.1))
    opt_b = cls(paper_groups(scaled, *lrs, omega=0.1, grad_clip=0.1))
    losses_a = _train(base, opt_a, 15)
    losses_b = _train(scaled, opt_b, 15)
    assert losses_a == pytest.approx(losses_b, abs=1e-10)
    for pa, pb in zip(base.parameters(), scaled.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-10)


def test_plain_sgd_is_not_invariant_to_prescaling():
    # the property above is not trivial: the same experiment with torch SGD diverges
    base, scaled = _bn_model(0), _bn_model(0)
    with torch.no_grad():
        scaled[0].weight.mul_(3.7)
    la = _train(base, torch.optim.SGD(base.parameters(), lr=0.2, momentum=0.9), 10)
    lb = _train(scaled, torch.optim.SGD(scaled.parameters(), lr=0.2, momentum=0.9), 10)
    assert abs(la[-1] - lb[-1]) > 1e-4


def test_euclidean_groups_equal_torch_sgd():
    a, b = _bn_model(1), _bn_model(1)
    opt_a = SGDG(a.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    _train(a, opt_a, 6)
    _train(b, opt_b, 6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls, lr_manifold", [(SGDG, 0.2), (AdamG, 0.05)])
def test_seed_parameter_groups_work_unchanged(cls, lr_manifold):
    """The seed's three dicts (manifold, BN/biases, rest) train, and the manifold rows stay unit."""
    model = _bn_model(2)
    opt = cls(seed_groups(model, lr_manifold))
    losses = _train(model, opt, 30)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(_row_norms(model[0].weight), torch.ones(5, dtype=F64))


def test_constructor_omega_is_honoured():
    def run(**kw):
        w = torch.nn.Parameter(_unit_rows((4, 9), 0))
        opt = SGDG([w], lr=0.1, momentum=0.9, grassmann=True, **kw)
        w.grad = torch.zeros_like(w)
        opt.step()
        return w.detach()

    no_ortho, ctor = run(), run(omega=0.5)
    assert not torch.allclose(no_ortho, ctor)
    w = torch.nn.Parameter(_unit_rows((4, 9), 0))
    opt = SGDG([dict(params=[w], omega=0.5)], lr=0.1, momentum=0.9, grassmann=True)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), ctor, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# state, schedulers, grads
# ----------------------------------------------------------------------------------------------


def test_lr_scheduler_composes_and_never_resets_state():
    shapes = [(4, 9), (3, 5)]
    pa, opt_a = _make(shapes, 0, dict(momentum=0.9, grad_clip=0.3), None, lr=0.2)
    pb, opt_b = _make(shapes, 0, dict(momentum=0.9, grad_clip=0.3), None, lr=0.2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt_a, milestones=[3, 6], gamma=0.2)
    lrs = []
    for step in range(9):
        lrs.append(opt_a.param_groups[0]["lr"])
        for a, b, g in zip(pa, pb, _grads(shapes, step)):
            a.grad, b.grad = g.clone(), g.clone()
        buf_before = opt_a.state[pa[0]]["momentum_buffer"].clone() if step else None
        opt_a.step()
        sched.step()
        opt_b.param_groups[0]["lr"] = 0.2 * 0.2 ** ((step >= 3) + (step >= 6))
        opt_b.step()
        if step in (3, 6):  # the momentum survived the LR drop: the buffer was not zeroed
            assert buf_before.abs().sum() > 0
    assert lrs == pytest.approx([0.2] * 3 + [0.04] * 3 + [0.008] * 3)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and it equals the paper's rule run with that LR sequence and a persistent momentum
    w = _unit_rows((4, 9), 0)
    tau = torch.zeros_like(w)
    for step, lr in enumerate(lrs):
        w, tau = paper_sgdg_step(
            w, _grads(shapes, step)[0], tau, lr=lr, momentum=0.9, grad_clip=0.3
        )
    torch.testing.assert_close(pa[0].detach(), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_zero_rows_stay_zero_without_nan(foreach, dtype):
    w = _unit_rows((4, 6), 0, dtype=dtype)
    w[2] = 0
    w = torch.nn.Parameter(w)
    opt = SGDG([w], lr=0.2, momentum=0.9, grassmann=True, grad_clip=0.1, omega=0.1, foreach=foreach)
    for _step in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert torch.isfinite(w).all()
    assert (w.detach()[2] == 0).all()
    assert torch.isfinite(opt.state[w]["momentum_buffer"]).all()


def test_low_precision_fast_path_equals_reference():
    shape = (8, 4, 3, 3)
    w0 = torch.randn(shape).to(torch.bfloat16)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = SGDG([a], lr=0.2, momentum=0.9, grassmann=True, grad_clip=0.1, foreach=False)
    opt_b = SGDG([b], lr=0.2, momentum=0.9, grassmann=True, grad_clip=0.1, foreach=True)
    for _step in range(5):
        g = torch.randn(shape).to(torch.bfloat16)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    # same float32 maths, rounded to bfloat16 once per step: equal up to one bf16 ulp
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("foreach", [False, True])
def test_channels_last_conv_weight(foreach):
    shape = (8, 4, 3, 3)
    w0 = _unit_rows(shape, 0)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
    ptr = b.data_ptr()
    kw = dict(lr=0.2, momentum=0.9, grassmann=True, grad_clip=0.1, omega=0.1, foreach=foreach)
    opt_a, opt_b = SGDG([a], **kw), SGDG([b], **kw)
    for step in range(5):
        g = _grads([shape], step)[0]
        a.grad = g.clone()
        b.grad = g.clone().to(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
    assert b.is_contiguous(memory_format=torch.channels_last) and b.data_ptr() == ptr
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a contiguous gradient for a channels_last weight also works
    b.grad = _grads([shape], 9)[0]
    opt_b.step()
    assert torch.isfinite(b).all()


def test_non_contiguous_parameter_view():
    base = _unit_rows((9, 4), 0).t().contiguous()  # (4, 9) storage
    w = torch.nn.Parameter(base.t())  # (9, 4) transposed view: rows are strided
    opt = SGDG([w], lr=0.2, momentum=0.9, grassmann=True)
    for _step in range(3):
        w.grad = torch.randn(9, 4, dtype=F64)
        opt.step()
    torch.testing.assert_close(_row_norms(w), torch.ones(9, dtype=F64))


# ----------------------------------------------------------------------------------------------
# a problem with a known answer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_converges_to_leading_eigenvector(foreach):
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64))
    eigvals = torch.linspace(1.0, 3.0, 20, dtype=F64)
    A = Q @ torch.diag(eigvals) @ Q.T
    x = torch.nn.Parameter(torch.randn(1, 20, generator=gen, dtype=F64))
    opt = SGDG([x], lr=0.05, momentum=0.9, grassmann=True, grad_clip=0.5, foreach=foreach)
    for _ in range(400):
        opt.zero_grad()
        loss = -(x @ A @ x.T).squeeze()  # maximize the Rayleigh quotient on the sphere
        loss.backward()
        opt.step()
    top = Q[:, -1]
    assert abs(x.detach()[0] @ top) > 1 - 1e-8
    assert -loss.item() == pytest.approx(3.0, abs=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_ortho_products_approximate_the_exact_term(foreach):
    # opt-in low-precision matrix products for the orthogonality term only
    shape = (16, 8, 3, 3)
    w0 = _unit_rows(shape, 0, dtype=torch.float32)
    g = 0.01 * _grads([shape], 1, dtype=torch.float32)[0]
    moved = {}
    for dtype in (None, torch.bfloat16):
        w = torch.nn.Parameter(w0.clone())
        opt = SGDG([w], lr=0.2, grassmann=True, omega=0.5, ortho_dtype=dtype, foreach=foreach)
        w.grad = g.clone()
        opt.step()
        moved[dtype] = w.detach() - w0
    err = (moved[torch.bfloat16] - moved[None]).norm() / moved[None].norm()
    assert 0 < err < 2e-2
