"""Tests of normlab.geometry: invariants over seeds and shapes, geoopt where it coincides."""

import math

import pytest
import torch

from normlab import geometry as geo

# an independent reference (the test extra installs it); skipped with the reason if absent
geoopt = pytest.importorskip("geoopt", reason="geoopt (test extra) is not installed")

SEEDS = [0, 1, 2]
SHAPES = [(1, 2), (3, 5), (7, 27), (16, 144)]
F64 = torch.float64


def _point_and_tangents(seed, shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = geo.safe_normalize_rows(torch.randn(shape, generator=g, dtype=F64))
    v = geo.project_tangent(x, scale * torch.randn(shape, generator=g, dtype=F64))
    u = geo.project_tangent(x, torch.randn(shape, generator=g, dtype=F64))
    return x, v, u


def _rowdot(a, b):
    return (a * b).sum(-1)


# ----------------------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------------------


def test_as_rows_shapes_and_view():
    w = torch.randn(8, 3, 3, 3)
    rows = geo.as_rows(w)
    assert rows.shape == (8, 27)
    assert rows.data_ptr() == w.data_ptr()  # a view for contiguous weights
    assert geo.as_rows(torch.randn(5, 4)).shape == (5, 4)
    assert geo.as_rows(torch.randn(6)).shape == (1, 6)
    assert geo.as_rows(torch.tensor(2.0)).shape == (1, 1)
    cl = w.to(memory_format=torch.channels_last)
    torch.testing.assert_close(geo.as_rows(cl), rows)  # same logical rows (a copy)


def test_row_norms_keepdim():
    x = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(geo.row_norms(x), x.norm(dim=1, keepdim=True))
    assert geo.row_norms(x, keepdim=False).shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_safe_normalize_zero_row_is_finite(dtype):
    x = torch.randn(3, 5).to(dtype)
    x[1] = 0
    y = geo.safe_normalize_rows(x)
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all()
    norms = geo.row_norms(y.double()).squeeze(1)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    assert abs(norms[0] - 1) < tol and abs(norms[2] - 1) < tol


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_project_tangent_is_orthogonal_idempotent_and_matches_geoopt(seed, shape):
    x, _, _ = _point_and_tangents(seed, shape)
    g = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed + 10))
    h = geo.project_tangent(x, g)
    assert _rowdot(h, x).abs().max() < 1e-12
    torch.testing.assert_close(geo.project_tangent(x, h), h, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, geoopt.Sphere().proju(x, g), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# exponential map and transport
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1e-9, 0.1, 1.0, 4.0])
def test_expmap_lands_on_sphere_and_matches_geoopt(seed, shape, scale):
    x, v, _ = _point_and_tangents(seed, shape, scale)
    y = geo.expmap(x, v)
    assert (geo.row_norms(y) - 1).abs().max() < 1e-12
    torch.testing.assert_close(y, geoopt.SphereExact().expmap(x, v), rtol=0, atol=1e-12)
    # the textbook form with an explicit unit direction
    theta = v.norm(dim=1, keepdim=True)
    textbook = torch.cos(theta) * x + torch.sin(theta) * v / theta
    torch.testing.assert_close(y, textbook, rtol=0, atol=1e-12)


def test_expmap_of_zero_is_identity():
    x, _, _ = _point_and_tangents(0, (4, 9))
    torch.testing.assert_close(geo.expmap(x, torch.zeros_like(x)), x, rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_geodesic_distance_equals_velocity_norm(seed):
    x, v, _ = _point_and_tangents(seed, (6, 10), scale=0.3)
    v = geo.clip_rows(v, 3.0)  # below pi: the geodesic is minimizing
    d = geo.geodesic_distance(x, geo.expmap(x, v))
    torch.testing.assert_close(d, geo.row_norms(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1e-9, 0.2, 2.0])
def test_transport_keeps_vectors_tangent_and_norms(seed, shape, scale):
    x, v, u = _point_and_tangents(seed, shape, scale)
    y = geo.expmap(x, v)
    w = geo.transport(x, v, u)
    assert _rowdot(w, y).abs().max() < 1e-12
    torch.testing.assert_close(geo.row_norms(w), geo.row_norms(u), rtol=0, atol=1e-12)
    # isometry: inner products between two transported vectors are preserved
    w2 = geo.transport(x, v, v)
    torch.testing.assert_close(_rowdot(w, w2), _rowdot(u, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_transport_matches_textbook_formula_and_velocity_form(seed):
    x, v, u = _point_and_tangents(seed, (5, 8), scale=0.7)
    theta = v.norm(dim=1, keepdim=True)
    dirn = v / theta
    textbook = u - _rowdot(dirn, u).unsqueeze(1) * (
        x * torch.sin(theta) + dirn * (1 - torch.cos(theta))
    )
    torch.testing.assert_close(geo.transport(x, v, u), textbook, rtol=0, atol=1e-12)
    velocity = theta * (dirn * torch.cos(theta) - x * torch.sin(theta))
    torch.testing.assert_close(geo.transport_velocity(x, v), velocity, rtol=0, atol=1e-12)
    torch.testing.assert_close(geo.transport(x, v, v), velocity, rtol=0, atol=1e-12)


def test_transport_back_along_the_same_geodesic_is_the_identity():
    x, v, u = _point_and_tangents(3, (4, 7), scale=0.8)
    y = geo.expmap(x, v)
    w = geo.transport(x, v, u)
    back_velocity = -geo.transport_velocity(x, v)  # at y, pointing back to x
    torch.testing.assert_close(geo.expmap(y, back_velocity), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(geo.transport(y, back_velocity, w), u, rtol=0, atol=1e-12)


def test_transport_along_zero_velocity_is_identity():
    x, _, u = _point_and_tangents(1, (3, 4))
    torch.testing.assert_close(geo.transport(x, torch.zeros_like(x), u), u, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# clipping
# ----------------------------------------------------------------------------------------------


def test_clip_rows_per_row():
    v = torch.tensor([[3.0, 4.0], [0.03, 0.04], [0.0, 0.0]], dtype=F64)
    c = geo.clip_rows(v, 1.0)
    torch.testing.assert_close(c[0], torch.tensor([0.6, 0.8], dtype=F64))
    torch.testing.assert_close(c[1], v[1])  # under the threshold: unchanged
    assert (c[2] == 0).all()
    assert geo.clip_rows(v, None) is v
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="Invalid max_norm"):
            geo.clip_rows(v, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_clip_rows_low_precision(dtype):
    v = torch.randn(4, 9).to(dtype) * 10
    c = geo.clip_rows(v, 0.1)
    assert c.dtype == dtype and torch.isfinite(c).all()
    assert (geo.row_norms(c.float()) <= 0.1 * 1.01).all()


# ----------------------------------------------------------------------------------------------
# whole tensors and the joint sphere
# ----------------------------------------------------------------------------------------------


def test_tensor_helpers_use_one_sphere_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = geo.tensor_normalize(torch.randn(4, 3, 2, 2, generator=g, dtype=F64))
    assert abs(geo.tensor_norm(x) - 1) < 1e-12
    v = geo.tensor_project_tangent(x, torch.randn(4, 3, 2, 2, generator=g, dtype=F64))
    assert abs((x * v).sum()) < 1e-12
    y = geo.tensor_expmap(x, v)
    assert y.shape == x.shape and abs(geo.tensor_norm(y) - 1) < 1e-12
    w = geo.tensor_transport_velocity(x, v)
    assert abs((w * y).sum()) < 1e-12 and abs(geo.tensor_norm(w) - geo.tensor_norm(v)) < 1e-12
    u = geo.tensor_project_tangent(x, torch.randn(4, 3, 2, 2, generator=g, dtype=F64))
    assert abs((geo.tensor_transport(x, v, u) * y).sum()) < 1e-12
    assert abs(geo.tensor_norm(geo.tensor_clip(v * 100, 0.5)) - 0.5) < 1e-12
    assert (geo.tensor_normalize(torch.zeros(3, 2)) == 0).all()


def _joint_case(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (5,), (2, 7)]
    xs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    vs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    return xs, vs


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("seed", SEEDS)
def test_joint_norm_inner_and_projection(seed):
    xs, vs = _joint_case(seed)
    torch.testing.assert_close(geo.joint_norm(xs), _flat(xs).norm())
    torch.testing.assert_close(geo.joint_inner(xs, vs), _flat(xs) @ _flat(vs))
    hs = geo.joint_project_tangent(xs, vs)  # point of radius != 1
    assert [h.shape for h in hs] == [v.shape for v in vs]
    assert abs(geo.joint_inner(xs, hs)) < 1e-12
    flat = _flat(vs) - (_flat(xs) @ _flat(vs)) / (_flat(xs) @ _flat(xs)) * _flat(xs)
    torch.testing.assert_close(_flat(hs), flat)


@pytest.mark.parametrize("seed", SEEDS)
def test_joint_rescale_and_expmap(seed):
    xs, vs = _joint_case(seed)
    before = [x.clone() for x in xs]
    out = geo.joint_rescale_(xs, 3.0)
    assert out[0] is xs[0]
    torch.testing.assert_close(geo.joint_norm(xs), torch.tensor(3.0, dtype=F64))
    ratio = xs[0].reshape(-1)[0] / before[0].reshape(-1)[0]
    for x, b in zip(xs, before):  # one common factor
        torch.testing.assert_close(x, b * ratio)
    hs = geo.joint_project_tangent(xs, vs)
    ys = geo.joint_expmap(xs, hs)
    torch.testing.assert_close(geo.joint_norm(ys), torch.tensor(3.0, dtype=F64))
    zeros = [torch.zeros(3), torch.zeros(2, 2)]
    geo.joint_rescale_(zeros, 1.0)
    assert all((z == 0).all() for z in zeros)


def test_joint_input_errors():
    with pytest.raises(ValueError):
        geo.joint_norm([])
    with pytest.raises(ValueError):
        geo.joint_inner([torch.ones(2)], [])


def test_sinc_is_smooth_at_zero():
    t = torch.tensor([0.0, 1e-20, 1e-4, 1.0], dtype=F64)
    expected = torch.tensor([1.0, 1.0, math.sin(1e-4) / 1e-4, math.sin(1.0)], dtype=F64)
    torch.testing.assert_close(geo.sinc(t), expected, rtol=0, atol=1e-15)
