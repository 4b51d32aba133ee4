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
from .._fused import FusedStep, ScalarSlots
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
    use_ortho = omega != 0 and _rows.ortho_applies(rows, P.shape[1])
    return tangent_rows(
        P, G, omega=omega, grad_clip=grad_clip, use_ortho=use_ortho, ortho_dtype=ortho_dtype
    )


def tangent_rows(
    P: Tensor, G: Tensor, *, omega, grad_clip, use_ortho: bool, ortho_dtype
) -> tuple[Tensor, Tensor]:
    """The tangent stage on rows ``P``, ``G`` (compute dtype) as a pure function: ``(Y, h)``.

    ``omega`` and ``grad_clip`` may be Python numbers or 0-d tensors (the compiled fused steps
    pass tensors, so a changed value never recompiles); ``use_ortho`` and whether ``grad_clip``
    is None decide the shape of the computation.
    """
    Y = geo.safe_normalize_rows(P)
    if use_ortho:
        G = G + _rows.reference_ortho_gradient(Y, omega, ortho_dtype)
    h = geo.clip_rows(geo.project_tangent(Y, G), grad_clip)
    return Y, h * (geo.row_norms(P) > 0)  # a zero row has no direction: it stays zero


def fused_rows(p: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``(out, n)`` of a parameter and its gradient in compute dtype, inside a fused graph
    (a logical reshape: the compiler reads any memory layout, ``channels_last`` included)."""
    cdt = geo.compute_dtype(p)
    rows = _rows.num_rows(p)
    return p.reshape(rows, -1).to(cdt), grad.reshape(rows, -1).to(cdt)


def graph_rows(tensors: list[Tensor], rows: list[int]) -> list[Tensor]:
    """The tensors a fused step writes, each as its ``(rows, n)`` view where the memory
    allows (contiguous), else as it is (the graph then reshapes logically).

    Why: inductor stores a result straight into its target only when the target has the shape
    of the loop that computes it. A 4-D conv weight written from ``(out, n)`` rows gets its own
    copy pass (on ResNet-18: a fused SGD-G step 1.6x torch SGD instead of 1.2x). Tensors the
    graph only reads (gradients) go in as they are: a view per tensor per step costs about 1 us
    of Python each, and the graph's own reshape is free.
    """
    return [
        t.view(r, -1) if t.is_contiguous() and t.numel() > 0 else t for t, r in zip(tensors, rows)
    ]


# The fused steps (``fused=True``) write each update as per-row linear combinations of the rows
# they read (point P, gradient G, state T): every scalar they need (norms, the tangent
# coefficient, the norm of the new momentum or step) is a quadratic form in the rows' Gram
# matrix, so the compiled graph makes one reduction pass (all inner products at once) and one
# pointwise pass (all outputs at once) over each tensor: the memory traffic of SGD with momentum.


def row_gram(vectors: list[Tensor]) -> list[list[Tensor]]:
    """``gram[i][j] = <v_i, v_j>`` per row, shape ``(rows, 1)`` (symmetric, computed once)."""
    n = len(vectors)
    gram: list[list] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            gram[i][j] = gram[j][i] = (vectors[i] * vectors[j]).sum(-1, keepdim=True)
    return gram


def quad(gram: list[list[Tensor]], a, b) -> Tensor:
    """``<sum_i a_i v_i, sum_j b_j v_j>`` per row from the Gram matrix of the ``v_i``."""
    total = 0.0
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            total = total + ai * bj * gram[i][j]
    return total


def combine(coeffs, vectors: list[Tensor]) -> Tensor:
    """``sum_i coeffs_i v_i`` (per-row coefficients broadcast over the row)."""
    out = coeffs[0] * vectors[0]
    for c, v in zip(coeffs[1:], vectors[1:]):
        out = out + c * v
    return out


@dataclass
class FusedTangent:
    """The tangent stage of a fused step: ``G`` (with the orthogonality term if any), the Gram
    matrix of ``(P, G, *state)``, and per row ``rinv = 1/|p|`` (0 for a zero row), ``yg = <y, g>``,
    ``c`` the clip factor (0 for a zero row) and ``hh = |g - <y, g> y|^2`` before clipping, so that
    ``h = c (G - yg rinv P)``."""

    G: Tensor
    gram: list[list[Tensor]]
    rinv: Tensor
    yg: Tensor
    c: Tensor
    hh: Tensor


def fused_tangent(
    P: Tensor, G: Tensor, state: list[Tensor], *, omega, grad_clip, use_ortho: bool, ortho_dtype
) -> FusedTangent:
    """:func:`tangent_rows` in coefficient form (pure; ``omega``/``grad_clip`` may be tensors)."""
    if use_ortho:
        G = G + _rows.reference_ortho_gradient(geo.safe_normalize_rows(P), omega, ortho_dtype)
    gram = row_gram([P, G, *state])
    pp = gram[0][0]
    valid = pp > 0
    rinv = torch.where(valid, pp.clamp_min(geo.tiny(P.dtype)).rsqrt(), 0.0)
    yg = gram[0][1] * rinv
    hh = (gram[1][1] - yg * yg).clamp_min(0.0)
    c = valid.to(P.dtype)
    if grad_clip is not None:
        c = c * (grad_clip / hh.sqrt().clamp_min(grad_clip))
    return FusedTangent(G, gram, rinv, yg, c, hh)


def ortho_flags(params: list[Tensor], omega) -> tuple[bool, ...]:
    """Per tensor: is the orthogonality term applied (omega != 0 and out <= n)? A static part of
    a fused step's key."""
    on = _rows.as_float(omega) != 0
    return tuple(
        on and _rows.ortho_applies(_rows.num_rows(p), p.numel() // max(_rows.num_rows(p), 1))
        for p in params
    )


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


def euclidean_sgd(state: dict, params: list[Tensor], grads: list[Tensor], **options) -> None:
    """``torch.optim.SGD``'s step on ``params`` through torch's functional ``sgd``, with the
    momentum buffers kept in ``state[p]["momentum_buffer"]``.

    torch's fused kernel (``fused=True``) takes either no momentum buffer at all (a first step)
    or one for every tensor; a tensor that gets its first gradient later (a frozen layer
    unfrozen, a branch not used at first) would make a mixed list, which it refuses. Such a step
    is run as two calls: the tensors with buffers, then those without (their first step).
    """
    bufs = [state[p].get("momentum_buffer") for p in params]
    parts = [list(range(len(params)))]
    if options.get("fused") and any(b is None for b in bufs) and any(b is not None for b in bufs):
        parts = [
            [i for i, b in enumerate(bufs) if b is not None],
            [i for i, b in enumerate(bufs) if b is None],
        ]
    for idx in parts:
        part_bufs = [bufs[i] for i in idx]
        _torch_sgd(
            [params[i] for i in idx], [grads[i] for i in idx], part_bufs, maximize=False, **options
        )
        if options["momentum"] != 0:
            for i, buf in zip(idx, part_bufs):
                state[params[i]]["momentum_buffer"] = buf


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
        "fused": None,
    }
    #: group-key aliases of the original code: alias -> (key, index or None)
    _aliases: dict = {}

    def __init__(self, params, defaults: dict, lr_manifold: float | None = None):
        self._scratch = _rows.ScratchPool()
        self._fused_step = FusedStep(self._fused_function(), self._name)
        self._scalars = ScalarSlots()
        self._lr_manifold = lr_manifold
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._scratch = _rows.ScratchPool()
        self._fused_step = FusedStep(self._fused_function(), self._name)
        self._scalars = ScalarSlots()
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
        for index, group in enumerate(self.param_groups):
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
                if group["fused"] and self._run_fused(index, group, params, grads):
                    continue
                self._manifold_step(group, params, grads)
            elif group.get("euclidean", "sgd") == "sgd":
                self._euclidean_sgd(group, params, grads)
            else:
                self._euclidean_adam(group, params, grads)
        return loss

    def _manifold_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ fused step
    @property
    def fused_compiles(self) -> int:
        """Graphs compiled so far for ``fused=True`` groups (one per group and option set; an LR
        schedule never adds one: rates enter as tensors)."""
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

    def _fused_function(self) -> Callable:
        """The pure step function of a manifold group (see :mod:`normlab._fused`)."""
        raise NotImplementedError

    def _run_fused(self, index: int, group: dict, params: list[Tensor], grads: list[Tensor]):
        """One compiled step of manifold group ``index``; False when compiling is impossible
        (after a one-line warning), and the caller runs the eager step."""
        raise NotImplementedError

    def _fused_state(self, p: Tensor, key: str, shape: tuple | None = None) -> Tensor:
        """``state[p][key]`` in compute dtype on p's device, any memory layout (the compiled
        step reads it logically); zeros at first."""
        buf = self.state[p].get(key)
        cdt = geo.compute_dtype(p)
        if buf is None:
            buf = torch.zeros(p.shape if shape is None else shape, dtype=cdt, device=p.device)
        elif buf.dtype != cdt or buf.device != p.device:
            buf = buf.to(device=p.device, dtype=cdt)
        self.state[p][key] = buf
        return buf

    def _scalar(self, name: str, value, params: list[Tensor]) -> Tensor:
        """A hyper-parameter as a 0-d tensor on the group's device, in its compute dtype."""
        return self._scalars.get(name, value, params[0].device, geo.compute_dtype(*params))

    def _fused_tangent_args(self, group: dict, params: list[Tensor]):
        """What the tangent stage adds to a fused step: its static key (clipping on/off, which
        tensors get the orthogonality term, ``ortho_dtype``) and ``omega``/``grad_clip`` as
        tensors (``grad_clip`` None when off)."""
        ortho = ortho_flags(params, group["omega"])
        key = (group["grad_clip"] is not None, ortho, group["ortho_dtype"])
        omega = self._scalar("omega", group["omega"], params)
        clip = group["grad_clip"]
        return key, omega, None if clip is None else self._scalar("clip", clip, params)

    def _euclidean_sgd(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """``torch.optim.SGD`` (L2 decay, momentum, dampening, Nesterov) via torch's functional."""
        euclidean_sgd(
            self.state,
            params,
            grads,
            foreach=group["foreach"],
            fused=group["fused"],
            weight_decay=_rows.as_float(group["weight_decay"]),
            momentum=_rows.as_float(group["momentum"]),
            lr=_rows.as_float(group["lr"]),
            dampening=_rows.as_float(group["dampening"]),
            nesterov=group["nesterov"],
        )

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
            fused=group["fused"],
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=_rows.as_float(beta1),
            beta2=_rows.as_float(beta2),
            lr=_rows.as_float(group["lr"]),
            weight_decay=_rows.as_float(group["weight_decay"]),
            eps=_rows.as_float(group["eps"]),
            maximize=False,
        )
