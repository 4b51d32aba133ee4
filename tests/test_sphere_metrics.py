"""Sphere metrics: pure functions against numpy float64, and SphereMetricsTracker against them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normlab.models.scale_invariant import MLPSI
from normlab.optim import SphereSGD
from normlab.sphere_metrics import (
    SphereMetricsTracker,
    cosine_to_init,
    distance_to_init,
    effective_gradient_norm,
    effective_learning_rate,
    predicted_step_angle,
    radial_cosine,
    scale_invariant_norm,
    step_angle,
    tensor_norms,
)

SHAPES = [(4, 3), (5, 2, 2), (6,)]


def _tensors(seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in ts])


def _unflatten(vector: np.ndarray) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(torch.from_numpy(vector[i : i + n].reshape(s).copy()))
        i += n
    return out


def test_effective_learning_rate():
    assert effective_learning_rate(0.1, 2.0) == pytest.approx(0.025)
    assert effective_learning_rate(0.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="Invalid norm"):
        effective_learning_rate(0.1, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norms_and_effective_gradient_norm(seed):
    w, g = _tensors(seed), _tensors(seed + 10)
    assert scale_invariant_norm(w) == pytest.approx(np.linalg.norm(_flat(w)), rel=1e-14)
    assert tensor_norms(w) == pytest.approx([np.linalg.norm(t.numpy()) for t in w], rel=1e-14)
    expected = np.linalg.norm(_flat(g)) * np.linalg.norm(_flat(w))
    assert effective_gradient_norm(g, w) == pytest.approx(expected, rel=1e-14)
    # a missing gradient counts as zero
    g_none = [g[0], None, g[2]]
    expected = np.linalg.norm(_flat([g[0], g[2]])) * np.linalg.norm(_flat(w))
    assert effective_gradient_norm(g_none, w) == pytest.approx(expected, rel=1e-14)


def test_radial_cosine():
    w, g = _tensors(0), _tensors(1)
    a, b = _flat(w), _flat(g)
    expected = (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert radial_cosine(g, w) == pytest.approx(expected, rel=1e-12)
    assert radial_cosine([torch.zeros(s, dtype=torch.float64) for s in SHAPES], w) == 0.0
    assert radial_cosine(w, w) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("theta", [1e-9, 1e-4, 0.3, math.pi / 2, 3.0, math.pi - 1e-6])
def test_step_angle_of_a_known_rotation(theta):
    gen = np.random.default_rng(0)
    n = sum(int(np.prod(s)) for s in SHAPES)
    u = gen.standard_normal(n)
    u /= np.linalg.norm(u)
    v = gen.standard_normal(n)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    a = 2.0 * u  # different norms: the angle must not depend on them
    b = 5.0 * (math.cos(theta) * u + math.sin(theta) * v)
    assert step_angle(_unflatten(a), _unflatten(b)) == pytest.approx(theta, rel=1e-7, abs=1e-15)
    assert cosine_to_init(_unflatten(b), _unflatten(a)) == pytest.approx(
        math.cos(theta), rel=1e-9, abs=1e-12
    )


def test_distance_to_init_and_errors():
    a, b = _tensors(0), _tensors(1)
    assert distance_to_init(b, a) == pytest.approx(np.linalg.norm(_flat(a) - _flat(b)), rel=1e-14)
    with pytest.raises(ValueError):
        step_angle(a, b[:2])
    with pytest.raises(ValueError, match="zero"):
        step_angle([torch.zeros(3)], [torch.ones(3)])


@pytest.mark.parametrize("elr", [1e-4, 1e-2, 0.5])
def test_predicted_angle_matches_a_sphere_sgd_step_on_an_si_model(elr):
    torch.manual_seed(0)
    model = MLPSI((12,), 5, width=16).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eps = 1e-30  # ~exact scale invariance (torch rejects 0), so the gradient is tangent
    si = model.scale_invariant_parameters()
    x, y = torch.randn(64, 12, dtype=torch.float64), torch.randint(0, 5, (64,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in si]
    assert abs(radial_cosine(grads, si)) < 1e-12
    before = [p.detach().clone() for p in si]
    SphereSGD(si, elr=elr).step()
    predicted = predicted_step_angle(elr, effective_gradient_norm(grads, before))
    assert step_angle(before, si) == pytest.approx(predicted, rel=1e-9)


def test_tracker_matches_the_pure_functions():
    params = [torch.nn.Parameter(t) for t in _tensors(0)]
    opt = SphereSGD(params, elr=0.02)
    tracker = SphereMetricsTracker()
    init = [p.detach().clone() for p in params]
    for epoch in range(2):
        angles, g_effs = [], []
        start = [p.detach().clone() for p in params]
        for step in range(5):
            gen = torch.Generator().manual_seed(10 * epoch + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            before = [p.detach().clone() for p in params]
            tracker.before_step(params)
            opt.step()
            tracker.after_step(params, [p.grad for p in params], elr=0.02)
            angles.append(step_angle(before, params))
            g_effs.append(effective_gradient_norm([p.grad for p in params], before))
        summary = tracker.epoch_summary()
        assert summary["steps"] == 5
        assert summary["step_angle"] == pytest.approx(np.mean(angles), rel=1e-9)
        assert summary["effective_grad_norm"] == pytest.approx(np.mean(g_effs), rel=1e-12)
        assert summary["elr"] == pytest.approx(0.02)
        assert summary["si_norm"] == pytest.approx(scale_invariant_norm(init), rel=1e-12)
        assert summary["epoch_angle"] == pytest.approx(step_angle(start, params), rel=1e-9)
        assert summary["cosine_to_init"] == pytest.approx(cosine_to_init(params, init), rel=1e-12)


def test_tracker_with_lr_computes_the_elr_and_leaves_params_alone():
    params = [torch.nn.Parameter(t) for t in _tensors(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    snapshot = [p.detach().clone() for p in params]
    tracker = SphereMetricsTracker()
    tracker.before_step(params)
    tracker.after_step(params, [p.grad for p in params], lr=0.1)
    for p, s in zip(params, snapshot):
        assert torch.equal(p.detach(), s)
        assert torch.equal(p.grad, torch.ones_like(p))
    summary = tracker.epoch_summary()
    assert summary["elr"] == pytest.approx(0.1 / scale_invariant_norm(params) ** 2, rel=1e-12)
    assert summary["step_angle"] == pytest.approx(0.0, abs=1e-12)
    empty = tracker.epoch_summary()
    assert empty["steps"] == 0 and math.isnan(empty["step_angle"])


def test_tracker_errors():
    params = _tensors(0)
    tracker = SphereMetricsTracker()
    with pytest.raises(RuntimeError, match="before_step"):
        tracker.after_step(params, params, lr=0.1)
    tracker.before_step(params)
    with pytest.raises(ValueError, match="exactly one"):
        tracker.after_step(params, params, lr=0.1, elr=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        tracker.after_step(params, params)
    with pytest.raises(ValueError, match="parameters"):
        tracker.after_step(params[:2], params[:2], lr=0.1)
    with pytest.raises(ValueError):
        SphereMetricsTracker().before_step([])
