r"""SphereSGD: projected SGD on a sphere with a fixed effective learning rate (Kodryan et al. 2022).

For a scale-invariant (SI) loss, ``L(c w) = L(w)``, only the direction of ``w`` matters and an SGD
step of size ``lr`` moves that direction like a step of size ``ELR = lr / |w|^2`` on the unit
sphere. Plain SGD lets ``|w|`` drift, so the ELR drifts with it. SphereSGD fixes the norm of the
SI parameters at ``rho`` and steps with ``lr = ELR * rho^2``, so the ELR stays what you set.

Algorithm (one *sphere*: a point ``x`` of radius ``rho``, gradient ``g = grad L(x)``)::

    input: elr, momentum mu, project_gradient
    rho      <- |x_0| (recorded at the first step; or the ``radius`` option)
    d        <- g                              if not project_gradient
                g - (<x, g> / rho^2) x         if project_gradient   (tangent part of g)
    if mu > 0:
        b    <- P_x(mu b + g),  P_x(v) = v - (<x, v> / rho^2) x       (buffer kept tangent)
        d    <- b
    u        <- x - elr rho^2 d
    x        <- rho u / |u|                    (retraction: back onto the sphere)

Without momentum, with a tangent ``d`` (always the case for an SI loss, whose gradient is
orthogonal to ``x`` by Euler's identity), the step turns the point by the angle ``theta`` with
``tan(theta) = elr * |g| * rho``: a unit-sphere step of size ``elr`` along ``grad L(x / rho)``.
The result does not depend on ``rho``.

``granularity`` says what a sphere is:

* ``"global"`` (the paper's method): all tensors of the param group form **one** point; their
  joint norm ``sqrt(sum_k |w_k|^2)`` is fixed at its initial value ``rho`` and a single scale
  factor brings them back to it after each step. Residual networks are in general SI only in this
  joint sense.
* ``"tensor"``: every tensor is its own sphere with its own initial radius ``rho_k`` and step size
  ``elr * rho_k^2`` (every tensor has ELR ``elr``).
* ``"row"``: every row of the ``(out, -1)`` view (every output filter) is its own sphere with its
  own radius and ELR ``elr`` (a 0-/1-D tensor is one row). The original ``--fix_all_elr`` mode
  instead used one common filter radius ``rho_f = sqrt(|w_0|^2 / F)`` and a step ``E |w_0|^2``,
  i.e. a per-filter ELR ``E * F``: pass ``radius=rho_f`` and ``elr=E * F`` to reproduce it.

Choices and how they relate to the original code (``tipt0p/three_regimes_on_the_sphere``):

* **Gradient projection.** The original takes a plain SGD step and renormalises; it does not
  project the gradient (for an SI loss the gradient is already tangent up to rounding: measured
  ``|cos(g, w)| ~ 3e-6``). The default ``project_gradient=False`` follows it;
  ``project_gradient=True`` removes the radial part first (Riemannian SGD with the projective
  retraction), which only matters for parameters that are not exactly SI.
* **Momentum.** The original keeps torch's ambient heavy-ball buffer, which is neither projected nor
  transported (its code warns that this is ambiguous; the paper's runs use momentum 0). Here the
  buffer is kept **tangent**: ``b <- P_x(mu b + g)`` re-projects it onto the tangent space at the
  current point each step (vector transport by projection), which also projects the gradient.
* **Weight decay** has no effect on the sphere (it only shrinks the norm that the retraction
  restores), so scale-invariant groups reject ``weight_decay > 0``.
* **The radius** ``rho`` is recorded lazily, at the group's first step, in
  ``state[p]["radius"]`` (global/tensor: a 0-d tensor per parameter, equal for the whole group in
  ``"global"``; row: one entry per row). ``radius=r`` instead rescales every sphere of the group
  onto radius ``r`` **when the group is added** (in the constructor: the parameters change there,
  so that the first gradient is taken at the rescaled point), and records ``r``; changing
  ``group["radius"]`` later has no effect. The norm is re-measured at every step (one multi-tensor reduction), so rounding
  errors cannot accumulate.

Param groups hold the hyper-parameters: ``elr``, ``momentum``, ``granularity``, ``radius``,
``project_gradient``, ``scale_invariant``, ``lr``, ``weight_decay``, ``foreach``. Groups with
``scale_invariant=False`` take plain SGD steps (``lr``, ``momentum``, ``weight_decay``, torch
semantics); ``lr=0`` freezes them (a fixed head, as the original's ``noninvlr=0``).

Learning-rate schedulers: ``torch.optim.lr_scheduler`` writes ``group["lr"]``. In a
scale-invariant group ``"lr"`` is an **alias of the ELR** (not the Euclidean step size, which is
``elr * rho^2``), so any torch scheduler schedules the ELR there and the Euclidean lr in
non-SI groups. Writing either ``"elr"`` or ``"lr"`` of an SI group works; if both were changed
since the last step, ``"lr"`` (the scheduler's) wins, and both are made equal at each step.

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); Absil, Mahony & Sepulchre,
"Optimization Algorithms on Matrix Manifolds", 2008 (retractions, vector transport by projection).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import geometry
from .._fused import FusedStep, ScalarSlots
from ._row_sphere import combine as _rows_combine
from ._row_sphere import euclidean_sgd, graph_rows, keep_compute_dtype_state
from ._row_sphere import quad as _rows_quad
from ._row_sphere import row_gram as _rows_gram
from ._rows import check_fused, num_rows

__all__ = ["SphereSGD", "sphere_sgd", "GRANULARITIES"]

GRANULARITIES = ("global", "tensor", "row")
_ELR_SEEN = "_elr_seen"  # private group key: the ELR of the last step (tells which alias changed)
#: group keys accepted besides the defaults: torch's, the pipeline's (normlab.methods.sphere)
_EXTRA_GROUP_KEYS = ("params", "name", "initial_lr", "geometry", _ELR_SEEN)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_nonnegative(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


class SphereSGD(Optimizer):
    r"""SGD on a sphere with a fixed effective learning rate; see the module docstring.

    Args:
        params: parameters or param groups. A group's tensors form its sphere(s).
        elr: effective learning rate of scale-invariant groups (``lr = elr * rho^2``); every
            scale-invariant group needs one (here or in the group).
        momentum: heavy-ball momentum in ``[0, 1)``; on the sphere the buffer is kept tangent.
        granularity: ``"global"`` (one joint sphere per group, the paper's method), ``"tensor"``
            or ``"row"``.
        lr: step size of the groups with ``scale_invariant=False`` (plain SGD); 0 freezes them.
            Required for such groups (no default: a frozen head should be asked for).
        weight_decay: L2 penalty of non-SI groups (must be 0 in SI groups).
        project_gradient: project the gradient onto the tangent space before the step
            (the original does not; irrelevant for exactly SI losses).
        radius: the sphere radius; ``None`` keeps the initial norm of each sphere.
        scale_invariant: the default of the per-group ``"scale_invariant"`` flag.
        foreach: ``None`` picks the multi-tensor fast path when a group's tensors share device and
            dtype, ``True`` requires it, ``False`` uses the readable reference path.
        fused: ``True`` runs each scale-invariant group's whole step as one compiled graph
            (``torch.compile`` of :func:`sphere_sgd_fused_step`; compiled once per group, the ELR
            enters as a tensor so schedules never recompile; see :attr:`fused_compiles`), and
            the other groups with torch's fused SGD kernel. Where compiling is impossible it
            warns once and runs the eager step. The state is the same as eager.

    Example::

        si, other = model.scale_invariant_parameters(), model.other_parameters()
        opt = SphereSGD([{"params": si}, {"params": other, "scale_invariant": False, "lr": 0.0}],
                        elr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        elr: float | None = None,
        momentum: float = 0.0,
        granularity: str = "global",
        *,
        lr: float | None = None,
        weight_decay: float = 0.0,
        project_gradient: bool = False,
        radius: float | None = None,
        scale_invariant: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        self._fused_step = FusedStep(sphere_sgd_fused_step, "SphereSGD")
        self._scalars = ScalarSlots()
        defaults = dict(
            elr=elr,
            lr=lr,
            momentum=momentum,
            granularity=granularity,
            weight_decay=weight_decay,
            project_gradient=project_gradient,
            radius=radius,
            scale_invariant=scale_invariant,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        valid = sorted({*self.defaults, *_EXTRA_GROUP_KEYS} - {_ELR_SEEN})
        unknown = sorted(set(group) - set(valid) - {_ELR_SEEN})
        if unknown:  # a misspelt key (e.g. "granularty") would silently fall back to the default
            raise ValueError(
                f"Invalid parameter group key(s) {unknown} for SphereSGD; valid keys: "
                f"{', '.join(valid)}"
            )
        si = group.get("scale_invariant", self.defaults["scale_invariant"])
        if not isinstance(si, bool):
            raise ValueError(f"Invalid scale_invariant: {si!r} (must be a bool)")
        if si:
            # "lr" given in an SI group is the ELR alias; "elr" (group or default) otherwise.
            elr = group.get("elr", group.get("lr", self.defaults["elr"]))
            if "elr" in group and "lr" in group and group["lr"] != group["elr"]:
                raise ValueError(
                    f"Invalid lr: {group['lr']!r}; in a scale-invariant group 'lr' is an alias of "
                    f"'elr' ({group['elr']!r}), give one of them"
                )
            if elr is None:
                raise ValueError("Invalid elr: None (a scale-invariant group needs an 'elr')")
            _check_nonnegative("elr", elr)
            group["elr"] = group["lr"] = elr
            group[_ELR_SEEN] = elr
            wd = group.get("weight_decay", self.defaults["weight_decay"])
            _check_nonnegative("weight_decay", wd)
            if wd != 0:
                raise ValueError(
                    f"Invalid weight_decay: {wd} (weight decay has no effect on the sphere; "
                    "use it only in groups with scale_invariant=False)"
                )
        else:
            lr = group.get("lr", self.defaults["lr"])
            if lr is None:
                raise ValueError(
                    "Invalid lr: None (a group with scale_invariant=False needs its own 'lr'; "
                    "lr=0 freezes it)"
                )
            _check_nonnegative("lr", lr)
            group["lr"] = lr
            _check_nonnegative("weight_decay", group.get("weight_decay", 0.0))
        momentum = group.get("momentum", self.defaults["momentum"])
        if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (must be in [0, 1))")
        granularity = group.get("granularity", self.defaults["granularity"])
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"Invalid granularity: {granularity!r} (valid: {', '.join(GRANULARITIES)})"
            )
        radius = group.get("radius", self.defaults["radius"])
        if radius is not None and (
            not _is_number(radius) or not math.isfinite(radius) or radius <= 0
        ):
            raise ValueError(f"Invalid radius: {radius!r} (must be None or a finite number > 0)")
        project = group.get("project_gradient", self.defaults["project_gradient"])
        if not isinstance(project, bool):
            raise ValueError(f"Invalid project_gradient: {project!r} (must be a bool)")
        foreach = group.get("foreach", self.defaults["foreach"])
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (must be None, True or False)")
        fused = group.get("fused", self.defaults["fused"])
        check_fused({"fused": fused, "foreach": foreach, "params": _param_list(group["params"])})
        super().add_param_group(group)
        added = self.param_groups[-1]
        if added["scale_invariant"] and added["radius"] is not None and added["params"]:
            try:
                self._put_on_radius(added)
            except ValueError:
                self.param_groups.pop()
                raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, keeping sphere state (radii, momentum) in compute dtype.

        torch casts every floating-point state tensor to its parameter's dtype; for bfloat16 or
        float16 parameters that would round the radius and the momentum, so the saved float32
        values are put back (:func:`normlab.geometry.compute_dtype`, as SGD-G and Adam-G do).
        """
        super().load_state_dict(state_dict)
        keep_compute_dtype_state(self, state_dict, lambda group: group["scale_invariant"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fused_step = FusedStep(sphere_sgd_fused_step, "SphereSGD")
        self._scalars = ScalarSlots()
        for group in self.param_groups:
            group.setdefault("fused", None)
            if group["scale_invariant"]:
                group.setdefault(_ELR_SEEN, group["elr"])

    @property
    def fused_compiles(self) -> int:
        """Graphs compiled so far for ``fused=True`` groups (one per scale-invariant group)."""
        return self._fused_step.compiles

    @property
    def fused_compile_seconds(self) -> float:
        """Wall time of the steps that compiled a fused graph."""
        return self._fused_step.compile_seconds

    @property
    def fused_form(self) -> str:
        """``"in place"`` when every fused graph writes its results in place (see
        :attr:`normlab._fused.FusedStep.form` for the others)."""
        return self._fused_step.form

    @staticmethod
    def _resolve_elr(group: dict[str, Any]) -> float:
        """The ELR of this step: whichever of the aliases ``lr``/``elr`` changed (``lr`` wins)."""
        seen = group[_ELR_SEEN]
        elr = group["lr"] if group["lr"] != seen else group["elr"]
        _check_nonnegative("elr", elr)
        group["lr"] = group["elr"] = group[_ELR_SEEN] = elr
        return float(elr)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step for every group; returns ``closure()``'s loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if all(p.grad is None for p in group["params"]):
                continue  # nothing to do (also: empty groups)
            if group["scale_invariant"]:
                self._sphere_group_step(index, group)
            else:
                self._euclidean_group_step(group)
        return loss

    @staticmethod
    def _measure_radii(group: dict[str, Any]) -> list[Tensor]:
        """The current radius of every parameter's sphere(s) (global: the joint norm for all)."""
        for p in group["params"]:
            if p.is_complex() or not p.is_floating_point():
                raise ValueError("SphereSGD needs real floating-point parameters")
        # measured in at least float32 (a bfloat16 norm is off by up to 0.4 %); runs once
        params = [p.detach().to(geometry.compute_dtype(p)) for p in group["params"]]
        granularity = group["granularity"]
        if granularity == "global":
            norm = geometry.joint_norm(params)
            if not float(norm) > 0:
                raise ValueError("cannot put an all-zero parameter group on a sphere")
            return [norm for _ in params]
        radii = []
        for p in params:
            norms = geometry.row_norms(_rows_of(p, granularity), keepdim=False)
            if not bool((norms > 0).all()):
                raise ValueError(
                    f"cannot put a zero {'tensor' if granularity == 'tensor' else 'row'} "
                    f"(parameter of shape {tuple(p.shape)}) on a sphere"
                )
            radii.append(norms.reshape(()) if granularity == "tensor" else norms)
        return radii

    @torch.no_grad()
    def _put_on_radius(self, group: dict[str, Any]) -> None:
        """Rescale every sphere of the group onto ``group["radius"]`` (done when it is added)."""
        target = group["radius"]
        for p, rho in zip(group["params"], self._measure_radii(group)):
            rows = _rows_of(
                p, "tensor" if group["granularity"] == "global" else group["granularity"]
            )
            p.copy_((rows * (target / rho).reshape(-1, 1)).view_as(p))

    def _init_sphere_state(self, group: dict[str, Any]) -> None:
        radii = self._measure_radii(group)
        if group["radius"] is not None:  # already rescaled when added: record the exact value
            radii = [torch.full_like(r, group["radius"]) for r in radii]
        for p, rho in zip(group["params"], radii):
            # compute dtype: a bfloat16 radius would carry only 3 significant digits
            self.state[p]["radius"] = rho.detach().to(geometry.compute_dtype(p), copy=True)

    def _sphere_group_step(self, index: int, group: dict[str, Any]) -> None:
        params = group["params"]
        elr = self._resolve_elr(group)
        if "radius" not in self.state[params[0]]:
            self._init_sphere_state(group)
        momentum = group["momentum"]
        grads, radii, bufs = [], [], []
        for p in params:
            grad = p.grad
            if grad is None:
                grad = torch.zeros_like(p)  # a missing gradient is zero; the point still counts
            elif grad.is_sparse:
                raise RuntimeError("SphereSGD does not support sparse gradients")
            grads.append(grad)
            state = self.state[p]
            radii.append(state["radius"])
            if momentum > 0:
                # float32 for float16/bfloat16 parameters, as SGD-G/Adam-G (geometry's rule)
                cdt = geometry.compute_dtype(p)
                buf = state.get("momentum_buffer")
                if buf is None:  # first step, or momentum switched on later
                    buf = torch.zeros_like(p, dtype=cdt)
                elif buf.dtype != cdt or buf.device != p.device:
                    buf = buf.to(device=p.device, dtype=cdt)
                state["momentum_buffer"] = buf
                bufs.append(buf)
        if group["fused"] and self._run_fused(index, group, grads, bufs, radii, elr):
            return
        # the step is under no_grad: in-place updates of the (leaf) parameters are allowed
        sphere_sgd(
            params,
            grads,
            bufs if momentum > 0 else None,
            radii,
            elr=elr,
            momentum=momentum,
            granularity=group["granularity"],
            project_gradient=group["project_gradient"],
            foreach=group["foreach"],
        )

    def _run_fused(self, index, group, grads, bufs, radii, elr: float) -> bool:
        """One compiled step of scale-invariant group ``index``; False (after a one-line
        warning) when compiling is impossible, and the caller runs the eager step."""
        params = group["params"]
        use_momentum = group["momentum"] > 0
        device, cdt = params[0].device, geometry.compute_dtype(*params)
        by_row = group["granularity"] == "row"
        rows = [num_rows(p) if by_row else 1 for p in params]
        points = graph_rows(params, rows)
        bufs = graph_rows(bufs, rows) if use_momentum else []
        return self._fused_step(
            (index, group["granularity"], group["project_gradient"], use_momentum),
            (points, bufs),
            points,
            grads,  # read only: the graph reshapes them (only stores need the row views)
            bufs,
            radii,
            self._scalars.get("elr", elr, device, cdt),
            self._scalars.get("momentum", group["momentum"], device, cdt),
            granularity=group["granularity"],
            project_gradient=group["project_gradient"],
        )

    def _euclidean_group_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.SGD`` (momentum, L2 decay) via torch's functional; ``lr=0`` freezes."""
        lr, momentum = group["lr"], group["momentum"]
        if lr == 0:
            return  # frozen (e.g. the fixed head of a fully SI model): no state, no work
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("SphereSGD does not support sparse gradients")
        euclidean_sgd(
            self.state,
            params,
            grads,
            foreach=group["foreach"],
            fused=group["fused"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=lr,
            dampening=0.0,
            nesterov=False,
        )


# ------------------------------------------------------------------------------------------------
# functional form: reference (readable, built on normlab.geometry) and fast (multi-tensor) paths
# ------------------------------------------------------------------------------------------------


def _rows_of(t: Tensor, granularity: str) -> Tensor:
    """The ``(spheres, n)`` matrix of a tensor: one row for ``"tensor"``, ``(out, -1)`` for rows."""
    return t.reshape(1, -1) if granularity == "tensor" else geometry.as_rows(t)


def sphere_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    radii: list[Tensor],
    *,
    elr: float,
    momentum: float,
    granularity: str,
    project_gradient: bool,
    foreach: bool | None = None,
) -> None:
    """Functional SphereSGD step (in place on ``params`` and ``momentum_buffers``).

    ``params`` must lie on their spheres (``radii``, as recorded by :class:`SphereSGD`). ``grads``
    has one (dense) tensor per parameter; pass zeros for a missing gradient. ``momentum_buffers`` is
    required when ``momentum > 0``.
    """
    if not params:
        return
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    same_kind = len({(t.device, t.dtype) for t in params}) == 1
    if foreach is None:
        foreach = same_kind
    if foreach and not same_kind:
        raise ValueError("foreach=True needs all tensors of a group on one device with one dtype")
    cdt = geometry.compute_dtype(params[0])
    if foreach and params[0].dtype != cdt:
        # float16/bfloat16: the fast path runs on compute-dtype copies (one rounding per step,
        # as the reference path), so every fast-path op sees a single dtype
        work = [p.to(cdt) for p in params]
        sphere_sgd(
            work,
            [g.to(cdt) for g in grads],
            momentum_buffers,
            [r.to(cdt) for r in radii],
            elr=elr,
            momentum=momentum,
            granularity=granularity,
            project_gradient=project_gradient,
            foreach=True,
        )
        torch._foreach_copy_(params, work)
        return
    if foreach:
        step = {"global": _global_fast, "tensor": _tensor_fast, "row": _rows_fast}[granularity]
    else:
        step = {"global": _global_reference, "tensor": _rows_reference, "row": _rows_reference}[
            granularity
        ]
    step(
        params,
        grads,
        momentum_buffers,
        radii,
        elr=elr,
        momentum=momentum,
        granularity=granularity,
        project_gradient=project_gradient,
    )


def _param_list(params) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def sphere_sgd_fused_step(
    params, grads, momentum_buffers, radii, elr, momentum, *, granularity, project_gradient
):
    """The SphereSGD step as a **pure** function (new tensors out): what ``fused=True`` compiles.

    The maths of :func:`_global_reference` / :func:`_rows_reference` in coefficient form on
    ``(x, g, b)`` (point, gradient, momentum buffer): the direction is
    ``d = mu b + g - (<x, mu b + g>/|x|^2) x`` with momentum (buffer kept tangent),
    ``g - (<x, g>/|x|^2) x`` with ``project_gradient``, else ``g``; the moved point
    ``u = x - elr rho^2 d`` goes back onto radius ``rho`` as ``rho u/|u|``. Every inner product is
    one entry of the Gram matrix of ``(x, g, b)`` (joint sums over the group's tensors for
    ``"global"``, where ``|x|^2`` is the measured joint norm; per row or tensor otherwise, where
    ``|x|^2 = rho^2``), so each tensor is read once for the products and once for the outputs.
    ``elr``/``momentum`` are 0-d tensors; an empty ``momentum_buffers`` means no momentum.
    Returns ``(new params, new buffers)``.
    """
    use_momentum = len(momentum_buffers) > 0
    if granularity == "global":
        work = geometry.compute_dtype(*params)
        rho = radii[0].to(work)
        bufs = momentum_buffers if use_momentum else [None] * len(params)
        vectors = [  # in the point's shape: the caller passes gradients as they are
            [t.reshape(p.shape).to(work) for t in (p, g, b) if t is not None]
            for p, g, b in zip(params, grads, bufs)
        ]
        # the joint Gram matrix: the sum of every tensor's (whole-tensor) Gram matrix
        per_tensor = [_rows_gram([v.reshape(-1) for v in vs]) for vs in vectors]  # (1,)
        n = len(vectors[0])
        gram = [[sum(t[i][j] for t in per_tensor) for j in range(n)] for i in range(n)]
        d, moved = _sphere_coefficients(
            gram,
            gram[0][0].clamp_min(geometry.tiny(work)),
            elr * rho * rho,
            momentum,
            use_momentum,
            project_gradient,
        )
        norm = _rows_quad(gram, moved, moved).clamp_min(0.0).sqrt()
        scale = torch.where(norm > 0, rho / norm.clamp_min(geometry.tiny(work)), 1.0)
        new_params = [
            _rows_combine([scale * c for c in moved], vs).reshape(p.shape).to(p.dtype)
            for p, vs in zip(params, vectors)
        ]
        new_bufs = [_rows_combine(d, vs) for vs in vectors] if use_momentum else []
        return new_params, new_bufs
    new_params, new_bufs = [], []
    for i, (p, grad, rho) in enumerate(zip(params, grads, radii)):
        work = geometry.compute_dtype(p)
        vs = [_rows_of(p, granularity).to(work), _rows_of(grad, granularity).to(work)]
        if use_momentum:
            vs.append(_rows_of(momentum_buffers[i], granularity).to(work))
        rho = rho.to(work).reshape(-1, 1)
        gram = _rows_gram(vs)
        d, moved = _sphere_coefficients(
            gram, rho * rho, elr * rho * rho, momentum, use_momentum, project_gradient
        )
        norm = _rows_quad(gram, moved, moved).clamp_min(0.0).sqrt()
        scale = rho / norm.clamp_min(geometry.tiny(work))
        new_params.append(
            _rows_combine([scale * c for c in moved], vs).reshape(p.shape).to(p.dtype)
        )
        if use_momentum:
            new_bufs.append(_rows_combine(d, vs).reshape(momentum_buffers[i].shape))
    return new_params, new_bufs


def _sphere_coefficients(gram, xx, lr, momentum, use_momentum: bool, project_gradient: bool):
    """Coefficients on ``(x, g[, b])`` of the direction ``d`` and of ``u = x - lr d``."""
    if use_momentum:  # d = P_x(mu b + g)
        coef = (momentum * gram[0][2] + gram[0][1]) / xx
        d = (-coef, 1.0, momentum)
    elif project_gradient:  # d = P_x(g)
        d = (-gram[0][1] / xx, 1.0)
    else:
        d = (0.0, 1.0)
    moved = (1.0 - lr * d[0], *(-lr * c for c in d[1:]))
    return d, moved


def _global_reference(params, grads, bufs, radii, *, elr, momentum, granularity, project_gradient):
    """One joint sphere, written with :mod:`normlab.geometry` (the path the tests trust).

    Computes in at least float32 (``.to`` is a no-op for float32/float64 tensors) and writes back.
    """
    work = geometry.compute_dtype(*params)
    x = [p.to(work) for p in params]
    g = [t.to(work) for t in grads]
    rho = radii[0].to(work)
    direction = geometry.joint_project_tangent(x, g) if project_gradient else g
    if momentum > 0:
        direction = geometry.joint_project_tangent(
            x, [momentum * b.to(work) + gk for b, gk in zip(bufs, g)]
        )
        for b, d in zip(bufs, direction):
            b.copy_(d)
    lr = elr * rho * rho  # the Euclidean step size that gives ELR = elr at norm rho
    moved = [xk - lr * d for xk, d in zip(x, direction)]
    geometry.joint_rescale_(moved, rho)
    for p, m in zip(params, moved):
        p.copy_(m)


def _rows_reference(params, grads, bufs, radii, *, elr, momentum, granularity, project_gradient):
    """One sphere per tensor or per row, written with :mod:`normlab.geometry`."""
    for i, (p, g, rho) in enumerate(zip(params, grads, radii)):
        work = geometry.compute_dtype(p)
        rows = _rows_of(p, granularity).to(work)
        grad_rows = _rows_of(g, granularity).to(work)
        rho = rho.to(work).reshape(-1, 1)
        unit = rows / rho  # the point on the unit sphere(s)
        direction = grad_rows
        if project_gradient:
            direction = geometry.project_tangent(unit, direction)
        if momentum > 0:
            buf_rows = _rows_of(bufs[i], granularity).to(work)
            direction = geometry.project_tangent(unit, momentum * buf_rows + grad_rows)
            bufs[i].copy_(direction.view_as(bufs[i]))
        moved = rows - elr * rho * rho * direction
        p.copy_((rho * geometry.safe_normalize_rows(moved)).view_as(p))


def _global_fast(params, grads, bufs, radii, *, elr, momentum, granularity, project_gradient):
    """One joint sphere with multi-tensor ops: one reduction (the norm) in the plain case.

    Plain case (no momentum, no projection): ``x += -lr g`` (one fused pass), the joint norm of
    the result by ``torch._foreach_norm`` (one reduction), ``x *= rho / |u|`` (one fused pass).
    Every factor (``lr = elr rho^2``, the projection coefficient, ``rho/|u|``) stays a 0-d tensor
    of the parameters' dtype, so nothing waits on the device and nothing is rounded.
    """
    rho = radii[0]
    lr = elr * rho * rho
    lrs = [lr] * len(params)
    if momentum > 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        # keep the buffer tangent: b -= (<x, b> / rho^2) x
        coef = geometry.joint_inner(params, bufs) / (rho * rho)
        torch._foreach_addcmul_(bufs, params, [coef] * len(params), value=-1.0)
        torch._foreach_addcmul_(params, bufs, lrs, value=-1.0)
    elif project_gradient:
        # x - lr (g - c x) = (1 + lr c) x - lr g,  c = <x, g> / rho^2
        coef = geometry.joint_inner(params, grads) / (rho * rho)
        torch._foreach_mul_(params, 1.0 + lr * coef)
        torch._foreach_addcmul_(params, grads, lrs, value=-1.0)
    else:
        torch._foreach_addcmul_(params, grads, lrs, value=-1.0)
    torch._foreach_mul_(params, rho / geometry.joint_norm(params))


def _tensor_fast(params, grads, bufs, radii, *, elr, momentum, granularity, project_gradient):
    """One sphere per tensor with multi-tensor ops (per-tensor loop when momentum/projection)."""
    if momentum > 0 or project_gradient:
        _rows_fast(
            params,
            grads,
            bufs,
            radii,
            elr=elr,
            momentum=momentum,
            granularity=granularity,
            project_gradient=project_gradient,
        )
        return
    lrs = torch._foreach_mul(torch._foreach_mul(radii, radii), elr)  # lr_k = elr rho_k^2
    torch._foreach_addcmul_(params, grads, lrs, value=-1.0)  # x_k -= lr_k g_k, one pass
    torch._foreach_mul_(params, torch._foreach_div(radii, torch._foreach_norm(params)))


def _rows_fast(params, grads, bufs, radii, *, elr, momentum, granularity, project_gradient):
    """One sphere per row (or tensor): fused in-place ops per tensor on its ``(rows, n)`` view."""
    for i, (p, g, rho) in enumerate(zip(params, grads, radii)):
        if not p.is_contiguous():  # the in-place row view needs contiguous memory
            _rows_reference(
                [p],
                [g],
                None if bufs is None else [bufs[i]],
                [rho],
                elr=elr,
                momentum=momentum,
                granularity=granularity,
                project_gradient=project_gradient,
            )
            continue
        rows = p.view(p.shape[0], -1) if granularity == "row" and p.dim() > 1 else p.view(1, -1)
        grad_rows = g.reshape(rows.shape)
        rho = rho.reshape(-1, 1)
        rho_sq = rho * rho
        lr = elr * rho_sq
        if momentum > 0:
            buf_rows = bufs[i].view(rows.shape)
            buf_rows.mul_(momentum).add_(grad_rows)
            coef = torch.linalg.vecdot(rows, buf_rows).unsqueeze(-1) / rho_sq
            buf_rows.addcmul_(rows, coef, value=-1.0)
            direction = buf_rows
        elif project_gradient:
            coef = torch.linalg.vecdot(rows, grad_rows).unsqueeze(-1) / rho_sq
            rows.mul_(1.0 + lr * coef)
            direction = grad_rows
        else:
            direction = grad_rows
        rows.addcmul_(direction, lr, value=-1.0)
        rows.mul_(rho / torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=rho.dtype))
