"""Private helpers shared by :mod:`normlab.optim.sgdg` and :mod:`normlab.optim.adamg`.

* row layouts: a weight seen as rows ``(out, n)`` **in memory order**, so that a ``channels_last``
  conv weight is updated in place without copies (every row operation of the sphere is invariant
  under one common permutation of the coordinates inside a row);
* a scratch pool that hands out the same buffers every step (no page faults from fresh large
  allocations on CPU);
* the orthogonality-regularizer gradient with two matrix products;
* hyper-parameter validation.

The compute-dtype rule and the norm floor live in :mod:`normlab.geometry`; the optimizer base and
the Euclidean groups in :mod:`normlab.optim._row_sphere`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import geometry as geo


def as_float(x) -> float:
    """A hyper-parameter as a Python float (LR schedulers may store 0-d tensors)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def check_range(name: str, value, low: float, high: float | None = None, *, open_high=True):
    """Raise ``ValueError("Invalid name: value")`` unless low <= value (< or <=) high."""
    v = as_float(value)
    ok = v >= low and not math.isnan(v)
    if high is not None:
        ok = ok and (v < high if open_high else v <= high)
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")


def validate_common(group: dict) -> None:
    """Checks shared by SGDG and AdamG groups (torch.optim wording)."""
    check_range("learning rate", group["lr"], 0.0)
    check_range("momentum value", group["momentum"], 0.0, 1.0)
    check_range("weight_decay value", group["weight_decay"], 0.0)
    check_range("omega value", group["omega"], 0.0)
    if group["grad_clip"] is not None and not as_float(group["grad_clip"]) > 0:
        raise ValueError(
            f"Invalid grad_clip value: {group['grad_clip']} (use None for no clipping)"
        )
    if group["nesterov"] and as_float(group["momentum"]) <= 0:
        raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0")
    if not isinstance(group["grassmann"], bool):
        raise ValueError(f"Invalid grassmann flag: {group['grassmann']!r} (expected a bool)")
    check_ortho_dtype(group["ortho_dtype"])
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"Invalid foreach: {group['foreach']!r}")
    check_fused(group)
    if group["grassmann"]:
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(
                    f"Invalid parameter: a grassmann parameter must be real float, got {p.dtype}"
                )


def check_fused(group: dict) -> None:
    """``fused`` is None/False (eager) or True, never together with an explicit ``foreach``, and a
    fused group lives on one device (its step is one compiled graph)."""
    fused = group.get("fused")
    if fused not in (None, True, False):
        raise ValueError(f"Invalid fused: {fused!r} (expected None, False or True)")
    if fused and group["foreach"] is not None:
        raise ValueError(
            f"Invalid fused=True with foreach={group['foreach']}: fused replaces both step paths; "
            "leave foreach=None"
        )
    if fused and len({p.device for p in group["params"]}) > 1:
        raise ValueError("Invalid fused=True: the parameters of a fused group must share a device")


def normalize_rows_(p: Tensor) -> None:
    """Scale every row of ``p`` (viewed as ``(out, n)``) to unit norm in place; zero rows stay 0."""
    with torch.no_grad():
        rows = p.reshape(p.shape[0] if p.dim() > 1 else 1, -1).to(geo.compute_dtype(p))
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        p.copy_((rows / norms.clamp_min(geo.tiny(rows.dtype))).reshape(p.shape))


# ----------------------------------------------------------------------------------------------
# row layouts
# ----------------------------------------------------------------------------------------------


def num_rows(t: Tensor) -> int:
    return t.shape[0] if t.dim() > 1 else 1


def row_perm(t: Tensor) -> tuple[int, ...] | None:
    """Permutation (dim 0 first) under which ``t`` is contiguous, or None when there is none.

    For a contiguous tensor it is the identity; for a ``channels_last`` conv weight
    ``(out, in, kh, kw)`` it is ``(0, 2, 3, 1)``. Rows of ``t.permute(perm).view(out, -1)`` then
    alias ``t`` and hold each filter's coordinates in memory order.
    """
    if t.is_contiguous():
        return tuple(range(t.dim()))
    if t.dim() <= 1:
        return None
    inner = sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
    perm = (0, *inner)
    return perm if t.permute(perm).is_contiguous() else None


def rows_view(t: Tensor, perm: tuple[int, ...]) -> Tensor:
    """``(rows, n)`` matrix of ``t`` in the coordinate order ``perm``; a view when possible."""
    if t.is_contiguous() and perm == tuple(range(t.dim())):
        return t.view(num_rows(t), -1)
    return t.permute(perm).reshape(num_rows(t), -1)


def conform_layout(buf: Tensor, perm: tuple[int, ...]) -> Tensor:
    """``buf`` itself when ``buf.permute(perm)`` is contiguous, else a re-laid-out copy that is.

    Used for state loaded from a checkpoint saved with a different memory format.
    """
    if buf.permute(perm).is_contiguous():
        return buf
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return buf.permute(perm).contiguous().permute(inverse)


@dataclass
class RowSlot:
    """One manifold tensor prepared for the fast path.

    ``P``: rows of the point in compute dtype (aliases the parameter unless ``stage`` is set),
    ``G``: rows of the gradient, ``bufs``: rows of the state buffers, ``stage``: the parameter's
    row view to copy ``P`` back into after the update (low precision or non-dense layouts).
    """

    P: Tensor
    G: Tensor
    bufs: list[Tensor]
    stage: Tensor | None
    rows: int
    offset: int


def prepare_rows(p: Tensor, grad: Tensor, bufs: list[Tensor], offset: int) -> RowSlot:
    """Row views of a parameter, its gradient and its (already conforming) state buffers."""
    cdt = geo.compute_dtype(p)
    perm = row_perm(p)
    stage = None
    if perm is not None and p.dtype == cdt:
        P = rows_view(p, perm)
    else:
        perm = perm if perm is not None else tuple(range(p.dim()))
        stage = rows_view(p, perm)
        P = stage.to(cdt, copy=True)
    G = rows_view(grad, perm)
    if G.dtype != cdt:
        G = G.to(cdt)
    rows = num_rows(p)
    return RowSlot(P, G, [b.permute(perm).view(rows, -1) for b in bufs], stage, rows, offset)


def state_perm(p: Tensor) -> tuple[int, ...]:
    """The coordinate order used for ``p``'s rows (identity when p has no dense permutation)."""
    perm = row_perm(p)
    return perm if perm is not None else tuple(range(p.dim()))


class ScratchPool:
    """Flat buffers handed out in the same order every step and reused across steps.

    Large fresh allocations on CPU go through mmap and pay page faults on first touch; reusing
    buffers keeps a step's memory traffic close to the arithmetic's. Not part of the state.
    """

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        i = self._next
        self._next += 1
        if i < len(self._buffers):
            b = self._buffers[i]
            if b.dtype == dtype and b.device == device and b.numel() >= numel:
                return b[:numel].view(shape)
        b = torch.empty(numel, dtype=dtype, device=device)
        if i < len(self._buffers):
            self._buffers[i] = b
        else:
            self._buffers.append(b)
        return b.view(shape)

    def clear(self) -> None:
        self._buffers.clear()
        self._next = 0


# ----------------------------------------------------------------------------------------------
# orthogonality regularizer
# ----------------------------------------------------------------------------------------------


def ortho_applies(rows: int, n: int) -> bool:
    """The penalty ||Y Y^T - I||^2 can reach 0 only if rows <= n; it is applied only then."""
    return rows <= n


def add_ortho_gradient(
    P: Tensor,
    G: Tensor,
    omega: float,
    out: Tensor,
    row_norms: Tensor,
    ortho_dtype: torch.dtype | None = None,
) -> Tensor:
    """``out = G + 2 omega offdiag(Y Y^T) Y`` with ``Y`` the row-normalized ``P``.

    The gradient of (omega/2)||Y Y^T - I||_F^2 at unit rows is ``2 omega (Y Y^T Y - Y)``; its
    diagonal part ``(Y Y^T)_ii y_i - y_i`` is radial (along ``y_i``) and is removed exactly by the
    tangent projection that follows, so only the off-diagonal part is added (less cancellation).
    With ``A = P P^T`` and ``r_i = |p_i|`` (``row_norms``, shape ``(rows, 1)``):
    ``(offdiag(Y Y^T) Y)_i = sum_{j != i} A_ij/(r_i r_j^2) p_j``, i.e. two matrix products per
    tensor (``P P^T`` and one ``addmm`` that also adds ``G``): 4 rows^2 n flops.

    ``ortho_dtype`` (e.g. ``torch.bfloat16``) runs both products in that dtype (float32
    accumulation on CPU/GPU matrix units); the scaling and the sum stay in ``P``'s dtype.
    """
    low = ortho_dtype is not None and ortho_dtype != P.dtype
    Pm = P.to(ortho_dtype) if low else P
    A = torch.mm(Pm, Pm.t())
    if low:
        A = A.to(P.dtype)
    r = row_norms.reshape(-1)
    rinv = torch.where(r > 0, r.clamp_min(geo.tiny(P.dtype)).reciprocal(), 0.0)
    A.mul_(rinv.unsqueeze(1)).mul_((rinv * rinv).unsqueeze(0))
    A.diagonal().zero_()
    if low:
        return torch.add(G, torch.mm(A.to(ortho_dtype), Pm), alpha=2.0 * omega, out=out)
    return torch.addmm(G, A, P, alpha=2.0 * omega, out=out)


def reference_ortho_gradient(Y: Tensor, omega: float, ortho_dtype: torch.dtype | None) -> Tensor:
    """``2 omega (Y Y^T Y - Y)`` for unit rows ``Y`` (products in ``ortho_dtype`` if given)."""
    Ym = Y.to(ortho_dtype) if ortho_dtype is not None else Y
    return 2.0 * omega * ((Ym @ Ym.t() @ Ym).to(Y.dtype) - Y)


def check_ortho_dtype(value) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"Invalid ortho_dtype: {value!r} (None or a floating torch.dtype)")
