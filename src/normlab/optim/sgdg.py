"""SGD-G: SGD with momentum on G(1, n), one unit sphere per output unit (Cho & Lee 2017).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603),
Algorithm 1; the authors' PyTorch and TensorFlow code (see /work/shared/notes/riemannian_bn.md).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import required

from .. import geometry as geo
from . import _row_sphere as rs
from . import _rows

__all__ = ["SGDG", "sgdg"]


class SGDG(rs.RowSphereOptimizer):
    _name = "SGDG"

    r"""SGD-G: Riemannian SGD with momentum for weights that feed a batch normalization.

    Parameter groups with ``grassmann=True`` hold weights whose rows (``(out, in, kh, kw)`` viewed
    as ``(out, in*kh*kw)``; see :func:`normlab.geometry.as_rows`) are points of G(1, n),
    represented by unit vectors. Each step is Algorithm 1 of the paper, per row ``i``:

    .. code-block:: text

        y   = p / |p|                                  re-normalized point
        g   = grad + 2 omega (Y Y^T Y - Y)_i           orthogonality term (if omega > 0 and out <= n)
        h   = g - <y, g> y                             Riemannian gradient (tangent projection)
        h   = h * min(1, grad_clip / |h|)              per-row norm clipping
        m   = momentum * tau - lr * h                  momentum = lr-scaled displacement
        d   = m                   (nesterov: d = momentum * m - lr * h)
        p   <- exp_y(d) = cos|d| y + sin|d| d/|d|      exponential map
        tau <- pt_y(m; d)                              parallel transport (= pt_y(d; d) by default)

    ``tau`` starts at zero. The momentum buffer holds a displacement (already multiplied by the
    learning rate), so an LR change through a scheduler affects only new gradient contributions
    and never resets or rescales the state. Nesterov for manifold groups is an extension (the
    paper has none); it defaults to False.

    Groups with ``grassmann=False`` get ``torch.optim.SGD`` (momentum, ``dampening``, Nesterov, L2
    weight decay; run by torch's functional ``torch.optim.sgd.sgd``), as the paper's code.

    Rates: ``lr`` is the Euclidean learning rate; ``lr_manifold`` (group key ``lr_manifold`` or
    the paper's ``lrg``) the manifold one, the default of every ``grassmann=True`` group that sets
    no rate of its own. Inside a group both are stored in ``"lr"`` (what LR schedulers scale), so
    the authors' dicts (``{"params": ..., "lr": lrg, "grassmann": True}``) work unchanged.
    Group keys of the authors' code are honoured (``dampening`` in Euclidean groups) or refused
    with a ValueError (``dampening`` in a manifold group); an unknown key is a ValueError that
    lists the valid ones.

    Behaviour that differs from the authors' code, on purpose:

    * rows of manifold parameters are scaled to unit norm **when the optimizer is built** (and by
      :meth:`add_param_group`); the original relied on the training script;
    * ``omega`` and every other constructor argument is honoured (the original hard-coded 0);
    * ``weight_decay`` has no effect on manifold groups: its gradient ``wd * y`` is radial and the
      tangent projection removes it exactly;
    * the orthogonality term is added to an internal copy of the gradient, never to ``p.grad``;
      it is applied only to tensors with ``out <= n`` (where ``Y Y^T = I`` is attainable);
    * state lives on the parameter's device, in its dtype (float32 for float16/bfloat16 params,
      whose manifold maths is done in float32); ``channels_last`` weights work in place;
    * a zero row (e.g. a pruned filter) stays zero instead of turning into NaN.

    Memory: one momentum buffer per manifold tensor (float32 for low-precision params); the fast
    path also keeps one scratch buffer the size of the largest manifold tensor and, with
    ``omega > 0``, a gradient-sized buffer per manifold tensor (reused across steps).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: Euclidean learning rate (required unless every group sets it; also the manifold
            rate when ``lr_manifold`` is not given).
        momentum: momentum factor gamma in [0, 1).
        nesterov: Nesterov momentum (Euclidean groups: torch semantics; manifold groups: above).
        weight_decay: L2 penalty for Euclidean groups (ignored on the sphere, see above).
        grassmann: True for a group of BN-fed weights optimized on G(1, n).
        omega: orthogonality regularization factor (the loss gains (omega/2)||Y Y^T - I||^2 per
            manifold tensor; the term is added inside the optimizer, not to the reported loss).
        grad_clip: per-row threshold nu on the tangent gradient norm; None disables clipping.
        lr_manifold: learning rate of manifold groups without their own (the paper's ``lrg``).
        dampening: dampening of the Euclidean momentum (torch semantics; 0 in manifold groups).
        ortho_dtype: None (default: exact, in the parameter's compute dtype) or a dtype such as
            ``torch.bfloat16`` for the two matrix products of the orthogonality term. Opt-in speed
            for CPUs/GPUs with bf16 matrix units (those products are 4 out^2 n flops per tensor and
            dominate the step); the term's relative error becomes ~1e-2.
        foreach: None or True use the fast path (rows of equal treatment batched, fused row
            reductions, updates as per-row linear combinations); False uses the readable
            single-tensor reference implementation.
        fused: True runs each manifold group's whole step as one compiled graph
            (``torch.compile`` of :func:`sgdg_fused_step`, writing the new points and momenta
            into the parameters and state in place), Euclidean groups with torch's own fused
            SGD kernels. Opt-in: compiling costs seconds to a minute once per group (see
            :attr:`fused_compiles`, :attr:`fused_compile_seconds`); where compiling is impossible
            it warns once and runs the eager fast path. The state is the same as eager.

    Example::

        opt = SGDG([{"params": bn_fed, "grassmann": True, "omega": 0.1, "grad_clip": 0.1},
                    {"params": others, "weight_decay": 5e-4, "nesterov": True}],
                   lr=0.01, lr_manifold=0.2, momentum=0.9)
    """

    def __init__(
        self,
        params,
        lr: float = required,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grassmann: bool = False,
        omega: float = 0.0,
        grad_clip: float | None = None,
        *,
        lr_manifold: float | None = None,
        dampening: float = 0.0,
        ortho_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            grassmann=grassmann,
            omega=omega,
            grad_clip=grad_clip,
            ortho_dtype=ortho_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults, lr_manifold=lr_manifold)

    def _manifold_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        sgdg(
            params,
            grads,
            [self._state_buffer(p, "momentum_buffer") for p in params],
            lr=_rows.as_float(group["lr"]),
            momentum=_rows.as_float(group["momentum"]),
            nesterov=group["nesterov"],
            omega=_rows.as_float(group["omega"]),
            grad_clip=group["grad_clip"],
            ortho_dtype=group["ortho_dtype"],
            foreach=group["foreach"],
            scratch=self._scratch,
        )

    def _fused_function(self):
        return sgdg_fused_step

    def _run_fused(self, index: int, group: dict, params: list[Tensor], grads: list[Tensor]):
        bufs = [self._fused_state(p, "momentum_buffer") for p in params]
        tangent_key, omega, grad_clip = self._fused_tangent_args(group, params)
        rows = [_rows.num_rows(p) for p in params]
        points, bufs = rs.graph_rows(params, rows), rs.graph_rows(bufs, rows)
        return self._fused_step(
            (index, group["nesterov"], *tangent_key),
            (points, bufs),
            points,
            grads,  # read only: the graph reshapes them (only stores need the row views)
            bufs,
            self._scalar("lr", group["lr"], params),
            self._scalar("momentum", group["momentum"], params),
            omega,
            grad_clip,
            nesterov=group["nesterov"],
            ortho=tangent_key[1],
            ortho_dtype=group["ortho_dtype"],
        )


def sgdg_fused_step(
    params, grads, momentum_buffers, lr, momentum, omega, grad_clip, *, nesterov, ortho, ortho_dtype
):
    """The SGD-G step as a **pure** function (new tensors out): what ``fused=True`` compiles.

    The maths of :func:`_single_tensor_sgdg` in coefficient form on the rows ``(P, G, T)`` of
    point, gradient and momentum (see :func:`normlab.optim._row_sphere.fused_tangent`): with
    ``h = c (G - yg rinv P)``, the new momentum is ``m = gamma T + aG G + aP P`` (``aG = -lr c``,
    ``aP = lr c yg rinv``), the step ``d = m`` (Nesterov: ``gamma m + aG G + aP P``), and
    ``exp_y(d) = cos|d| rinv P + sinc|d| d``, ``pt_y(m; d) = m - <d, m> (sinc|d| rinv P + q d)``
    with ``q = (1 - cos|d|)/|d|^2``; ``|d|`` and ``<d, m>`` are quadratic forms in the Gram matrix
    of ``(P, G, T)``. Hyper-parameters are 0-d tensors; ``ortho[i]``: tensor ``i`` gets the
    orthogonality term; ``grad_clip=None``: no clipping.
    """
    new_params, new_bufs = [], []
    for p, grad, buf, use_ortho in zip(params, grads, momentum_buffers, ortho):
        P, G = rs.fused_rows(p, grad)
        T = buf.reshape(P.shape)
        t = rs.fused_tangent(
            P,
            G,
            [T],
            omega=omega,
            grad_clip=grad_clip,
            use_ortho=use_ortho,
            ortho_dtype=ortho_dtype,
        )
        a_g = -lr * t.c
        a_p = lr * t.c * t.yg * t.rinv
        m = (a_p, a_g, momentum)  # coefficients on (P, G, T)
        d = (momentum * a_p + a_p, momentum * a_g + a_g, momentum * momentum) if nesterov else m
        theta = rs.quad(t.gram, d, d).clamp_min(0.0).sqrt()
        cos, sinc = torch.cos(theta), geo.sinc(theta)
        p_new = (cos * t.rinv + sinc * d[0], sinc * d[1], sinc * d[2])
        if nesterov:
            dm = rs.quad(t.gram, d, m)
            q = 0.5 * geo.sinc(0.5 * theta).square()
            k_p, k_d = dm * sinc * t.rinv, dm * q
            tau_new = (m[0] - k_p - k_d * d[0], m[1] - k_d * d[1], m[2] - k_d * d[2])
        else:  # pt_y(m; m) = cos|m| m - |m| sin|m| y
            tau_new = (cos * m[0] - theta * torch.sin(theta) * t.rinv, cos * m[1], cos * m[2])
        rows = [P, t.G, T]
        new_params.append(rs.combine(p_new, rows).reshape(p.shape).to(p.dtype))
        new_bufs.append(rs.combine(tau_new, rows).reshape(buf.shape))
    return new_params, new_bufs


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------


def sgdg(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool = False,
    omega: float = 0.0,
    grad_clip: float | None = None,
    ortho_dtype: torch.dtype | None = None,
    foreach: bool | None = None,
    scratch: _rows.ScratchPool | None = None,
) -> None:
    """Functional SGD-G step on manifold tensors (see :class:`SGDG`); updates in place.

    ``momentum_buffers[i]`` has ``params[i]``'s shape, device and compute dtype. ``foreach=False``
    runs the single-tensor reference; anything else the fast path.
    """
    kwargs = dict(
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        omega=omega,
        grad_clip=grad_clip,
        ortho_dtype=ortho_dtype,
    )
    if foreach is False:
        _single_tensor_sgdg(params, grads, momentum_buffers, **kwargs)
    else:
        _multi_tensor_sgdg(
            params, grads, momentum_buffers, scratch=scratch or _rows.ScratchPool(), **kwargs
        )


def _single_tensor_sgdg(
    params, grads, momentum_buffers, *, lr, momentum, nesterov, omega, grad_clip, ortho_dtype
):
    """Reference: Algorithm 1 written with :mod:`normlab.geometry`, one tensor at a time."""
    for p, grad, buf in zip(params, grads, momentum_buffers):
        Y, h = rs.reference_tangent(
            p, grad, omega=omega, grad_clip=grad_clip, ortho_dtype=ortho_dtype
        )
        tau = buf.reshape(Y.shape)
        m = momentum * tau - lr * h
        d = momentum * m - lr * h if nesterov else m
        P_new = geo.expmap(Y, d)
        tau_new = geo.transport(Y, d, m) if nesterov else geo.transport_velocity(Y, d)
        p.copy_(P_new.reshape(p.shape))
        buf.copy_(tau_new.reshape(buf.shape))


def _multi_tensor_sgdg(
    params,
    grads,
    momentum_buffers,
    *,
    lr,
    momentum,
    nesterov,
    omega,
    grad_clip,
    ortho_dtype,
    scratch,
):
    """Fast path: the step as per-row linear combinations of P, G and the momentum.

    Per row (r = |p|, Y = p/r), everything the step needs follows from three row reductions
    ``|p|, <p, g>, |g|`` and one of the new momentum ``|m|`` (plus ``<m, g>`` with Nesterov):
    ``m = gamma tau + aG g + aP p`` with ``aG = -lr c``, ``aP = lr c <y,g>/r`` (c the clip factor),
    then ``p_new = (cos|d|/r) p + sinc|d| d`` and ``tau_new = cos|d| d - |d| sin|d| p/r``.
    Per tensor that is 4 reduction passes and 5 axpy-style passes (``addcmul_`` with per-row
    coefficients), one shared scratch buffer; the per-row scalar maths runs once for all rows of
    all tensors of a bucket. Momentum is assumed tangent (<tau, y> = 0 up to rounding), which
    holds because it is the parallel transport of a tangent vector.
    """
    for b in rs.buckets(params, grads, momentum_buffers, scratch):
        t = rs.fast_tangent(
            b, scratch, omega=omega, grad_clip=grad_clip, ortho_dtype=ortho_dtype, need_hh=nesterov
        )
        scal = scratch.take((2, b.total, 1), b.cdt, b.device)
        norm_m, dot_mg = scal[0], scal[1]
        rinv, hh = t.rinv, t.hh
        eta_c = t.c * lr
        a_g = -eta_c
        a_p = eta_c * t.yg * rinv

        # phase 3: new momentum m = gamma tau + aG g + aP p, in place; its row norm
        for s in b.slots:
            P, G, tau, sl = s.P, s.G, s.bufs[0], slice(s.offset, s.offset + s.rows)
            tau.mul_(momentum).addcmul_(G, a_g[sl]).addcmul_(P, a_p[sl])
            torch.linalg.vector_norm(tau, dim=1, keepdim=True, out=norm_m[sl])
            if nesterov:
                work = b.work(s)
                torch.mul(tau, G, out=work)
                torch.sum(work, dim=1, keepdim=True, out=dot_mg[sl])

        # phase 4: exponential map and transport as per-row coefficients
        if not nesterov:
            theta = norm_m  # d = m
            cos = torch.cos(theta)
            p_self = cos * rinv - 1.0  # p_new = p + p_self * p + p_m * m
            p_m = geo.sinc(theta)
            t_p = -(theta * torch.sin(theta)) * rinv  # tau_new = t_p * p + t_m * m
            t_m = cos
        else:
            mm = norm_m.square()
            # d = gamma m + aG g + aP p; |aG g + aP p| = eta_c |h|; <m, p> = 0 (tangent)
            dd = (
                momentum**2 * mm + 2.0 * momentum * a_g * dot_mg + eta_c.square() * hh
            ).clamp_min_(0)
            theta = dd.sqrt()
            dm = momentum * mm + a_g * dot_mg  # <d, m>
            cos, sinc = torch.cos(theta), geo.sinc(theta)
            q = 0.5 * geo.sinc(0.5 * theta).square()  # (1 - cos)/theta^2
            p_self = cos * rinv + sinc * a_p - 1.0
            p_g, p_m = sinc * a_g, sinc * momentum
            dmq = dm * q
            t_m = 1.0 - dmq * momentum
            t_g = -dmq * a_g
            t_p = -(dm * sinc * rinv + dmq * a_p)

        # phase 5: p <- exp_y(d), tau <- transport, two passes per output with one scratch
        for s in b.slots:
            P, G, tau, sl = s.P, s.G, s.bufs[0], slice(s.offset, s.offset + s.rows)
            work = b.work(s)
            if not nesterov:
                torch.mul(P, t_p[sl], out=work).addcmul_(tau, t_m[sl])
                P.addcmul_(P, p_self[sl]).addcmul_(tau, p_m[sl])
            else:
                torch.mul(G, t_g[sl], out=work).addcmul_(P, t_p[sl]).addcmul_(tau, t_m[sl])
                P.addcmul_(P, p_self[sl]).addcmul_(G, p_g[sl]).addcmul_(tau, p_m[sl])
            tau.copy_(work)
        rs.write_back(b)
