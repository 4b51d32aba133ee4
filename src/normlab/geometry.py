"""Geometry of unit spheres for scale-invariant weights, as pure functions.

Three ways of putting a weight on a sphere are covered:

* **Rows** (the product of unit spheres, the "oblique manifold"): a weight of shape
  ``(out, in, kh, kw)`` or ``(out, in)`` is viewed as a row matrix ``(out, n)`` with
  ``n = in*kh*kw`` (:func:`as_rows`); every row ``y_i`` is one point of S^{n-1}. Because
  ``BN(w^T x) = BN(u^T x)`` for ``u = w/|w|``, a row on the unit sphere represents one point of
  the Grassmann manifold G(1, n); once the representative has unit norm, G(1, n) and the sphere
  share metric, exponential map and parallel transport (Cho & Lee 2017). The row functions below
  act on the **last dimension**: pass ``as_rows(weight)`` (or any ``(..., n)`` tensor).
* **Whole tensors**: the ``tensor_*`` helpers flatten the tensor to a single row ``(1, numel)``,
  apply the row function and restore the shape.
* **One joint sphere over many tensors**: the ``joint_*`` helpers treat a list of tensors as one
  long vector (e.g. all scale-invariant weights of a network, for a global effective learning
  rate).

Notation, per row: ``x`` a point (|x| = 1 unless stated), ``v``, ``u`` tangent vectors
(<x, v> = 0), ``theta = |v|``. The formulas use the smooth functions ``sinc(t) = sin(t)/t`` and
``(1 - cos t)/t^2 = sinc(t/2)^2 / 2`` so that every map is exact and finite at ``v = 0``
(no ``v/|v|`` is ever formed).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603);
Absil, Mahony & Sepulchre, "Optimization Algorithms on Matrix Manifolds", 2008, ch. 3-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "compute_dtype",
    "tiny",
    "as_rows",
    "row_norms",
    "safe_normalize_rows",
    "project_tangent",
    "expmap",
    "transport",
    "transport_velocity",
    "clip_rows",
    "retract",
    "geodesic_distance",
    "angle_from_chord",
    "sinc",
    "tensor_norm",
    "tensor_normalize",
    "tensor_project_tangent",
    "tensor_expmap",
    "tensor_transport",
    "tensor_transport_velocity",
    "tensor_clip",
    "joint_norm",
    "joint_inner",
    "joint_angle",
    "joint_project_tangent",
    "joint_rescale_",
    "joint_expmap",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of sphere maths **and of optimizer state** for these tensors.

    The one rule of the package: float16/bfloat16 tensors are computed in (and their optimizer
    state kept in) float32; float32/float64 tensors in their own dtype (the widest of several).
    A bfloat16 row norm carries 3 significant digits and a bfloat16 momentum buffer loses the
    small contributions of each step, hence the upcast.
    """
    dtype = None
    for t in tensors:
        d = torch.float32 if t.dtype in LOW_PRECISION else t.dtype
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    return torch.float32 if dtype is None else dtype


def tiny(dtype: torch.dtype) -> float:
    """Smallest positive normal number of a floating dtype: the floor for norms.

    A dtype-aware floor instead of adding 1e-8 to the norm (the original code): 1e-8 underflows to
    0 in float16 (NaN on zero rows) and biases float64 results by 1e-8.
    """
    return torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0


def _tiny(x: Tensor) -> float:
    return tiny(x.dtype)


def sinc(t: Tensor) -> Tensor:
    """``sin(t)/t`` with ``sinc(0) = 1`` (unnormalized sinc; ``torch.sinc`` is ``sin(pi t)/(pi t)``)."""
    return torch.sinc(t / math.pi)


def _one_minus_cos_over_sq(t: Tensor) -> Tensor:
    """``(1 - cos t)/t^2 = sinc(t/2)^2 / 2``, equal to 1/2 at ``t = 0`` and free of cancellation."""
    s = sinc(0.5 * t)
    return 0.5 * s * s


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise inner product over the last dimension, kept as a trailing size-1 dimension."""
    return torch.linalg.vecdot(x, y, dim=-1).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# rows: product of unit spheres
# ----------------------------------------------------------------------------------------------


def as_rows(t: Tensor) -> Tensor:
    """Row matrix ``(out, n)`` of a weight: row ``i`` holds everything that output unit ``i`` reads.

    ``(out, in, kh, kw) -> (out, in*kh*kw)``, ``(out, in) -> (out, in)``, ``(n,) -> (1, n)``,
    ``() -> (1, 1)``. The result is a view when the memory layout allows it (contiguous tensors);
    otherwise (e.g. a ``channels_last`` conv weight) ``reshape`` returns a copy, so write back with
    ``t.copy_(rows.view_as(...))`` rather than relying on aliasing.
    """
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def row_norms(x: Tensor, keepdim: bool = True) -> Tensor:
    """Euclidean norm of every row (reduction over the last dimension): ``|x_i|``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim)


def safe_normalize_rows(x: Tensor, eps: float | None = None) -> Tensor:
    """Rows scaled to unit norm: ``x_i / max(|x_i|, eps)``.

    A zero row stays a **zero row** (finite, no NaN); a row whose norm is below ``eps`` comes out
    with norm ``|x_i|/eps < 1``. ``eps`` defaults to the smallest normal number of the dtype, so
    every row that is not (nearly) denormal is mapped exactly onto the sphere.
    """
    floor = _tiny(x) if eps is None else eps
    return x / row_norms(x).clamp_min(floor)


def project_tangent(x: Tensor, v: Tensor) -> Tensor:
    """Orthogonal projection of ``v`` onto the tangent space at the unit row ``x``.

    ``proj_x(v) = v - <x, v> x`` (per row). For ``v`` the Euclidean gradient this is the
    Riemannian gradient of the sphere (and of G(1, n) with a unit representative).
    """
    return v - _dot(x, v) * x


def expmap(x: Tensor, v: Tensor) -> Tensor:
    """Exponential map of the unit sphere, row-wise.

    ``exp_x(v) = cos(|v|) x + sin(|v|) v/|v| = cos(theta) x + sinc(theta) v``, theta = |v|.
    Moves ``x`` along the great circle with initial velocity ``v`` for unit time; ``exp_x(0) = x``.
    The result has unit rows when ``x`` is unit and ``v`` tangent.
    """
    theta = row_norms(v)
    return torch.cos(theta) * x + sinc(theta) * v


def retract(x: Tensor, v: Tensor) -> Tensor:
    """Projective retraction ``(x + v)/|x + v|`` (first-order approximation of :func:`expmap`)."""
    return safe_normalize_rows(x + v)


def transport(x: Tensor, v: Tensor, u: Tensor) -> Tensor:
    """Parallel transport of the tangent vector ``u`` along the geodesic ``t -> exp_x(t v)`` to t=1.

    Exact sphere formula (Edelman, Arias & Smith 1998; Cho & Lee 2017), w = v/|v|, theta = |v|:
    ``pt_x(u; v) = u - <w, u> (x sin(theta) + w (1 - cos(theta)))``
    ``          = u - <v, u> (sinc(theta) x + (1 - cos(theta))/theta^2 v)``.
    The component of ``u`` orthogonal to span(x, v) is unchanged; the in-plane part is rotated by
    theta. The result is tangent at ``exp_x(v)`` and has the norm of ``u``. ``v = 0`` returns ``u``.
    """
    theta = row_norms(v)
    vu = _dot(v, u)
    return u - vu * (sinc(theta) * x + _one_minus_cos_over_sq(theta) * v)


def transport_velocity(x: Tensor, v: Tensor) -> Tensor:
    """Parallel transport of ``v`` along its own geodesic: ``pt_x(v; v)``.

    ``pt_x(v; v) = |v| (w cos(theta) - x sin(theta)) = cos(theta) v - theta sin(theta) x``
    (the velocity of the geodesic at t = 1); norm preserved, tangent at ``exp_x(v)``.
    """
    theta = row_norms(v)
    return torch.cos(theta) * v - (theta * torch.sin(theta)) * x


def clip_rows(v: Tensor, max_norm: float | Tensor | None) -> Tensor:
    """Per-row norm clipping: ``v_i <- v_i * min(1, max_norm/|v_i|)``.

    Clipping is per weight vector (per row), not a global norm. ``max_norm=None`` returns ``v``.
    Computed as ``max_norm / max(|v_i|, max_norm)``: no mask, no NaN for zero rows, any dtype.
    The paper clips the tangent gradient because the exponential map is 2*pi-periodic: an
    unclipped large step could wrap around the sphere.
    """
    if max_norm is None:
        return v
    if not isinstance(max_norm, Tensor) and not max_norm > 0:
        raise ValueError(f"Invalid max_norm: {max_norm}")
    scale = max_norm / row_norms(v).clamp_min(max_norm)
    return v * scale


def angle_from_chord(chord: Tensor | float, sum_norm: Tensor | float | None = None):
    """Angle between two unit vectors from their chord ``|x - y|`` (and ``|x + y|``).

    The package's one formula for angles: ``2 atan2(|x - y|, |x + y|)``, accurate for nearly equal
    and nearly opposite vectors (``arccos`` of the cosine loses half the digits near 0). Without
    ``sum_norm`` the parallelogram law ``|x + y|^2 = 4 - |x - y|^2`` (exact for unit vectors) gives
    it, which is accurate except near pi. Tensors in, tensors out; floats in, a float out.
    """
    if not isinstance(chord, Tensor):
        c = float(chord)
        s = math.sqrt(max(0.0, 4.0 - c * c)) if sum_norm is None else float(sum_norm)
        return 2.0 * math.atan2(c, s)
    if sum_norm is None:
        sum_norm = (4.0 - chord.square()).clamp_min(0.0).sqrt()
    return 2.0 * torch.atan2(chord, sum_norm)


def geodesic_distance(x: Tensor, y: Tensor) -> Tensor:
    """Great-circle distance (angle) between unit rows ``x`` and ``y``: :func:`angle_from_chord`.

    Returns shape ``(..., 1)``.
    """
    return angle_from_chord(row_norms(x - y), row_norms(x + y))


# ----------------------------------------------------------------------------------------------
# whole tensors: one sphere per tensor
# ----------------------------------------------------------------------------------------------


def _whole(fn, *tensors: Tensor) -> Tensor:
    shape = tensors[-1].shape
    return fn(*(t.reshape(1, -1) for t in tensors)).reshape(shape)


def tensor_norm(t: Tensor) -> Tensor:
    """Frobenius norm of the whole tensor (0-d)."""
    return torch.linalg.vector_norm(t)


def tensor_normalize(t: Tensor, eps: float | None = None) -> Tensor:
    """``t / max(|t|, eps)`` for the whole tensor (zero tensor stays zero)."""
    return _whole(lambda r: safe_normalize_rows(r, eps), t)


def tensor_project_tangent(x: Tensor, v: Tensor) -> Tensor:
    """``v - <x, v> x`` with the inner product over all entries (``|x| = 1``)."""
    return _whole(project_tangent, x, v)


def tensor_expmap(x: Tensor, v: Tensor) -> Tensor:
    """:func:`expmap` on the sphere of unit-Frobenius-norm tensors of ``x``'s shape."""
    return _whole(expmap, x, v)


def tensor_transport(x: Tensor, v: Tensor, u: Tensor) -> Tensor:
    """:func:`transport` on the sphere of unit-Frobenius-norm tensors."""
    return _whole(transport, x, v, u)


def tensor_transport_velocity(x: Tensor, v: Tensor) -> Tensor:
    """:func:`transport_velocity` on the sphere of unit-Frobenius-norm tensors."""
    return _whole(transport_velocity, x, v)


def tensor_clip(v: Tensor, max_norm: float | Tensor | None) -> Tensor:
    """Clip the Frobenius norm of the whole tensor at ``max_norm``."""
    return _whole(lambda r: clip_rows(r, max_norm), v)


# ----------------------------------------------------------------------------------------------
# one joint sphere over a list of tensors
# ----------------------------------------------------------------------------------------------


def _check_pairs(xs: list[Tensor], vs: list[Tensor]) -> None:
    if len(xs) != len(vs) or not xs:
        raise ValueError(f"Invalid lists: {len(xs)} points and {len(vs)} vectors")
    for x, v in zip(xs, vs):
        if x.shape != v.shape:
            raise ValueError(f"Invalid lists: shape mismatch {tuple(x.shape)} vs {tuple(v.shape)}")


def joint_norm(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Norm of the concatenation of all tensors: ``sqrt(sum_k |t_k|^2)`` (0-d tensor).

    One fused norm per tensor (``torch._foreach_norm``), no concatenation. ``dtype`` is the
    accumulation dtype (default: :func:`compute_dtype`, so float16/bfloat16 accumulate in
    float32); the result is on the first tensor's device.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("Invalid tensors: empty list")
    dtype = compute_dtype(*tensors) if dtype is None else dtype
    same = all(t.dtype == dtype for t in tensors)
    if same and len({t.device for t in tensors}) == 1:
        norms = torch._foreach_norm(tensors)
    else:
        norms = [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]
    device = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def joint_inner(
    xs: Sequence[Tensor], vs: Sequence[Tensor], dtype: torch.dtype | None = None
) -> Tensor:
    """Inner product of the concatenated vectors: ``sum_k <x_k, v_k>`` (0-d tensor).

    Accumulated in ``dtype`` (default: :func:`compute_dtype` of all tensors).
    """
    xs, vs = list(xs), list(vs)
    _check_pairs(xs, vs)
    dtype = compute_dtype(*xs, *vs) if dtype is None else dtype
    device = xs[0].device
    parts = [
        torch.linalg.vecdot(x.reshape(-1).to(dtype), v.reshape(-1).to(dtype), dim=0).to(device)
        for x, v in zip(xs, vs)
    ]
    return torch.stack(parts).sum()


def joint_angle(xs: Sequence[Tensor], ys: Sequence[Tensor], dtype: torch.dtype | None = None):
    """Angle (radians, in [0, pi]) between the joint points ``x`` and ``y`` of any radii.

    ``x/|x|`` and ``y/|y|`` compared by :func:`angle_from_chord` (0-d tensor, in ``dtype``).
    """
    xs, ys = list(xs), list(ys)
    _check_pairs(xs, ys)
    dtype = compute_dtype(*xs, *ys) if dtype is None else dtype
    nx, ny = joint_norm(xs, dtype), joint_norm(ys, dtype)
    if not (bool(nx > 0) and bool(ny > 0)):
        raise ValueError("Invalid points: the angle of a zero point is undefined")
    a = [x.to(dtype) / nx for x in xs]
    b = [y.to(dtype).to(nx.device) / ny for y in ys]
    diff = joint_norm([u - v.to(u.device) for u, v in zip(a, b)], dtype)
    total = joint_norm([u + v.to(u.device) for u, v in zip(a, b)], dtype)
    return angle_from_chord(diff, total)


def joint_project_tangent(xs: Sequence[Tensor], vs: Sequence[Tensor]) -> list[Tensor]:
    """Remove from the joint vector ``v`` its component along the joint point ``x``.

    ``v - (<x, v>/|x|^2) x`` for a point of **any** radius |x| > 0 (the tangent space of the
    sphere of radius |x| through x). A zero point leaves ``v`` unchanged. Returns new tensors.
    """
    xs, vs = list(xs), list(vs)
    coef = joint_inner(xs, vs) / joint_inner(xs, xs).clamp_min(_tiny(xs[0]))
    return [v - coef * x for x, v in zip(xs, vs)]


def joint_rescale_(tensors: Sequence[Tensor], target_norm: float | Tensor) -> list[Tensor]:
    """Scale all tensors in place by one factor so that their joint norm becomes ``target_norm``.

    A list whose joint norm is zero is left unchanged. Returns the (same) tensors.
    """
    tensors = list(tensors)
    norm = joint_norm(tensors)
    scale = torch.where(norm > 0, target_norm / norm.clamp_min(_tiny(norm)), 1.0)
    torch._foreach_mul_(tensors, scale.to(tensors[0].dtype))
    return tensors


def joint_expmap(xs: Sequence[Tensor], vs: Sequence[Tensor]) -> list[Tensor]:
    """Exponential map on the joint sphere of radius ``R = |x|`` through the joint point ``x``.

    ``exp_x(v) = cos(|v|/R) x + R sin(|v|/R) v/|v| = cos(phi) x + sinc(phi) v``, phi = |v|/R,
    for ``v`` tangent (<x, v> = 0); the result keeps radius R. Returns new tensors.
    """
    xs, vs = list(xs), list(vs)
    radius = joint_norm(xs).clamp_min(_tiny(xs[0]))
    phi = joint_norm(vs) / radius
    c, s = torch.cos(phi), sinc(phi)
    return [c * x + s * v for x, v in zip(xs, vs)]
