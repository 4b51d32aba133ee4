"""One whole ENorm cycle as a single compiled function (``ENorm(..., fused=True)``).

The cycle of :class:`~normlab.enorm.balance.Balancer` (either order, optimizer state included)
is re-expressed as a pure function of the parameters and state tensors that returns new
tensors, compiled with :class:`normlab._fused.FusedStep` (inductor: vectorized C++ loops on a
CPU, generated kernels on a GPU), which writes the results into the parameters and the
optimizer's state tensors inside the graph (or, where inductor cannot compile that, copies them
after a pure graph; see :mod:`normlab._fused`). The state tensors stay the optimizer's own.

Formulation. With ``D`` the vector of factors chosen so far in the sweep (one per variable,
index N the frozen slot, always one), entry (g, i, j) of a slot currently equals
``w_gij * D[row_gi] / D[col_gj]``, so every energy is a reduction of |w|^p weighted by powers of
gathered ``D`` (no intermediate rescaling):

* row energy of row i: ``D[row_i]^p * sum_j |w_ij|^p * D[col_j]^(-p)``;
* column energy of column j: ``D[col_j]^(-p) * sum_i |w_ij|^p * D[row_i]^p``.

Both orders walk the blocks (groups) input to output: a block's energies (the sequential sweep
weights them with the earlier blocks' factors, the simultaneous cycle takes the start-of-cycle
weights), its factors into ``D``, then every slot whose blocks are all done becomes
``w * D[rows] / D[cols]`` and its state tensors ``t * (D[rows] / D[cols])^k``, so that the
generated loops rescale a layer soon after reading it. This is the eager computation reordered:
both paths agree to rounding (tested to 1e-10 in float64). Rows and columns that are a run of
consecutive channels (each repeated over a conv's taps) read their factors as slices.

Compiled once per ENorm object and per layout of the optimizer state (which parameters have
which state tensors: momentum buffers appear at the first ``optimizer.step()``, so a cycle run
before it compiles a second, state-free graph). Nothing in the graph depends on learning rates
or step counts; c and p are fixed at construction and part of the traced constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._fused import FusedStep
from .balance import Balancer

__all__ = ["FusedCycle"]


@dataclass(frozen=True)
class _SlotSpec:
    """What the compiled cycle needs to know of one slot (static, part of the graph)."""

    shape3: tuple[int, int, int]
    row_shape: tuple[int, ...] | None  # rescaling layout of a row / column factor vector
    col_shape: tuple[int, ...] | None
    mat_shape: tuple[int, ...]
    has_rows: bool
    has_cols: bool
    balanced: bool
    row_w: float | None  # constant depth weight of the row energies (None: per-entry tensor)
    col_w: float | None
    row_run: tuple[int, int, int] | None  # (start, m, k): rows == start + arange(m) k times each
    col_run: tuple[int, int, int] | None


@dataclass(frozen=True)
class _BlockSpec:
    start: int
    stop: int
    producers: tuple[int, ...]  # balanced slots with rows in the block
    consumers: tuple[int, ...]  # slots with columns in the block
    finalize: tuple[int, ...]  # slots whose last block this is: rescaled right after it


@dataclass(frozen=True)
class _Spec:
    n: int
    p: float
    exponent: float
    acc_dtype: torch.dtype
    sequential: bool
    slots: tuple[_SlotSpec, ...]
    blocks: tuple[_BlockSpec, ...]


def _pow(v: torch.Tensor, p: float) -> torch.Tensor:
    return v * v if p == 2.0 else v.pow(p)


def _factors(a: torch.Tensor, b: torch.Tensor, exponent: float) -> torch.Tensor:
    """(B / A)^exponent; one for a dead channel (0/0, x/0, 0/x), as in Balancer._factors."""
    ratio = b / a
    bad = torch.isnan(ratio) | torch.isposinf(ratio) | (ratio == 0)
    return torch.where(bad, torch.ones_like(ratio), ratio).pow(exponent)


def _run(index: torch.Tensor | None) -> tuple[int, int, int] | None:
    """``(start, m, k)`` if ``index`` is ``start + arange(m)`` with each entry repeated k times.

    Such an index (a Linear's rows or columns, a conv's columns: a channel over its k taps) is
    read as a slice of the factor vector, which the compiled loops load contiguously, instead
    of a gather (scalar loads with bounds checks in the innermost loop).
    """
    if index is None or index.numel() == 0:
        return None
    index = index.cpu()
    start = int(index[0])
    k = int((index == start).sum())
    if index.numel() % k:
        return None
    m = index.numel() // k
    if bool((index == torch.arange(start, start + m).repeat_interleave(k)).all()):
        return start, m, k
    return None


def _gather(v: torch.Tensor, index: torch.Tensor, run) -> torch.Tensor:
    """``v[index]``, as a slice (expanded over the k repeats) when ``index`` is a run."""
    if run is None:
        return v[index]
    start, m, k = run
    piece = v[start : start + m]
    return piece if k == 1 else piece.view(m, 1).expand(m, k).reshape(m * k)


def _make_cycle(spec: _Spec):
    """The pure cycle for ``spec``; ``state_powers``: (slot index, power) per state tensor."""

    def cycle(state_powers, weights, states, rows, cols, row_ws, col_ws):
        n, p, acc = spec.n, spec.p, spec.acc_dtype
        device = weights[0].device
        powered = {}

        def absp(i):  # |w|^p as (G, R, C) in the accumulation dtype
            x = powered.get(i)
            if x is None:
                x = weights[i].view(spec.slots[i].shape3).to(acc)
                x = x * x if p == 2.0 else x.abs().pow(p)
                powered[i] = x
            return x

        def row_energy(i, d, dinv):
            s = spec.slots[i]
            g, nr, nc = s.shape3
            x = absp(i)
            if s.has_cols and dinv is not None:
                x = x * _pow(_gather(dinv, cols[i], s.col_run), p).view(g, 1, nc)
            e = x.sum(2).reshape(-1)
            if d is not None:
                e = e * _pow(_gather(d, rows[i], s.row_run), p)
            return e * (row_ws[i] if s.row_w is None else s.row_w)

        def col_energy(i, d, dinv):
            s = spec.slots[i]
            g, nr, nc = s.shape3
            x = absp(i)
            if s.has_rows and d is not None:
                x = x * _pow(_gather(d, rows[i], s.row_run), p).view(g, nr, 1)
            e = x.sum(1).reshape(-1)
            if dinv is not None:
                e = e * _pow(_gather(dinv, cols[i], s.col_run), p)
            return e * (col_ws[i] if s.col_w is None else s.col_w)

        def scaled(i, t, k, d, dinv):
            s = spec.slots[i]
            if k == -1:
                r, q = dinv, d
            elif k == 1:
                r, q = d, dinv
            elif k == -2:
                r, q = dinv * dinv, d * d
            else:
                r, q = d.pow(k), dinv.pow(k)
            m = t.view(s.mat_shape)
            if s.has_rows:
                m = m * _gather(r, rows[i], s.row_run).to(t.dtype).view(s.row_shape or -1)
            if s.has_cols:
                m = m * _gather(q, cols[i], s.col_run).to(t.dtype).view(s.col_shape or -1)
            return m.view(t.shape)

        def block_add(acc_b, block, index, run, e):
            """acc_b (the block's channels, None: zeros) + e scattered by ``index``."""
            if run is not None and block.start <= run[0] and run[0] + run[1] <= block.stop:
                start, m, k = run
                e = e.view(m, k).sum(1) if k > 1 else e
                lo = start - block.start
                if lo == 0 and m == block.stop - block.start:
                    return e if acc_b is None else acc_b + e
                if acc_b is None:
                    acc_b = torch.zeros(block.stop - block.start, dtype=acc, device=device)
                return torch.cat([acc_b[:lo], acc_b[lo : lo + m] + e, acc_b[lo + m :]])
            full = torch.zeros(n + 1, dtype=acc, device=device).index_add(0, index, e)
            part = full[block.start : block.stop]
            return part if acc_b is None else acc_b + part

        by_slot: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(state_powers):
            by_slot.setdefault(i, []).append(j)
        new_weights = [None] * len(weights)
        new_states = [None] * len(states)
        cached_rows, cached_cols = {}, {}  # simultaneous: energies of the start-of-cycle weights
        d = torch.ones(n + 1, dtype=acc, device=device)
        dinv = d
        for block in spec.blocks:

            def energy(i, of, cache, d=d, dinv=dinv):
                # sequential: weighted by the factors chosen so far; simultaneous: the
                # start-of-cycle energy, computed once per slot
                if spec.sequential:
                    return of(i, d, dinv)
                if i not in cache:
                    cache[i] = of(i, None, None)
                return cache[i]

            a = b = None
            for i in block.producers:
                e = energy(i, row_energy, cached_rows)
                a = block_add(a, block, rows[i], spec.slots[i].row_run, e)
            for i in block.consumers:
                e = energy(i, col_energy, cached_cols)
                b = block_add(b, block, cols[i], spec.slots[i].col_run, e)
            zero = torch.zeros(block.stop - block.start, dtype=acc, device=device)
            new = _factors(zero if a is None else a, zero if b is None else b, spec.exponent)
            d = torch.cat([d[: block.start], new, d[block.stop :]])
            dinv = torch.reciprocal(d)
            # Slots whose factors are all final now: rescaled here, while still in cache.
            for i in block.finalize:
                new_weights[i] = scaled(i, weights[i], 1, d, dinv)
                for j in by_slot.get(i, ()):
                    new_states[j] = scaled(i, states[j], state_powers[j][1], d, dinv)
        return new_weights, new_states

    return cycle


class FusedCycle:
    """The compiled cycle of one :class:`Balancer` (one order), writing into the model.

    :meth:`run` returns False when compiling is impossible (after one warning from
    :class:`FusedStep`): the caller then runs the eager cycle.
    """

    def __init__(self, balancer: Balancer, order: str):
        self.balancer = balancer
        slots = []
        for s in balancer.slots:
            slots.append(
                _SlotSpec(
                    tuple(s.shape3),
                    s.row_shape,
                    s.col_shape,
                    s.mat_shape,
                    s.has_rows,
                    s.has_cols,
                    s.balanced,
                    None if isinstance(s.row_w, torch.Tensor) else float(s.row_w),
                    None if isinstance(s.col_w, torch.Tensor) else float(s.col_w),
                    _run(s.rows),
                    _run(s.cols),
                )
            )
        index = {id(s): i for i, s in enumerate(balancer.slots)}
        blocks = []
        for group, block in zip(balancer.plan.groups, balancer._blocks):
            producers = tuple(dict.fromkeys(index[id(pt.slot)] for pt in block.balanced_producers))
            consumers = tuple(dict.fromkeys(index[id(pt.slot)] for pt in block.consumers))
            finalize = tuple(index[id(s)] for s in block.finalize)
            blocks.append(_BlockSpec(group.start, group.stop, producers, consumers, finalize))
        self.spec = _Spec(
            balancer.n,
            balancer.p,
            balancer.exponent,
            balancer.acc_dtype,
            order == "sequential",
            tuple(slots),
            tuple(blocks),
        )
        self.step = FusedStep(_make_cycle(self.spec), "ENorm cycle")

    @property
    def compiles(self) -> int:
        return self.step.compiles

    def run(self, entries: Sequence[tuple[int, dict, str, torch.Tensor, int]]) -> bool:
        """One cycle; ``entries``: (slot index, state dict, key, tensor, power) per state tensor.

        Returns False (nothing modified) if the compiled cycle is unavailable.
        """
        bal = self.balancer
        if bal.n == 0:
            return True
        bal._to_device(bal.slots[0].param.device)
        weights = [s.param.detach() for s in bal.slots]
        state_powers = tuple((i, k) for i, _, _, _, k in entries)
        states = [t for _, _, _, t, _ in entries]
        rows = [s.rows for s in bal.slots]
        cols = [s.cols for s in bal.slots]
        row_ws = [s.row_w if isinstance(s.row_w, torch.Tensor) else None for s in bal.slots]
        col_ws = [s.col_w if isinstance(s.col_w, torch.Tensor) else None for s in bal.slots]
        key = (state_powers, weights[0].device.type)
        return self.step(
            key, (weights, states), state_powers, weights, states, rows, cols, row_ws, col_ws
        )
