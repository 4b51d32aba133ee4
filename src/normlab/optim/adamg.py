"""Adam-G: Adam on G(1, n) with one adaptive step size per weight vector (Cho & Lee 2017).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603);
the authors' code (see /work/shared/notes/riemannian_bn.md, section 1.4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.optimizer import required

from .. import geometry as geo
from . import _row_sphere as rs
from . import _rows

__all__ = ["AdamG", "adamg"]

_EUCLIDEAN_METHODS = ("sgd", "adam")


class AdamG(rs.RowSphereOptimizer):
    r"""Adam-G for BN-fed weights (``grassmann=True`` groups), SGD or Adam for the rest.

    Per row ``i`` of a manifold tensor (rows as in :class:`normlab.optim.SGDG`), step ``t``:

    .. code-block:: text

        y     = p / |p|;  g = grad (+ 2 omega (Y Y^T Y - Y)_i)
        h     = clip_nu(g - <y, g> y)                 clipped Riemannian gradient
        m     = beta1 m + (1 - beta1) h               first moment: a tangent vector
        v     = beta2 v + (1 - beta2) |h|^2           second moment: ONE scalar per row
        alpha = sqrt(1 - beta2^t) / (1 - beta1^t)     bias correction folded into the step
        delta = -lr alpha m / sqrt(v + eps)           eps inside the sqrt, on the uncorrected v
        p     <- exp_y(delta)
        m     <- pt_y(m; delta) = cos|delta| m + |m| sin|delta| y    (v is a scalar: not moved)

    Only the step length of a row adapts; its direction is never re-weighted per coordinate.
    ``betas`` give beta1 and beta2 (paper: 0.9, 0.99). The ``momentum``/``nesterov`` keys of a
    group configure the Euclidean SGD part (with the paper's dicts, ``momentum=0.9`` equals
    beta1, as in the original, which read beta1 from ``momentum``).

    Groups with ``grassmann=False`` use ``euclidean="sgd"`` (default, the paper's code:
    ``torch.optim.SGD`` with momentum, dampening, Nesterov and L2 decay) or ``euclidean="adam"``
    (``torch.optim.Adam`` with L2 decay, same betas/eps), both run by torch's own functional
    ``torch.optim.sgd.sgd`` / ``torch.optim.adam.adam``; their state follows torch (the
    parameter's dtype), the manifold state follows :func:`normlab.geometry.compute_dtype`.

    Rates and keys as :class:`SGDG`: ``lr`` Euclidean, ``lr_manifold`` (alias ``lrg``) for
    manifold groups, both stored in the group's ``"lr"``. The authors' group keys ``beta2`` and
    ``epsilon`` are accepted as aliases of ``betas[1]`` and ``eps`` (a ValueError if they
    disagree with ``betas``/``eps`` given in the same group).

    The fixes listed for :class:`SGDG` apply here too (rows normalized at construction, honoured
    constructor ``omega``, no writes to ``p.grad``, state in the right dtype/device, float32 maths
    for float16/bfloat16, ``channels_last``, zero rows stay zero). The step count is a per-parameter
    tensor, so parameters that miss a gradient on some steps get their own bias correction, and LR
    changes never reset ``m``, ``v`` or ``t``.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (paper: 0.05 on the manifold, 0.01 elsewhere).
        betas: (beta1, beta2) of the manifold Adam (and of Euclidean Adam).
        eps: added to ``v`` inside the square root.
        momentum, nesterov, weight_decay: Euclidean SGD part (weight decay also for Euclidean
            Adam; it has no effect on manifold groups, where its gradient is radial).
        grassmann: True for a group of BN-fed weights optimized on G(1, n).
        omega: orthogonality regularization factor (see :class:`SGDG`).
        grad_clip: per-row threshold on the tangent gradient norm; None disables clipping.
        ortho_dtype: dtype of the orthogonality term's matrix products (see :class:`SGDG`).
        euclidean: "sgd" or "adam", the method of ``grassmann=False`` groups.
        lr_manifold: learning rate of manifold groups without their own (the paper's ``lrg``).
        beta2, epsilon: the authors' names of ``betas[1]`` and ``eps`` (override them if given).
        dampening: dampening of Euclidean SGD momentum (torch semantics).
        foreach: None/True fast path, False single-tensor reference.
        fused: True runs each manifold group's step as one compiled graph
            (:func:`adamg_fused_step`; see :class:`SGDG`), Euclidean groups with torch's fused
            SGD/Adam kernels.
    """

    _name = "AdamG"
    _setstate_defaults = {**rs.RowSphereOptimizer._setstate_defaults, "euclidean": "sgd"}
    _aliases = {"beta2": ("betas", 1), "epsilon": ("eps", None)}

    def __init__(
        self,
        params,
        lr: float = required,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grassmann: bool = False,
        omega: float = 0.0,
        grad_clip: float | None = None,
        euclidean: str = "sgd",
        *,
        lr_manifold: float | None = None,
        beta2: float | None = None,
        epsilon: float | None = None,
        dampening: float = 0.0,
        ortho_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if beta2 is not None:  # the authors' name of betas[1]
            betas = (betas[0], beta2)
        if epsilon is not None:  # the authors' name of eps
            eps = epsilon
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            grassmann=grassmann,
            omega=omega,
            grad_clip=grad_clip,
            euclidean=euclidean,
            ortho_dtype=ortho_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults, lr_manifold=lr_manifold)

    def _validate(self, group: dict) -> None:
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas}")
        _rows.check_range("beta parameter at index 0", betas[0], 0.0, 1.0)
        _rows.check_range("beta parameter at index 1", betas[1], 0.0, 1.0)
        _rows.check_range("epsilon value", group["eps"], 0.0)
        if group["euclidean"] not in _EUCLIDEAN_METHODS:
            raise ValueError(
                f"Invalid euclidean method: {group['euclidean']!r} "
                f"(valid: {', '.join(_EUCLIDEAN_METHODS)})"
            )
        if group["euclidean"] == "adam" and _rows.as_float(group["dampening"]) != 0:
            raise ValueError(
                "Invalid dampening: it applies to euclidean='sgd' groups only (Adam has none)"
            )

    def _moments(self, params: list[Tensor], buffer) -> tuple[list, list, list]:
        """(steps, exp_avgs, exp_avg_sqs) of ``params``, created on first use; ``buffer`` is
        :meth:`_state_buffer` (eager: rows in the parameter's layout) or :meth:`_fused_state`."""
        steps, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            steps.append(state["step"])
            exp_avgs.append(buffer(p, "exp_avg"))
            exp_avg_sqs.append(buffer(p, "exp_avg_sq", (_rows.num_rows(p), 1)))
        return steps, exp_avgs, exp_avg_sqs

    def _manifold_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        steps, exp_avgs, exp_avg_sqs = self._moments(params, self._state_buffer)
        adamg(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=_rows.as_float(group["lr"]),
            betas=(_rows.as_float(group["betas"][0]), _rows.as_float(group["betas"][1])),
            eps=_rows.as_float(group["eps"]),
            omega=_rows.as_float(group["omega"]),
            grad_clip=group["grad_clip"],
            ortho_dtype=group["ortho_dtype"],
            foreach=group["foreach"],
            scratch=self._scratch,
        )

    def _fused_function(self):
        return adamg_fused_step

    def _run_fused(self, index: int, group: dict, params: list[Tensor], grads: list[Tensor]):
        beta1, beta2 = (_rows.as_float(b) for b in group["betas"])
        steps, exp_avgs, exp_avg_sqs = self._moments(params, self._fused_state)
        # the bias corrections from the (host) step counters, in double as the reference, sent
        # to the device as one small copy: no device-to-host synchronisation
        cdt, device = geo.compute_dtype(*params), params[0].device
        alphas = [_bias_correction(t + 1, beta1, beta2) for t in steps]
        alphas = torch.tensor(alphas, dtype=cdt).to(device, non_blocking=True)
        tangent_key, omega, grad_clip = self._fused_tangent_args(group, params)
        rows = [_rows.num_rows(p) for p in params]
        points = rs.graph_rows(params, rows)
        exp_avgs, exp_avg_sqs = rs.graph_rows(exp_avgs, rows), rs.graph_rows(exp_avg_sqs, rows)
        done = self._fused_step(
            (index, *tangent_key),
            (points, exp_avgs, exp_avg_sqs),
            points,
            grads,  # read only: the graph reshapes them (only stores need the row views)
            exp_avgs,
            exp_avg_sqs,
            alphas,
            self._scalar("lr", group["lr"], params),
            self._scalar("beta1", beta1, params),
            self._scalar("beta2", beta2, params),
            self._scalar("eps", group["eps"], params),
            omega,
            grad_clip,
            ortho=tangent_key[1],
            ortho_dtype=group["ortho_dtype"],
        )
        if done:
            for step in steps:
                step += 1
        return done


def adamg_fused_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    alphas,
    lr,
    beta1,
    beta2,
    eps,
    omega,
    grad_clip,
    *,
    ortho,
    ortho_dtype,
):
    """The Adam-G step as a **pure** function (new tensors out): what ``fused=True`` compiles.

    The maths of :func:`_single_tensor_adamg` in coefficient form on the rows ``(P, G, M)``
    (see :func:`normlab.optim._row_sphere.fused_tangent`): ``h = c (G - yg rinv P)``,
    ``m = beta1 M + (1 - beta1) h``, ``v = beta2 v + (1 - beta2) c^2 |h|^2``,
    ``k = lr alpha / sqrt(v + eps)`` and ``theta = k |m|``; then
    ``p_new = cos(theta) rinv P - k sinc(theta) m`` and ``m_new = cos(theta) m + |m| sin(theta)
    rinv P`` (the transport of ``m`` along ``-k m``). ``alphas[i]`` is tensor ``i``'s bias
    correction ``sqrt(1 - beta2^t)/(1 - beta1^t)``; the other hyper-parameters are 0-d tensors.
    A zero row with ``eps = 0`` keeps a zero step (a floor on the denominator) instead of 0/0.
    """
    new_params, new_avgs, new_sqs = [], [], []
    for i, (p, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        P, G = rs.fused_rows(p, grad)
        M = exp_avg.reshape(P.shape)
        t = rs.fused_tangent(
            P, G, [M], omega=omega, grad_clip=grad_clip, use_ortho=ortho[i], ortho_dtype=ortho_dtype
        )
        b_g = (1.0 - beta1) * t.c
        m = (-b_g * t.yg * t.rinv, b_g, beta1)  # coefficients on (P, G, M)
        v = beta2 * exp_avg_sq + (1.0 - beta2) * (t.c * t.c * t.hh)
        norm_m = rs.quad(t.gram, m, m).clamp_min(0.0).sqrt()
        k = (lr * alphas[i]) / torch.sqrt(v + eps).clamp_min(geo.tiny(P.dtype))
        theta = k * norm_m
        cos = torch.cos(theta)
        s_m = -k * geo.sinc(theta)  # p_new = cos(theta) rinv P + s_m m
        p_new = (cos * t.rinv + s_m * m[0], s_m * m[1], s_m * m[2])
        m_new = (cos * m[0] + norm_m * torch.sin(theta) * t.rinv, cos * m[1], cos * m[2])
        rows = [P, t.G, M]
        new_params.append(rs.combine(p_new, rows).reshape(p.shape).to(p.dtype))
        new_avgs.append(rs.combine(m_new, rows).reshape(exp_avg.shape))
        new_sqs.append(v)
    return new_params, new_avgs, new_sqs


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------


def adamg(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    omega: float = 0.0,
    grad_clip: float | None = None,
    ortho_dtype: torch.dtype | None = None,
    foreach: bool | None = None,
    scratch: _rows.ScratchPool | None = None,
) -> None:
    """Functional Adam-G step on manifold tensors (see :class:`AdamG`); updates in place.

    ``exp_avgs[i]`` has the shape of ``params[i]``; ``exp_avg_sqs[i]`` is ``(rows, 1)``;
    ``state_steps[i]`` is a 0-d tensor, incremented here.
    """
    for step in state_steps:
        step += 1
    kwargs = dict(
        lr=lr, betas=betas, eps=eps, omega=omega, grad_clip=grad_clip, ortho_dtype=ortho_dtype
    )
    if foreach is False:
        _single_tensor_adamg(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
    else:
        _multi_tensor_adamg(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            scratch=scratch or _rows.ScratchPool(),
            **kwargs,
        )


def _bias_correction(step: Tensor, beta1: float, beta2: float) -> float:
    """alpha_t = sqrt(1 - beta2^t) / (1 - beta1^t)."""
    t = step.item()
    return math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def _single_tensor_adamg(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    lr,
    betas,
    eps,
    omega,
    grad_clip,
    ortho_dtype,
):
    """Reference: the Adam-G step written with :mod:`normlab.geometry`, one tensor at a time."""
    beta1, beta2 = betas
    for p, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps
    ):
        Y, h = rs.reference_tangent(
            p, grad, omega=omega, grad_clip=grad_clip, ortho_dtype=ortho_dtype
        )
        rows = Y.shape[0]
        m = beta1 * exp_avg.reshape(rows, -1) + (1.0 - beta1) * h
        v = beta2 * exp_avg_sq + (1.0 - beta2) * geo.row_norms(h).square()
        alpha = _bias_correction(step, beta1, beta2)
        delta = -lr * alpha * m / torch.sqrt(v + eps)
        P_new = geo.expmap(Y, delta)
        m_new = geo.transport(Y, delta, m)
        p.copy_(P_new.reshape(p.shape))
        exp_avg.copy_(m_new.reshape(exp_avg.shape))
        exp_avg_sq.copy_(v)


def _multi_tensor_adamg(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    lr,
    betas,
    eps,
    omega,
    grad_clip,
    ortho_dtype,
    scratch,
):
    """Fast path: per-row linear combinations of P, G and m (see ``_multi_tensor_sgdg``).

    Row reductions ``|p|, <p, g>, |g|`` give the clipped tangent gradient's coefficients
    ``h = c g - c <y,g>/r p`` and ``|h|^2``; the new moment ``m = beta1 m + (1-beta1) h`` is built
    in place and its norm taken; with ``k = lr alpha / sqrt(v + eps)`` and ``theta = k |m|``:
    ``p_new = (cos theta / r) p - k sinc(theta) m`` and ``m_new = cos theta m + |m| sin theta p/r``.
    """
    beta1, beta2 = betas
    for b in rs.buckets(params, grads, exp_avgs, scratch):
        alphas = [_bias_correction(state_steps[i], beta1, beta2) for i in b.idx]
        t = rs.fast_tangent(
            b, scratch, omega=omega, grad_clip=grad_clip, ortho_dtype=ortho_dtype, need_hh=True
        )
        scal = scratch.take((2, b.total, 1), b.cdt, b.device)
        norm_m, v_all = scal[0], scal[1]
        rinv, c = t.rinv, t.c
        hh_clipped = c.square() * t.hh
        b_g = (1.0 - beta1) * c
        b_p = -b_g * t.yg * rinv

        # phase 3: moments, in place; row norm of the new first moment
        for k, s in enumerate(b.slots):
            P, G, m, sl = s.P, s.G, s.bufs[0], slice(s.offset, s.offset + s.rows)
            v = exp_avg_sqs[b.idx[k]]
            v.mul_(beta2).add_(hh_clipped[sl], alpha=1.0 - beta2)
            v_all[sl].copy_(v)
            m.mul_(beta1).addcmul_(G, b_g[sl]).addcmul_(P, b_p[sl])
            torch.linalg.vector_norm(m, dim=1, keepdim=True, out=norm_m[sl])

        # phase 4: step length per row, exponential map and transport as coefficients
        rows_per_tensor = torch.tensor([s.rows for s in b.slots], device=b.device)
        alpha = torch.tensor(alphas, dtype=b.cdt, device=b.device)
        alpha = alpha.repeat_interleave(rows_per_tensor)
        k_step = (lr * alpha.unsqueeze(1)) * (v_all + eps).sqrt().clamp_min(
            geo.tiny(b.cdt)
        ).reciprocal()
        theta = k_step * norm_m
        cos = torch.cos(theta)
        p_self = cos * rinv - 1.0  # p_new = p + p_self * p + p_m * m
        p_m = -k_step * geo.sinc(theta)
        t_p = norm_m * torch.sin(theta) * rinv  # m_new = t_p * p + cos * m

        # phase 5: two passes per output, one shared scratch
        for s in b.slots:
            P, m, sl = s.P, s.bufs[0], slice(s.offset, s.offset + s.rows)
            work = b.work(s)
            torch.mul(P, t_p[sl], out=work).addcmul_(m, cos[sl])
            P.addcmul_(P, p_self[sl]).addcmul_(m, p_m[sl])
            m.copy_(work)
        rs.write_back(b)
