"""Metrics of training on the sphere: effective learning rate, effective gradient norm, step angles.

A parameter vector ``w`` (all scale-invariant tensors of a model read as one point of R^P) is
*scale-invariant* (SI) when the loss satisfies ``L(c w) = L(w)`` for every ``c > 0``. Then

* the gradient is orthogonal to the point (Euler's identity for a 0-homogeneous function):
  ``<grad L(w), w> = 0``;
* the gradient scales inversely with the norm: ``grad L(c w) = grad L(w) / c``;
* an SGD step of size ``lr`` moves the *direction* ``w / |w|`` like a step of size
  ``ELR = lr / |w|^2`` on the unit sphere (the effective learning rate);
* the gradient at the unit point is ``grad L(w / |w|) = |w| grad L(w)``; its norm
  ``|g| |w|`` is the effective gradient norm ``G_eff``;
* a step without momentum turns the point by the angle ``theta`` with
  ``tan(theta) = ELR * G_eff``.

Everything here is a pure function of tensors (no optimizer, no model) except
:class:`SphereMetricsTracker`, a small stateful accumulator that a training-loop callback can wrap.
All reductions are done in float64 and returned as Python floats; the joint norms, inner
products and angles are those of :mod:`normlab.geometry` (the package's one home of sphere maths).

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); van Laarhoven 2017, "L2
regularization versus batch and weight normalization" (the effective learning rate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from . import geometry

Tensors = Iterable[torch.Tensor]

__all__ = [
    "effective_learning_rate",
    "scale_invariant_norm",
    "tensor_norms",
    "effective_gradient_norm",
    "radial_cosine",
    "step_angle",
    "predicted_step_angle",
    "cosine_to_init",
    "distance_to_init",
    "SphereMetricsTracker",
]


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return [t.detach() for t in tensors]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """Joint norm in float64 (:func:`normlab.geometry.joint_norm`); 0 for an empty list."""
    return float(geometry.joint_norm(tensors, torch.float64)) if tensors else 0.0


def _joint_dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    if len(xs) != len(ys):
        raise ValueError(f"need as many tensors on both sides, got {len(xs)} and {len(ys)}")
    return float(geometry.joint_inner(xs, ys, torch.float64))


def effective_learning_rate(lr: float, norm: float) -> float:
    """The effective learning rate ``ELR = lr / |w|^2`` of an SI point of norm ``|w|``.

    A step of size ``lr`` at a point of norm ``|w|`` moves the direction ``w / |w|`` as a step of
    size ``ELR`` would at norm 1.
    """
    norm = float(norm)
    if not norm > 0:
        raise ValueError(f"Invalid norm: {norm} (must be > 0)")
    return float(lr) / norm**2


def scale_invariant_norm(params: Tensors) -> float:
    """The joint norm ``sqrt(sum_i |w_i|_F^2)`` of the SI tensors: the radius of their sphere."""
    return _norm(_as_list(params))


def tensor_norms(params: Tensors) -> list[float]:
    """The Frobenius norm of every tensor (the per-tensor radii)."""
    return [_norm([p]) for p in _as_list(params)]


def effective_gradient_norm(grads: Tensors, params: Tensors) -> float:
    """``G_eff = |g| |w|``: the gradient norm at the unit point ``w / |w|`` (joint norms).

    ``None`` gradients count as zero (they contribute nothing to ``|g|``).
    """
    g = [t for t in _as_list_allow_none(grads) if t is not None]
    return _norm(g) * scale_invariant_norm(params)


def _as_list_allow_none(tensors) -> list[torch.Tensor | None]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return [None if t is None else t.detach() for t in tensors]


def radial_cosine(grads: Tensors, params: Tensors) -> float:
    """``cos(g, w) = <g, w> / (|g| |w|)``; about 0 for an SI loss (Euler's identity).

    Returns 0 for a zero gradient. ``None`` gradients count as zero.
    """
    ws = _as_list(params)
    gs = _as_list_allow_none(grads)
    if len(gs) != len(ws):
        raise ValueError(f"need one gradient per parameter, got {len(gs)} and {len(ws)}")
    pairs = [(g, w) for g, w in zip(gs, ws) if g is not None]
    g_norm = _norm([g for g, _ in pairs])
    w_norm = scale_invariant_norm(ws)
    if g_norm == 0.0 or w_norm == 0.0:
        return 0.0
    return _joint_dot([g for g, _ in pairs], [w for _, w in pairs]) / (g_norm * w_norm)


def step_angle(w_before: Tensors, w_after: Tensors) -> float:
    """The angle (radians, in [0, pi]) between two joint points, e.g. consecutive iterates.

    Computed in float64 by :func:`normlab.geometry.joint_angle` (``2 atan2(|a - b|, |a + b|)`` of
    the unit points), which unlike ``acos`` of the cosine stays accurate for the tiny angles of
    small-ELR steps.
    """
    a = _as_list(w_before)
    b = _as_list(w_after)
    if len(a) != len(b):
        raise ValueError(f"need as many tensors on both sides, got {len(a)} and {len(b)}")
    return float(geometry.joint_angle(a, b, torch.float64))


def predicted_step_angle(elr: float, effective_grad_norm: float) -> float:
    """``atan(ELR * G_eff)``: the angle of a momentum-free sphere step with a tangent gradient."""
    return math.atan(float(elr) * float(effective_grad_norm))


def cosine_to_init(params: Tensors, init_params: Tensors) -> float:
    """The cosine between the current joint point and the initial one."""
    return math.cos(step_angle(init_params, params))


def distance_to_init(params: Tensors, init_params: Tensors) -> float:
    """The Euclidean distance ``|w - w_0|`` between the current joint point and the initial one."""
    a, b = _as_list(params), _as_list(init_params)
    if len(a) != len(b):
        raise ValueError(f"need as many tensors on both sides, got {len(a)} and {len(b)}")
    return _norm([x.double() - y.double() for x, y in zip(a, b)])


def _fast_joint_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Joint norm with one multi-tensor reduction in compute dtype (tracker fast path)."""
    return float(geometry.joint_norm(tensors)) if tensors else 0.0


class SphereMetricsTracker:
    """Per-step accumulator of sphere metrics, summarised once per epoch.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after it,
    with the same SI parameters (in the same order) each time, and :meth:`epoch_summary` at the end
    of an epoch. It keeps three copies of the SI parameters (the point before the current step, the
    initial point and the epoch's first point); it never modifies the parameters or their gradients.

    ``epoch_summary()`` returns (floats):

    * ``effective_grad_norm``: mean over the epoch's steps of ``|g_t| |w_t|`` (``w_t`` is the point
      where the gradient was taken);
    * ``step_angle``: mean angle between ``w_t`` and ``w_{t+1}``;
    * ``epoch_angle``: angle between the epoch's first point and its last;
    * ``elr``: mean effective learning rate of the steps, ``lr / |w_t|^2`` (or the given ELR);
    * ``si_norm``: joint norm of the SI parameters after the last step;
    * ``cosine_to_init``: cosine between the last point and the point of the very first step;
    * ``steps``: the number of steps summarised.

    An epoch without steps gives NaN metrics (and ``steps = 0``).

    The per-step work uses multi-tensor (``torch._foreach_*``) ops in the parameters' dtype: a copy
    and a norm in :meth:`before_step`; three norms and one in-place pass over the copy in
    :meth:`after_step` (about 1.5-2 SphereSGD steps in memory traffic: to save it, track only some
    steps). In float32 the angle of a step has an absolute error of about 1e-7 rad (so tiny angles
    are coarse); the pure functions of this module compute in float64.
    """

    def __init__(self) -> None:
        self._before: list[torch.Tensor] | None = None
        self._init: list[torch.Tensor] | None = None
        self._before_norm = math.nan
        self._pending = False
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._grad_norms: list[float] = []
        self._angles: list[float] = []
        self._elrs: list[float] = []
        self._last_norm = math.nan
        self._epoch_start: list[torch.Tensor] | None = None
        self._last_point: list[torch.Tensor] | None = None

    def before_step(self, params: Tensors) -> None:
        """Record the point ``w_t`` at which the gradient of the coming step was taken."""
        ps = _as_list(params)
        if not ps:
            raise ValueError("SphereMetricsTracker needs at least one parameter")
        if self._before is None or [b.shape for b in self._before] != [p.shape for p in ps]:
            self._before = [p.clone() for p in ps]
        else:
            # Reuse the buffers: one copy pass per step and no allocation.
            torch._foreach_copy_(self._before, ps)
        self._before_norm = _fast_joint_norm(self._before)
        if self._init is None:
            self._init = [p.clone() for p in ps]
        if self._epoch_start is None:
            self._epoch_start = [p.clone() for p in ps]
        self._pending = True

    def after_step(
        self,
        params: Tensors,
        grads: Iterable[torch.Tensor | None],
        lr: float | None = None,
        *,
        elr: float | None = None,
    ) -> None:
        """Record the step ``w_t -> w_{t+1}`` taken with the gradients ``grads`` at ``w_t``.

        Give either the Euclidean step size ``lr`` (the ELR is then ``lr / |w_t|^2``: the
        conventional-training case) or the effective learning rate ``elr`` directly (the
        :class:`normlab.optim.SphereSGD` case, whose group key ``"elr"`` holds it).
        ``None`` gradients count as zero.
        """
        if not self._pending or self._before is None:
            raise RuntimeError("after_step() needs a matching before_step() call first")
        if (lr is None) == (elr is None):
            raise ValueError("give exactly one of lr and elr")
        ps = _as_list(params)
        if len(ps) != len(self._before):
            raise ValueError(
                f"after_step got {len(ps)} parameters, before_step got {len(self._before)}"
            )
        gs = [g for g in _as_list_allow_none(grads) if g is not None]
        na = self._before_norm
        nb = _fast_joint_norm(ps)
        if na == 0.0 or nb == 0.0:
            raise ValueError("the angle of a zero point is undefined")
        self._grad_norms.append(_fast_joint_norm(gs) * na)
        # chord = |w_t / |w_t| - w_{t+1} / |w_{t+1}|| = |w_t - (|w_t| / |w_{t+1}|) w_{t+1}| / |w_t|,
        # computed in the copy of w_t (overwritten at the next before_step): one pass, one norm
        torch._foreach_add_(self._before, ps, alpha=-na / nb)
        chord = _fast_joint_norm(self._before) / na
        self._angles.append(geometry.angle_from_chord(min(2.0, chord)))
        if elr is None:
            elr = effective_learning_rate(lr, na)
        self._elrs.append(float(elr))
        self._last_norm = nb
        self._last_point = ps  # detached views of the live parameters, read in epoch_summary
        self._pending = False

    def epoch_summary(self) -> dict[str, float]:
        """The epoch's metrics (see the class docstring); starts a new epoch.

        Call it before the next step: the last point is read from the live parameters.
        """
        steps = len(self._angles)

        def mean(values: list[float]) -> float:
            return math.fsum(values) / len(values) if values else math.nan

        summary = {
            "effective_grad_norm": mean(self._grad_norms),
            "step_angle": mean(self._angles),
            "epoch_angle": math.nan,
            "elr": mean(self._elrs),
            "si_norm": self._last_norm,
            "cosine_to_init": math.nan,
            "steps": float(steps),
        }
        if steps and self._last_point is not None:
            if self._epoch_start is not None:
                summary["epoch_angle"] = step_angle(self._epoch_start, self._last_point)
            if self._init is not None:
                summary["cosine_to_init"] = cosine_to_init(self._last_point, self._init)
        self._reset_epoch()
        return summary
