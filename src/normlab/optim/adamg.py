"""Adam-G: Adam on G(1, n) with one adaptive step size per weight vector (Cho & Lee 2017).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603);
the authors' code (see /work/shared/notes/riemannian_bn.md, section 1.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

from .. import geometry as geo
from . import _rows
from .sgdg import _bucket_by_device_and_dtype, _keep_fp32_state, _params_with_grad

__all__ = ["AdamG", "adamg"]

_EUCLIDEAN_METHODS = ("sgd", "adam")


class AdamG(Optimizer):
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
    ``torch.optim.SGD`` with momentum, Nesterov and L2 decay) or ``euclidean="adam"``
    (``torch.optim.Adam`` with L2 decay, same betas/eps).

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
        foreach: None/True fast path, False single-tensor reference.
    """

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
        ortho_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            grassmann=grassmann,
            omega=omega,
            grad_clip=grad_clip,
            euclidean=euclidean,
            ortho_dtype=ortho_dtype,
            foreach=foreach,
        )
        self._scratch = _rows.ScratchPool()
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._scratch = _rows.ScratchPool()
        for group in self.param_groups:
            for key, value in (
                ("nesterov", False),
                ("omega", 0.0),
                ("grad_clip", None),
                ("grassmann", False),
                ("euclidean", "sgd"),
                ("ortho_dtype", None),
                ("foreach", None),
            ):
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; validates its hyper-parameters and unit-normalizes manifold rows."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _rows.validate_common(group)
            betas = group["betas"]
            if len(betas) != 2:
                raise ValueError(f"Invalid betas: {betas}")
            _rows.check_range("beta parameter at index 0", betas[0], 0.0, 1.0)
            _rows.check_range("beta parameter at index 1", betas[1], 0.0, 1.0)
            _rows.check_range("epsilon value", group["eps"], 0.0)
            if group["euclidean"] not in _EUCLIDEAN_METHODS:
                raise ValueError(f"Invalid euclidean method: {group['euclidean']!r}")
        except ValueError:
            self.param_groups.pop()
            raise
        if group["grassmann"]:
            for p in group["params"]:
                _rows.normalize_rows_(p)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch, but float16/bfloat16 parameters keep their float32 manifold state."""
        super().load_state_dict(state_dict)
        _keep_fp32_state(self, state_dict)

    def _manifold_state(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        state = self.state[p]
        cdt = _rows.compute_dtype(p)
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros((_rows.num_rows(p), 1), dtype=cdt, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):
            buf = state[key]
            if buf.dtype != cdt or buf.device != p.device:
                state[key] = buf.to(device=p.device, dtype=cdt)
        state["exp_avg"] = _rows.conform_layout(state["exp_avg"], _rows.state_perm(p))
        return state["step"], state["exp_avg"], state["exp_avg_sq"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._scratch.reset()
        for group in self.param_groups:
            params, grads = _params_with_grad(group, "AdamG")
            if not params:
                continue
            lr = _rows.as_float(group["lr"])
            betas = (_rows.as_float(group["betas"][0]), _rows.as_float(group["betas"][1]))
            wd = _rows.as_float(group["weight_decay"])
            if group["grassmann"]:
                steps, exp_avgs, exp_avg_sqs = zip(*(self._manifold_state(p) for p in params))
                adamg(
                    params,
                    grads,
                    list(exp_avgs),
                    list(exp_avg_sqs),
                    list(steps),
                    lr=lr,
                    betas=betas,
                    eps=_rows.as_float(group["eps"]),
                    omega=_rows.as_float(group["omega"]),
                    grad_clip=group["grad_clip"],
                    ortho_dtype=group["ortho_dtype"],
                    foreach=group["foreach"],
                    scratch=self._scratch,
                )
            elif group["euclidean"] == "sgd":
                for p, g in zip(params, grads):
                    _rows.euclidean_sgd_(
                        p,
                        g,
                        self.state[p],
                        lr=lr,
                        momentum=_rows.as_float(group["momentum"]),
                        nesterov=group["nesterov"],
                        weight_decay=wd,
                    )
            else:
                for p, g in zip(params, grads):
                    _rows.euclidean_adam_(
                        p, g, self.state[p], lr=lr, betas=betas, eps=group["eps"], weight_decay=wd
                    )
        return loss


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
        cdt = _rows.compute_dtype(p)
        rows = _rows.num_rows(p)
        P = p.reshape(rows, -1).to(cdt)
        G = grad.reshape(rows, -1).to(cdt)
        Y = geo.safe_normalize_rows(P)
        if omega != 0 and _rows.ortho_applies(rows, P.shape[1]):
            G = G + _rows.reference_ortho_gradient(Y, omega, ortho_dtype)
        h = geo.clip_rows(geo.project_tangent(Y, G), grad_clip)
        h = h * (geo.row_norms(P) > 0)  # a zero row has no direction: it stays zero
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
    for (device, cdt), idx in _bucket_by_device_and_dtype(params).items():
        slots, offset, max_numel, alphas = [], 0, 0, []
        for i in idx:
            slot = _rows.prepare_rows(params[i], grads[i], [exp_avgs[i]], offset)
            slots.append(slot)
            offset += slot.rows
            max_numel = max(max_numel, slot.P.numel())
            alphas.append(_bias_correction(state_steps[i], beta1, beta2))
        total = offset
        scal = scratch.take((5, total, 1), cdt, device)
        norm_p, dot_pg, norm_g, norm_m, v_all = scal[0], scal[1], scal[2], scal[3], scal[4]
        work_flat = scratch.take((max_numel,), cdt, device)

        # phase 1: orthogonality term and three row reductions per tensor
        for s in slots:
            P, sl = s.P, slice(s.offset, s.offset + s.rows)
            torch.linalg.vector_norm(P, dim=1, keepdim=True, out=norm_p[sl])
            if omega != 0 and _rows.ortho_applies(s.rows, P.shape[1]):
                out = scratch.take(tuple(P.shape), cdt, device)
                s.G = _rows.add_ortho_gradient(P, s.G, omega, out, norm_p[sl], ortho_dtype)
            work = work_flat[: P.numel()].view(P.shape)
            torch.mul(P, s.G, out=work)
            torch.sum(work, dim=1, keepdim=True, out=dot_pg[sl])
            torch.linalg.vector_norm(s.G, dim=1, keepdim=True, out=norm_g[sl])

        # phase 2: clipped tangent gradient h = c_g g + c_p p and |h|^2, for all rows at once
        tiny = _rows.tiny(cdt)
        valid = norm_p > 0
        rinv = torch.where(valid, norm_p.clamp_min(tiny).reciprocal(), 0.0)
        yg = dot_pg * rinv
        hh = (norm_g.square() - yg.square()).clamp_min_(0.0)
        c = valid.to(cdt)
        if grad_clip is not None:
            c = c * (grad_clip / hh.sqrt().clamp_min(grad_clip))
        hh_clipped = c.square() * hh
        b_g = (1.0 - beta1) * c
        b_p = -b_g * yg * rinv

        # phase 3: moments, in place; row norm of the new first moment
        for k, s in enumerate(slots):
            P, G, m, sl = s.P, s.G, s.bufs[0], slice(s.offset, s.offset + s.rows)
            v = exp_avg_sqs[idx[k]]
            v.mul_(beta2).add_(hh_clipped[sl], alpha=1.0 - beta2)
            v_all[sl].copy_(v)
            m.mul_(beta1).addcmul_(G, b_g[sl]).addcmul_(P, b_p[sl])
            torch.linalg.vector_norm(m, dim=1, keepdim=True, out=norm_m[sl])

        # phase 4: step length per row, exponential map and transport as coefficients
        rows_per_tensor = torch.tensor([s.rows for s in slots], device=device)
        alpha = torch.tensor(alphas, dtype=cdt, device=device).repeat_interleave(rows_per_tensor)
        k_step = (lr * alpha.unsqueeze(1)) * (v_all + eps).sqrt().clamp_min(tiny).reciprocal()
        theta = k_step * norm_m
        cos = torch.cos(theta)
        p_self = cos * rinv - 1.0  # p_new = p + p_self * p + p_m * m
        p_m = -k_step * geo.sinc(theta)
        t_p = norm_m * torch.sin(theta) * rinv  # m_new = t_p * p + cos * m

        # phase 5: two passes per output, one shared scratch
        for s in slots:
            P, m, sl = s.P, s.bufs[0], slice(s.offset, s.offset + s.rows)
            work = work_flat[: P.numel()].view(P.shape)
            torch.mul(P, t_p[sl], out=work).addcmul_(m, cos[sl])
            P.addcmul_(P, p_self[sl]).addcmul_(m, p_m[sl])
            m.copy_(work)
            if s.stage is not None:
                s.stage.copy_(s.P)
