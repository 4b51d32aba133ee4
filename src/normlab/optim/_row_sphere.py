"""The shared base of the row-sphere optimizers SGD-G and Adam-G (Cho & Lee 2017).

SGD-G and Adam-G differ only in how they turn the clipped Riemannian gradient ``h`` of a row into
a step (a momentum displacement, or a first/second moment pair). Everything else is written once
here:

* the **tangent stage** (per row ``i`` of a weight viewed as ``(out, n)``)::

      y = p / |p|                                  re-normalized point
      g = grad + 2 omega offdiag(Y Y^T) Y          orthogonality term (omega > 0 and out <= n)
      h = clip_nu(g - <y, g> y)                    Riemannian gradient, per-row clipping
      h = 0 for a zero row                         (no direction: it stays zero)

  as a readable reference (:func:`reference_tangent`, built on :mod:`normlab.geometry`) and as the
  first two phases of the fast path (:func:`fast_tangent`: three fused row reductions per tensor,
  then the per-row scalars of ``h = c g + c_p p`` for all rows of a bucket at once);
* **buckets** of tensors that share device and compute dtype (:func:`buckets`);
* **state handling**: ``__setstate__`` defaults, ``add_param_group`` (aliases, unknown keys,
  validation, unit rows), ``load_state_dict`` (float32 manifold state for float16/bfloat16
  parameters, by the rule of :func:`normlab.geometry.compute_dtype`);
* the **Euclidean groups**, through torch's own functional ``torch.optim.sgd.sgd`` and
  ``torch.optim.adam.adam`` (so they are ``torch.optim.SGD`` / ``torch.optim.Adam`` exactly).

Rates: ``lr`` is the Euclidean learning rate; a manifold group's rate is ``lr_manifold`` (the
paper's ``lrg`` is accepted as an alias). Both are stored in the group's ``"lr"`` key, the one
that ``torch.optim.lr_scheduler`` scales, so one schedule decays ``lr`` and ``lrg`` together as
the authors' code does.

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603);
/work/shared/notes/riemannian_bn.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from .. import geometry as geo
from . import _rows

__all__ = ["RowSphereOptimizer", "reference_tangent", "buckets", "fast_tangent", "TangentRows"]

#: group keys every row-sphere optimizer accepts besides its defaults: torch's and the pipeline's
EXTRA_GROUP_KEYS = ("params", "name", "initial_lr")
#: aliases of the manifold rate (resolved into the group's "lr" when the group is added)
MANIFOLD_RATE_KEYS = ("lr_manifold", "lrg")


# ----------------------------------------------------------------------------------------------
# the tangent stage: reference and fast path
# ----------------------------------------------------------------------------------------------


def reference_tangent(
    p: Tensor, grad: Tensor, *, omega: float, grad_clip, ortho_dtype
) -> tuple[Tensor, Tensor]:
    """``(Y, h)``: unit rows of ``p`` and the clipped Riemannian gradient, in compute dtype."""
    cdt = geo.compute_dtype(p)
    rows = _rows.num_rows(p)
    P = p.reshape(rows, -1).to(cdt)
    G = grad.reshape(rows, -1).to(cdt)
    Y = geo.safe_normalize_rows(P)
    if omega != 0 and _rows.ortho_applies(rows, P.shape[1]):
        G = G + _rows.reference_ortho_gradient(Y, omega, ortho_dtype)
    h = geo.clip_rows(geo.project_tangent(Y, G), grad_clip)
    return Y, h * (geo.row_norms(P) > 0)  # a zero row has no direction: it stays zero


@dataclass
class Bucket:
    """Tensors of one device and compute dtype, as row slots with consecutive row offsets."""

    device: torch.device
    cdt: torch.dtype
    idx: list[int]
    slots: list[_rows.RowSlot]
    total: int
    work_flat: Tensor  # one scratch buffer the size of the largest tensor

    def work(self, s: _rows.RowSlot) -> Tensor:
        return self.work_flat[: s.P.numel()].view(s.P.shape)


def buckets(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    scratch: _rows.ScratchPool,
) -> Iterator[Bucket]:
    """Row slots of the parameters (``bufs[i]``: the row-shaped state tensor of ``params[i]``)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, geo.compute_dtype(p)), []).append(i)
    for (device, cdt), idx in groups.items():
        slots, offset, max_numel = [], 0, 0
        for i in idx:
            slot = _rows.prepare_rows(params[i], grads[i], [bufs[i]], offset)
            slots.append(slot)
            offset += slot.rows
            max_numel = max(max_numel, slot.P.numel())
        yield Bucket(device, cdt, idx, slots, offset, scratch.take((max_numel,), cdt, device))


@dataclass
class TangentRows:
    """Per-row scalars (shape ``(rows, 1)``) of ``h = c (g - <y, g> y)`` for a bucket.

    ``rinv = 1/|p|`` (0 for a zero row), ``yg = <y, g>``, ``c`` the clip factor (0 for a zero
    row), ``hh = |g - <y, g> y|^2`` before clipping (None unless asked for).
    """

    rinv: Tensor
    yg: Tensor
    c: Tensor
    hh: Tensor | None


def fast_tangent(
    b: Bucket, scratch: _rows.ScratchPool, *, omega, grad_clip, ortho_dtype, need_hh: bool
) -> TangentRows:
    """Phases 1-2 of the fast path: orthogonality term (two GEMMs, into ``slot.G``), the row
    reductions ``|p|, <p, g>, |g|`` per tensor, then the clipped tangent gradient's scalars."""
    need_gg = need_hh or grad_clip is not None
    scal = scratch.take((3, b.total, 1), b.cdt, b.device)
    norm_p, dot_pg, norm_g = scal[0], scal[1], scal[2]
    for s in b.slots:
        P, sl = s.P, slice(s.offset, s.offset + s.rows)
        torch.linalg.vector_norm(P, dim=1, keepdim=True, out=norm_p[sl])
        if omega != 0 and _rows.ortho_applies(s.rows, P.shape[1]):
            out = scratch.take(tuple(P.shape), b.cdt, b.device)
            s.G = _rows.add_ortho_gradient(P, s.G, omega, out, norm_p[sl], ortho_dtype)
        work = b.work(s)
        torch.mul(P, s.G, out=work)
        torch.sum(work, dim=1, keepdim=True, out=dot_pg[sl])
        if need_gg:
            torch.linalg.vector_norm(s.G, dim=1, keepdim=True, out=norm_g[sl])
    valid = norm_p > 0
    rinv = torch.where(valid, norm_p.clamp_min(geo.tiny(b.cdt)).reciprocal(), 0.0)
    yg = dot_pg * rinv
    c = valid.to(b.cdt)
    hh = None
    if need_gg:
        hh = (norm_g.square() - yg.square()).clamp_min_(0.0)  # |h|^2 before clipping
    if grad_clip is not None:
        c = c * (grad_clip / hh.sqrt().clamp_min(grad_clip))
    return TangentRows(rinv, yg, c, hh)


def write_back(b: Bucket) -> None:
    """Copy staged rows (low precision, non-dense layouts) back into the parameters."""
    for s in b.slots:
        if s.stage is not None:
            s.stage.copy_(s.P)


def keep_compute_dtype_state(
    opt: Optimizer, state_dict: dict, on_sphere: Callable[[dict], bool]
) -> None:
    """After ``Optimizer.load_state_dict``: put the saved floating state of the parameters of
    sphere groups (``on_sphere(group)``) back in :func:`normlab.geometry.compute_dtype`.

    torch casts floating state to its parameter's dtype, which for float16/bfloat16 parameters
    rounds the float32 state (a resumed step then differs from the uninterrupted one). ``step``
    counters keep torch's handling; Euclidean groups keep torch's rule.
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(p, on_sphere(g)) for g in opt.param_groups for p in g["params"]]
    for pid, (p, sphere) in zip(saved_ids, params):
        cdt = geo.compute_dtype(p)
        if not sphere or cdt == p.dtype or pid not in state_dict["state"]:
            continue
        for key, value in state_dict["state"][pid].items():
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                opt.state[p][key] = value.to(device=p.device, dtype=cdt, copy=True)


# ----------------------------------------------------------------------------------------------
# the optimizer base
# ----------------------------------------------------------------------------------------------


def _check_dampening(group: dict) -> None:
    d = group["dampening"]
    _rows.check_range("dampening value", d, 0.0, 1.0, open_high=False)
    if _rows.as_float(d) != 0 and group["nesterov"]:
        raise ValueError("Invalid dampening: Nesterov momentum requires zero dampening")
    if _rows.as_float(d) != 0 and group["grassmann"]:
        raise ValueError(
            f"Invalid dampening: {d} in a grassmann group (the manifold momentum has no "
            "dampening, and the authors' code ignores it there); use dampening only in "
            "Euclidean groups"
        )


class RowSphereOptimizer(Optimizer):
    """Base of :class:`normlab.optim.SGDG` and :class:`normlab.optim.AdamG`.

    Subclasses set ``_name``, ``_setstate_defaults`` and ``_aliases`` and implement
    ``_validate(group)`` and ``_manifold_step(group, params, grads)``.
    """

    _name = "RowSphereOptimizer"
    #: group keys added by later versions, for optimizers pickled before them
    _setstate_defaults: dict = {
        "nesterov": False,
        "omega": 0.0,
        "grad_clip": None,
        "grassmann": False,
        "ortho_dtype": None,
        "foreach": None,
        "dampening": 0.0,
    }
    #: group-key aliases of the original code: alias -> (key, index or None)
    _aliases: dict = {}

    def __init__(self, params, defaults: dict, lr_manifold: float | None = None):
        self._scratch = _rows.ScratchPool()
        self._lr_manifold = lr_manifold
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._scratch = _rows.ScratchPool()
        self.__dict__.setdefault("_lr_manifold", None)
        for group in self.param_groups:
            for key, value in self._setstate_defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ groups
    def _valid_keys(self) -> list[str]:
        return sorted({*self.defaults, *EXTRA_GROUP_KEYS, *MANIFOLD_RATE_KEYS, *self._aliases})

    def _resolve_aliases(self, group: dict) -> dict:
        group = dict(group)
        unknown = sorted(set(group) - set(self._valid_keys()))
        if unknown:
            raise ValueError(
                f"Invalid parameter group key(s) {unknown} for {self._name}; valid keys: "
                f"{', '.join(self._valid_keys())}"
            )
        # the manifold rate: lr_manifold / lrg (paper) > the group's lr > the constructor's
        rates = {k: group.pop(k) for k in MANIFOLD_RATE_KEYS if k in group}
        if len({_rows.as_float(v) for v in rates.values()}) > 1:
            raise ValueError(f"Invalid manifold rate: {rates} disagree (give one of them)")
        grassmann = group.get("grassmann", self.defaults["grassmann"])
        if rates:
            if grassmann is not True:
                raise ValueError(
                    f"Invalid key {next(iter(rates))!r} in a group without grassmann=True "
                    "(the manifold rate applies to manifold groups; use 'lr' here)"
                )
            rate = next(iter(rates.values()))
            if "lr" in group and _rows.as_float(group["lr"]) != _rows.as_float(rate):
                raise ValueError(
                    f"Invalid lr: {group['lr']} and {next(iter(rates))}={rate} in one manifold "
                    "group (the manifold rate is stored in 'lr'; give one of them)"
                )
            group["lr"] = rate
        elif grassmann is True and "lr" not in group and self._lr_manifold is not None:
            group["lr"] = self._lr_manifold
        for alias, (key, index) in self._aliases.items():
            if alias not in group:
                continue
            value = group.pop(alias)
            if index is None:
                if key in group and group[key] != value:
                    raise ValueError(f"Invalid {alias}: {value} disagrees with {key}={group[key]}")
                group[key] = value
            else:
                current = list(group.get(key, self.defaults[key]))
                if key in group and current[index] != value:
                    raise ValueError(f"Invalid {alias}: {value} disagrees with {key}={current}")
                current[index] = value
                group[key] = tuple(current)
        return group

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: resolve aliases, refuse unknown keys, validate, unit-normalize rows."""
        super().add_param_group(self._resolve_aliases(param_group))
        group = self.param_groups[-1]
        try:
            _rows.validate_common(group)
            _check_dampening(group)
            self._validate(group)
        except ValueError:
            self.param_groups.pop()
            raise
        if group["grassmann"]:
            for p in group["params"]:
                _rows.normalize_rows_(p)

    def _validate(self, group: dict) -> None:
        """Subclass checks of a group (raise ValueError)."""

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch, but the manifold state of float16/bfloat16 parameters stays float32.

        torch casts floating state to the parameter's dtype; the manifold state follows the rule
        of :func:`normlab.geometry.compute_dtype` instead. Euclidean groups keep torch's rule
        (state in the parameter's dtype), as ``torch.optim.SGD``/``Adam`` need.
        """
        super().load_state_dict(state_dict)
        keep_compute_dtype_state(self, state_dict, lambda group: group["grassmann"])

    def _state_buffer(self, p: Tensor, key: str, shape: tuple | None = None) -> Tensor:
        """``state[p][key]`` in compute dtype on p's device (zeros at first), rows conforming."""
        state = self.state[p]
        cdt = geo.compute_dtype(p)
        buf = state.get(key)
        if buf is None:
            if shape is None:
                buf = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
            else:
                buf = torch.zeros(shape, dtype=cdt, device=p.device)
        elif buf.dtype != cdt or buf.device != p.device:
            buf = buf.to(device=p.device, dtype=cdt)
        if shape is None:
            buf = _rows.conform_layout(buf, _rows.state_perm(p))
        state[key] = buf
        return buf

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._scratch.reset()
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._name} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
            if not params:
                continue
            if group["grassmann"]:
                self._manifold_step(group, params, grads)
            elif group.get("euclidean", "sgd") == "sgd":
                self._euclidean_sgd(group, params, grads)
            else:
                self._euclidean_adam(group, params, grads)
        return loss

    def _manifold_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    def _euclidean_sgd(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """``torch.optim.SGD`` (L2 decay, momentum, dampening, Nesterov) via torch's functional."""
        momentum = _rows.as_float(group["momentum"])
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        _torch_sgd(
            params,
            grads,
            bufs,
            foreach=group["foreach"],
            weight_decay=_rows.as_float(group["weight_decay"]),
            momentum=momentum,
            lr=_rows.as_float(group["lr"]),
            dampening=_rows.as_float(group["dampening"]),
            nesterov=group["nesterov"],
            maximize=False,
        )
        if momentum != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _euclidean_adam(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """``torch.optim.Adam`` (L2 decay, not decoupled) via torch's functional."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=group["foreach"],
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=_rows.as_float(beta1),
            beta2=_rows.as_float(beta2),
            lr=_rows.as_float(group["lr"]),
            weight_decay=_rows.as_float(group["weight_decay"]),
            eps=_rows.as_float(group["eps"]),
            maximize=False,
        )
