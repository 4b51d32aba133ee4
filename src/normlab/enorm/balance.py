"""ENorm cycles on a precomputed rescaling plan: energies, factors, one rescaling pass.

Objective (paper, asymmetric scaling): with the depth k of each layer (0 for the first) and the
p-norm,

    J_c(W) = sum_layers c^(-p k) ||W_k||_p^p        (biases and norm shifts: only if balanced)

For one rescaling variable i (a hidden channel) with producers P (rows written by i) and
consumers Q (columns read from i), scaling rows by d_i and columns by 1/d_i changes J_c by
A_i d_i^p + B_i d_i^(-p) with

    A_i = sum_{P} c^(-p k_P) ||row_i||_p^p,     B_i = sum_{Q} c^(-p k_Q) ||col_i||_p^p,

minimised by d_i = (B_i / A_i)^(1 / (2p)). In a chain this is the original code's
d_i = sqrt(||col_i|| / (c ||row_i||)): after the update, outgoing norm = c * incoming norm.
A channel with A_i = 0 or B_i = 0 (a dead unit) keeps d_i = 1.

Two update orders:

* ``sequential`` (Gauss-Seidel): blocks (hidden layers, residual streams) in topological order,
  each block's factors computed from the weights as already updated by the earlier blocks of
  the sweep. This is the block-coordinate descent the paper describes.
* ``simultaneous`` (Jacobi): every factor computed from the start-of-cycle weights, then all
  applied; this is what the original code computes (its loop reads the next layer's norms
  before rescaling). It never increases J_c either: by AM-GM,
  d_i^p / d_j^p <= (d_i^(2p) + d_j^(-2p)) / 2 for every edge j -> i, which sums to
  sum_i (A_i + B_i) / 2 = J_c at the chosen d (depth weights carry through).

Both are deterministic functions of the parameters: no data, no random numbers, no rank-local
state, so data-parallel replicas stay bit-identical without communication.

Cost (memory-bound). Both orders touch each weight the same way: one read into a reusable
scratch buffer of |w|^p; row and column energies as two matrix-vector products on it (BLAS,
one pass each over data in cache), weighted by the factors already chosen in this sweep, so
the sequential sweep needs no intermediate rescaling: the energy of row i after its columns
were scaled by q is sum_j |w_ij|^p q_j^p. Then one rescaling per weight with its final row
and column factors r, q (w <- r_i w_ij q_j), and the same for each optimizer state tensor
with r^k, q^k. Per-channel work is batched over the whole network where the order allows.

References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks",
ICLR 2019, arXiv:1902.10416.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .graph import ParamSlot, RescalingPlan

__all__ = ["Balancer", "StateList"]

# For one parameter: its optimizer state tensors with the power k they transform with
# (state <- state * s^k when the parameter entry is multiplied by s).
StateList = Sequence[tuple[torch.Tensor, int]]
StateLookup = Callable[[torch.Tensor], StateList]

_FLOATS = (torch.float32, torch.float64)


class _Lanes:
    """Scratch buffers assigned at construction, so that a warm cycle allocates nothing.

    The sweep is simulated once: every |w|^p buffer lives from its first to its last use and is
    given a *lane* (a flat buffer per dtype, as long as its longest user) that no other buffer
    alive at the same time uses. Slots keep views into their lanes, rebuilt on a device change.
    """

    def __init__(self) -> None:
        self.sizes: dict[tuple[torch.dtype, int], int] = {}
        self.free: dict[torch.dtype, list[int]] = {}
        self.count: dict[torch.dtype, int] = {}
        self.buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def take(self, dtype: torch.dtype, numel: int) -> int:
        free = self.free.setdefault(dtype, [])
        lane = free.pop() if free else self.count.setdefault(dtype, 0)
        if lane == self.count.get(dtype, 0):
            self.count[dtype] = lane + 1
        key = (dtype, lane)
        self.sizes[key] = max(self.sizes.get(key, 0), numel)
        return lane

    def give(self, dtype: torch.dtype, lane: int) -> None:
        self.free.setdefault(dtype, []).append(lane)

    def window(self, dtype: torch.dtype, lane: int, shape, device) -> torch.Tensor:
        key = (dtype, lane)
        buf = self.buffers.get(key)
        if buf is None or buf.device != device:
            buf = self.buffers[key] = torch.empty(self.sizes[key], dtype=dtype, device=device)
        return buf[: math.prod(shape)].view(shape)


class _Slot:
    """A parameter with its precomputed indices and per-sweep working state."""

    __slots__ = (
        "name", "param", "shape3", "rows", "cols", "balanced", "has_rows", "has_cols",
        "row_w", "col_w", "abs_w", "row_off", "col_off", "last_block", "uses", "sq_dtype",
        "sq_lane", "_ptr", "_view", "_windows", "_state_views", "eager", "row_index", "col_index",
        # per-sweep state (sequential order)
        "row_f", "col_f", "row_fi", "col_fi", "sq", "row_cache", "ones_rows", "ones_cols",
        "mat_shape", "row_shape", "col_shape", "_mat",
    )  # fmt: skip

    def __init__(self, slot: ParamSlot, balanced: bool, row_w, col_w, abs_w: float):
        self.name = slot.name
        self.param = slot.param
        self.shape3 = slot.shape3
        self.rows = slot.rows
        self.cols = slot.cols
        self.balanced = balanced
        self.has_rows = slot.rows is not None
        self.has_cols = slot.cols is not None
        self.row_w = row_w  # weight of this slot's row energies: float or per-row tensor
        self.col_w = col_w
        self.abs_w = abs_w  # c^(-p depth): weight of the slot in J_c
        self.row_off = self.col_off = 0
        self.last_block = -1
        self.uses = 0  # energy computations that read the |w|^p scratch in one sweep
        dtype = slot.param.dtype
        self.sq_dtype = dtype if dtype in _FLOATS else torch.float32
        self.sq_lane = 0
        self._ptr = None
        self._view = None
        self._windows: dict[tuple, torch.Tensor] = {}
        self._state_views: dict[int, tuple[int, torch.Tensor]] = {}
        self.eager = None  # its producer part, if the row energies are computed as soon as the
        # column factors are final
        self.row_f = self.col_f = self.row_fi = self.col_fi = self.sq = self.row_cache = None
        g, nr, nc = slot.shape3
        # Layout used to rescale: the plainest view, so that factors need no reshaping (a
        # 1-D column factor broadcasts over a matrix's last dimension as it is).
        if g == 1 and nc == 1:
            self.mat_shape, self.row_shape, self.col_shape = (nr,), None, None
        elif g == 1:
            self.mat_shape, self.row_shape, self.col_shape = (nr, nc), (nr, 1), None
        else:
            self.mat_shape, self.row_shape, self.col_shape = (g, nr, nc), (g, nr, 1), (g, 1, nc)
        self._mat = None
        self.ones_rows = torch.ones(g * nr, dtype=self.sq_dtype)  # moved by _to_device
        self.ones_cols = torch.ones(g * nc, dtype=self.sq_dtype)

    def _refresh(self) -> None:
        ptr = self.param.data_ptr()
        if ptr != self._ptr:  # first use, or .to() / .data= swapped the storage
            self._view = self.param.view(self.shape3)
            self._mat = self.param.view(self.mat_shape)
            self._ptr = ptr
            self._state_views.clear()

    def view(self) -> torch.Tensor:
        """The parameter viewed as (G, R, C)."""
        self._refresh()
        return self._view

    def mat(self) -> torch.Tensor:
        """The parameter in its rescaling layout: (R,), (R, C) or (G, R, C)."""
        self._refresh()
        return self._mat

    def window(self, lanes: _Lanes, dtype, lane: int) -> torch.Tensor:
        key = (dtype, lane)
        view = self._windows.get(key)
        if view is None or lanes.buffers.get(key) is None or view.device != self.param.device:
            view = lanes.window(dtype, lane, self.shape3, self.param.device)
            self._windows[key] = view
        return view

    def state_mat(self, tensor: torch.Tensor) -> torch.Tensor:
        """An optimizer state tensor in the rescaling layout (views cached by storage)."""
        ptr = tensor.data_ptr()
        cached = self._state_views.get(id(tensor))
        if cached is None or cached[0] != ptr:
            if len(self._state_views) > 16:  # replaced state tensors (load_state_dict)
                self._state_views.clear()
            cached = self._state_views[id(tensor)] = (ptr, tensor.view(self.mat_shape))
        return cached[1]


class _Part:
    """The rows (or columns) of one slot that belong to one block of the sequential sweep."""

    __slots__ = ("slot", "local", "positions", "identity", "repeat", "weight", "ones")

    def __init__(self, slot: _Slot, local, positions, identity: bool, weight, size: int):
        self.slot = slot
        self.local = local  # block-local variable index of each selected row / column
        self.positions = positions  # which rows / columns of the slot (None: all)
        self.identity = identity  # all rows / columns, and local == arange(block size)
        self.weight = weight  # None (one), a float, or a per-entry tensor
        # Columns of a conv (or of a Linear after a flatten): each channel repeated over its
        # K taps (positions) in a row: energies reduce with a view instead of an index_add.
        self.repeat = None
        k = local.numel() // size if size else 0
        if positions is None and not identity and k > 1 and local.numel() == k * size:
            if bool((local == torch.arange(size).repeat_interleave(k)).all()):
                self.repeat = k
        # The depth weight folded into the all-ones vector of the matrix-vector product.
        self.ones = None


class _Block:
    __slots__ = ("size", "producers", "balanced_producers", "consumers", "eager", "finalize")

    def __init__(self, size: int):
        self.size = size
        self.producers: list[_Part] = []
        self.balanced_producers: list[_Part] = []  # those whose energy enters the balance
        self.consumers: list[_Part] = []
        self.eager: list[_Slot] = []  # slots whose row energies are computed after this block
        self.finalize: list[_Slot] = []  # slots whose factors are final after this block


class Balancer:
    """ENorm cycles for one model: indices precomputed at construction, no allocation per cycle."""

    def __init__(self, plan: RescalingPlan, c: float, p: float, include_bias: bool):
        self.plan = plan
        self.c = float(c)
        self.p = float(p)
        self.exponent = 1.0 / (2.0 * self.p)
        self.n = plan.num_variables
        params = [s.param for s in plan.slots]
        self.device = params[0].device if params else torch.device("cpu")
        self.acc_dtype = (
            torch.float64 if any(q.dtype == torch.float64 for q in params) else torch.float32
        )
        self.lanes = _Lanes()
        ref = self._reference_depths(plan)
        self.slots: list[_Slot] = []
        for slot in plan.slots:
            balanced = slot.kind in ("weight", "norm_weight") or include_bias
            self.slots.append(
                _Slot(
                    slot,
                    balanced,
                    self._relative_weight(slot.depth, slot.rows, ref),
                    self._relative_weight(slot.depth, slot.cols, ref),
                    self.c ** (-self.p * slot.depth),
                )
            )
        self._build_concatenated()
        self._blocks = self._build_blocks()
        self._assign_lanes()
        self._device_cache: torch.device | None = None
        self._gathered = None  # see _factor_buffers

    # --- construction -------------------------------------------------------------------------

    def _reference_depths(self, plan: RescalingPlan) -> np.ndarray:
        """Per variable: the smallest depth of its producers.

        Only ratios B_i / A_i matter, so each variable's weights are taken relative to its own
        reference depth: c^(-p k) cannot underflow however deep the network is.
        """
        big = np.iinfo(np.int64).max
        ref = np.full(self.n + 1, big, dtype=np.int64)
        for slot in plan.slots:
            if slot.rows is not None:
                np.minimum.at(ref, slot.rows.numpy(), slot.depth)
        ref[ref == big] = 0
        ref[self.n] = 0
        return ref

    def _relative_weight(self, depth: int, index: torch.Tensor | None, ref: np.ndarray):
        if index is None:
            return 1.0
        exps = (depth - ref[index.numpy()]).astype(np.float64)
        if (exps == exps[0]).all():
            return float(self.c ** (-self.p * exps[0]))
        return torch.from_numpy(np.power(self.c, -self.p * exps)).to(self.acc_dtype)

    @staticmethod
    def _entry_weights(weight, n: int, dtype) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return weight.to(dtype)
        return torch.full((n,), weight, dtype=dtype)

    def _build_concatenated(self) -> None:
        """Row / column indices of all slots end to end, for the batched simultaneous update."""
        rows, cols, row_w, col_w = [], [], [], []
        self.row_sizes, self.col_sizes = [], []
        n_rows = n_cols = 0
        for s in self.slots:
            s.row_index = len(self.row_sizes) if s.has_rows else None
            s.col_index = len(self.col_sizes) if s.has_cols else None
            if s.has_rows:
                self.row_sizes.append(s.rows.numel())
            if s.has_cols:
                self.col_sizes.append(s.cols.numel())
            if s.has_rows:
                s.row_off = n_rows
                rows.append(s.rows)
                w = self._entry_weights(s.row_w, s.rows.numel(), self.acc_dtype)
                row_w.append(w)  # unbalanced slots never write their energies: stay zero
                n_rows += s.rows.numel()
            if s.has_cols:
                s.col_off = n_cols
                cols.append(s.cols)
                w = self._entry_weights(s.col_w, s.cols.numel(), self.acc_dtype)
                col_w.append(w)
                n_cols += s.cols.numel()
        empty_i = torch.zeros(0, dtype=torch.long)
        empty_f = torch.zeros(0, dtype=self.acc_dtype)
        self.all_rows = torch.cat(rows) if rows else empty_i
        self.all_cols = torch.cat(cols) if cols else empty_i
        self.all_row_w = torch.cat(row_w) if row_w else empty_f
        self.all_col_w = torch.cat(col_w) if col_w else empty_f
        # Frozen entries add into slot n, whose factor is reset to one: their weight is moot.
        self.unit_weights = bool((self.all_row_w == 1).all()) and bool((self.all_col_w == 1).all())
        self.row_energy = torch.zeros(n_rows, dtype=self.acc_dtype)
        self.col_energy = torch.zeros(n_cols, dtype=self.acc_dtype)

    def _build_blocks(self) -> list[_Block]:
        """Per group of the sweep: the slot rows it scales (producers) and columns (consumers)."""
        blocks = []
        for b, group in enumerate(self.plan.groups):
            block = _Block(group.stop - group.start)
            for s in self.slots:
                for index, weight, bucket, is_rows in (
                    (s.rows, s.row_w, block.producers, True),
                    (s.cols, s.col_w, block.consumers, False),
                ):
                    if index is None:
                        continue
                    inside = (index >= group.start) & (index < group.stop)
                    if not bool(inside.any()):
                        continue
                    s.last_block = b
                    positions = None if bool(inside.all()) else inside.nonzero().view(-1)
                    local = (index if positions is None else index[positions]) - group.start
                    identity = (
                        positions is None
                        and local.numel() == block.size
                        and bool((local == torch.arange(block.size)).all())
                    )
                    if isinstance(weight, torch.Tensor) and positions is not None:
                        weight = weight[positions]
                    if s.has_cols and (s.balanced or not is_rows):
                        s.uses += 1  # this part reads the slot's |w|^p scratch
                    if isinstance(weight, float) and weight == 1.0:
                        weight = None
                    part = _Part(s, local, positions, identity, weight, block.size)
                    n_other = s.shape3[0] * (s.shape3[2] if is_rows else s.shape3[1])
                    if s.has_cols and (weight is None or isinstance(weight, float)):
                        part.ones = torch.full((n_other,), weight or 1.0, dtype=s.sq_dtype)
                    bucket.append(part)
                    if is_rows and s.balanced:
                        block.balanced_producers.append(part)
            blocks.append(block)
        for s in self.slots:
            blocks[s.last_block].finalize.append(s)
        # In a topological sweep a weight's columns (its input channels) are final before its
        # rows are balanced: its row energies sum_j |w_ij|^p q_j^p are then computed right after
        # its last column block, while its |w|^p scratch is still in cache.
        for s in self.slots:
            if not (s.has_rows and s.has_cols and s.balanced):
                continue
            col_blocks = [b for b, blk in enumerate(blocks) if any(pt.slot is s for pt in
                                                                   blk.consumers)]  # fmt: skip
            row_blocks = [b for b, blk in enumerate(blocks) if any(pt.slot is s for pt in
                                                                   blk.producers)]  # fmt: skip
            if len(row_blocks) == 1 and col_blocks and max(col_blocks) < row_blocks[0]:
                part = next(pt for pt in blocks[row_blocks[0]].producers if pt.slot is s)
                s.eager = part
                blocks[max(col_blocks)].eager.append(s)
        return blocks

    def _assign_lanes(self) -> None:
        """Simulate one sequential sweep to give every scratch buffer a non-conflicting lane.

        The simultaneous cycle needs one transient buffer at a time: lane 0 of each dtype.
        """
        lanes = self.lanes
        for s in self.slots:
            lanes.sizes[(s.sq_dtype, 0)] = max(lanes.sizes.get((s.sq_dtype, 0), 0), s.param.numel())
        for dtype in {s.sq_dtype for s in self.slots}:
            lanes.count[dtype] = 1
            lanes.free[dtype] = [0]
        held: dict[int, int] = {}  # id(slot) -> uses left while its |w|^p buffer is alive

        def use(s: _Slot) -> None:
            if id(s) not in held:
                s.sq_lane = lanes.take(s.sq_dtype, s.param.numel())
                held[id(s)] = s.uses
            held[id(s)] -= 1
            if held[id(s)] == 0:
                lanes.give(s.sq_dtype, s.sq_lane)

        for block in self._blocks:  # the same order of uses as sequential()
            for part in block.producers:
                if part.slot.has_cols and part.slot.balanced and part.slot.eager is None:
                    use(part.slot)
            for part in block.consumers:
                use(part.slot)
            for s in block.eager:
                use(s)
            for s in block.finalize:
                if held.get(id(s), 0) > 0:
                    lanes.give(s.sq_dtype, s.sq_lane)
                held.pop(id(s), None)

    # --- small helpers ------------------------------------------------------------------------

    def _to_device(self, device: torch.device) -> None:
        """Move index tensors next to the parameters (once, or after model.to(device))."""
        if self._device_cache == device:
            return
        self.all_rows, self.all_cols = self.all_rows.to(device), self.all_cols.to(device)
        self.all_row_w, self.all_col_w = self.all_row_w.to(device), self.all_col_w.to(device)
        self.row_energy = self.row_energy.to(device)
        self.col_energy = self.col_energy.to(device)
        for s in self.slots:
            s.ones_rows, s.ones_cols = s.ones_rows.to(device), s.ones_cols.to(device)
            s.rows = None if s.rows is None else s.rows.to(device)
            s.cols = None if s.cols is None else s.cols.to(device)
            if isinstance(s.row_w, torch.Tensor):
                s.row_w = s.row_w.to(device)
            if isinstance(s.col_w, torch.Tensor):
                s.col_w = s.col_w.to(device)
        for block in self._blocks:
            for part in block.producers + block.consumers:
                part.local = part.local.to(device)
                if part.positions is not None:
                    part.positions = part.positions.to(device)
                if isinstance(part.weight, torch.Tensor):
                    part.weight = part.weight.to(device)
                if part.ones is not None:
                    part.ones = part.ones.to(device)
        self.device = device
        self._device_cache = device

    def _powered(self, s: _Slot, lane: int) -> torch.Tensor:
        """|w|^p of slot s into its scratch lane (float32 at least)."""
        m = s.view()
        sq = s.window(self.lanes, s.sq_dtype, lane)
        if self.p == 2.0:
            torch.mul(m, m, out=sq)
        else:
            torch.abs(m, out=sq)
            sq.pow_(self.p)
        return sq

    def _pow(self, v: torch.Tensor, dtype=None) -> torch.Tensor:
        if dtype is not None and v.dtype != dtype:
            v = v.to(dtype)
        return v * v if self.p == 2.0 else v.pow(self.p)

    def _factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d = (B / A)^(1/2p); one where a channel is dead (A or B zero) or the ratio overflows."""
        ratio = torch.div(b, a)
        # 0/0 -> nan and x/0 -> inf (no incoming energy); 0/x -> 0 (no outgoing energy).
        ratio.nan_to_num_(nan=1.0, posinf=1.0)
        ratio.masked_fill_(ratio == 0, 1.0)
        return ratio.pow_(self.exponent)

    @staticmethod
    def _lay(v: torch.Tensor | None, shape, dtype) -> torch.Tensor | None:
        if v is None:
            return None
        if v.dtype != dtype:
            v = v.to(dtype)
        return v if shape is None else v.view(shape)

    def _apply(self, s: _Slot, r, q, ri, qi, states: StateLookup) -> None:
        """w_ij <- r_i w_ij q_j; each optimizer state t_ij <- r_i^k t_ij q_j^k."""
        selves: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        self._collect(s, r, q, ri, qi, states, selves, factors)
        if selves:
            torch._foreach_mul_(selves, factors)

    def _collect(self, s: _Slot, r, q, ri, qi, states: StateLookup, selves, factors) -> None:
        """The multiplications of :meth:`_apply`, appended as (tensor, broadcast factor) pairs.

        ``ri``, ``qi`` are 1/r and 1/q (k = -1, the common case, needs no extra work). Per
        tensor two broadcast multiplications, the second on data still in cache (measured
        faster than building the outer product r q^T once and multiplying by it); all of a
        cycle's (or a block's) multiplications then run as one ``torch._foreach_mul_``, in this
        order (the same per-tensor kernels, without one Python dispatch each).
        """
        m = s.mat()
        lay = self._lay
        if r is not None:
            selves.append(m)
            factors.append(lay(r, s.row_shape, m.dtype))
        if q is not None:
            selves.append(m)
            factors.append(lay(q, s.col_shape, m.dtype))
        for tensor, k in states(s.param):
            t = s.state_mat(tensor)
            if k == -1:
                rk, qk = ri, qi
            elif k == -2:
                rk = None if ri is None else ri * ri
                qk = None if qi is None else qi * qi
            else:
                rk = None if r is None else r.pow(k)
                qk = None if q is None else q.pow(k)
            if rk is not None:
                selves.append(t)
                factors.append(lay(rk, s.row_shape, t.dtype))
            if qk is not None:
                selves.append(t)
                factors.append(lay(qk, s.col_shape, t.dtype))

    # --- the simultaneous (Jacobi) cycle ------------------------------------------------------

    @torch.no_grad()
    def simultaneous(self, states: StateLookup) -> None:
        """One Jacobi cycle: all factors from the start-of-cycle weights, then applied."""
        if self.n == 0:
            return
        device = self.slots[0].param.device
        self._to_device(device)
        acc = self.acc_dtype
        row_e, col_e = self.row_energy, self.col_energy
        for s in self.slots:
            need_rows = s.has_rows and s.balanced
            if not (need_rows or s.has_cols):
                continue
            g, nr, nc = s.shape3
            sq = self._powered(s, 0)
            r_out = row_e[s.row_off : s.row_off + g * nr] if need_rows else None
            c_out = col_e[s.col_off : s.col_off + g * nc] if s.has_cols else None
            direct = sq.dtype == acc
            if g == 1:
                sq2 = sq[0]
                if need_rows:
                    self._store(torch.mv, (sq2, s.ones_cols), r_out, direct)
                if s.has_cols:
                    self._store(torch.mv, (sq2.t(), s.ones_rows), c_out, direct)
            else:
                if need_rows:
                    r_out.copy_(sq.sum(2).view(-1))
                if s.has_cols:
                    c_out.copy_(sq.sum(1).view(-1))
        if self.unit_weights:
            a_src, b_src = row_e, col_e
        else:
            a_src, b_src = row_e * self.all_row_w, col_e * self.all_col_w
        a = torch.zeros(self.n + 1, dtype=acc, device=device).index_add_(0, self.all_rows, a_src)
        b = torch.zeros(self.n + 1, dtype=acc, device=device).index_add_(0, self.all_cols, b_src)
        d = self._factors(a, b)
        d[self.n] = 1.0
        self._apply_all(d, states)

    @staticmethod
    def _store(fn, args, out: torch.Tensor, direct: bool) -> None:
        if direct:
            fn(*args, out=out)
        else:
            out.copy_(fn(*args))

    def _factor_buffers(self, device: torch.device):
        """Gather targets for d[rows], 1/d[cols], 1/d[rows], d[cols] and, per slot, its slices
        already in the rescaling layout (views made once, filled in place every cycle)."""
        cached = self._gathered
        if cached is None or cached[0] != device:
            acc = self.acc_dtype
            n_rows, n_cols = self.all_rows.numel(), self.all_cols.numel()
            r, ri = (torch.empty(n_rows, dtype=acc, device=device) for _ in range(2))
            q, qi = (torch.empty(n_cols, dtype=acc, device=device) for _ in range(2))
            views = []
            for s in self.slots:
                rs = slice(s.row_off, s.row_off + s.rows.numel()) if s.has_rows else None
                cs = slice(s.col_off, s.col_off + s.cols.numel()) if s.has_cols else None
                views.append(tuple(
                    None if sl is None else (buf[sl] if shape is None else buf[sl].view(shape))
                    for buf, sl, shape in ((r, rs, s.row_shape), (q, cs, s.col_shape),
                                           (ri, rs, s.row_shape), (qi, cs, s.col_shape))
                ))  # fmt: skip
            cached = self._gathered = (device, (r, q, ri, qi), views)
        return cached[1], cached[2]

    def _apply_all(self, d: torch.Tensor, states: StateLookup) -> None:
        """Rescale every slot by d (rows) and 1/d (columns), factors gathered network-wide.

        One gather per factor vector for the whole network, into buffers whose per-slot views
        are built once; then every multiplication of the cycle in one ``torch._foreach_mul_``.
        """
        dinv = torch.reciprocal(d)
        (r, q, ri, qi), views = self._factor_buffers(d.device)
        torch.index_select(d, 0, self.all_rows, out=r)
        torch.index_select(dinv, 0, self.all_cols, out=q)
        torch.index_select(dinv, 0, self.all_rows, out=ri)
        torch.index_select(d, 0, self.all_cols, out=qi)
        acc = self.acc_dtype
        selves: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for s, (rv, qv, riv, qiv) in zip(self.slots, views):
            m = s.mat()
            entries = states(s.param)
            if m.dtype != acc or any(k != -1 or t.dtype != acc for t, k in entries):
                flat = [None if v is None else v.reshape(-1) for v in (rv, qv, riv, qiv)]
                self._collect(s, *flat, lambda _p, e=entries: e, selves, factors)
                continue
            targets = [(m, (rv, qv))] + [(s.state_mat(t), (riv, qiv)) for t, _ in entries]
            for target, vectors in targets:
                for v in vectors:
                    if v is not None:
                        selves.append(target)
                        factors.append(v)
        if selves:
            torch._foreach_mul_(selves, factors)

    @torch.no_grad()
    def rescale(self, d: torch.Tensor, states: StateLookup) -> None:
        """Multiply entry (g, i, j) of every slot by d[row] / d[col] (d[n] must be one)."""
        self._to_device(self.slots[0].param.device if self.slots else self.device)
        self._apply_all(d.to(self.device), states)

    # --- the sequential (Gauss-Seidel) sweep --------------------------------------------------

    @torch.no_grad()
    def sequential(self, states: StateLookup) -> None:
        """One sweep: blocks in topological order, each from the weights as updated so far."""
        if self.n == 0:
            return
        self._to_device(self.slots[0].param.device)
        for s in self.slots:
            s.row_f = s.col_f = s.row_fi = s.col_fi = s.sq = s.row_cache = None
        factors, reciprocal = self._factors, torch.reciprocal
        for block in self._blocks:
            a = self._block_sum(block.balanced_producers, block.size, self._rows_energy)
            b = self._block_sum(block.consumers, block.size, self._cols_energy)
            d = factors(a, b)
            inv = reciprocal(d)
            for part in block.producers:
                s = part.slot
                if part.identity:
                    new, new_inv = d, inv
                else:
                    new, new_inv = self._pick(d, part, s.shape3, True), None
                if s.row_f is None:
                    s.row_f, s.row_fi = new, new_inv
                else:
                    s.row_f, s.row_fi = s.row_f * new, None
            for part in block.consumers:
                s = part.slot
                if part.identity:
                    new, new_inv = inv, d
                else:
                    new, new_inv = self._pick(inv, part, s.shape3, False), None
                if s.col_f is None:
                    s.col_f, s.col_fi = new, new_inv
                else:
                    s.col_f, s.col_fi = s.col_f * new, None
            for s in block.eager:
                s.row_cache = self._rows_energy(s, s.eager)
            selves, muls = [], []
            for s in block.finalize:
                r, q = s.row_f, s.col_f
                ri = s.row_fi if s.row_fi is not None or r is None else reciprocal(r)
                qi = s.col_fi if s.col_fi is not None or q is None else reciprocal(q)
                self._collect(s, r, q, ri, qi, states, selves, muls)
                s.row_f = s.col_f = s.row_fi = s.col_fi = s.sq = None
            if selves:
                torch._foreach_mul_(selves, muls)

    def _block_sum(self, parts: list[_Part], size: int, energy) -> torch.Tensor:
        """sum over parts of weight * energy, into block-local channel order."""
        acc = None
        for part in parts:
            e = energy(part.slot, part)
            if part.positions is not None:
                e = e[part.positions]
            if e.dtype != self.acc_dtype:
                e = e.to(self.acc_dtype)
            if isinstance(part.weight, torch.Tensor):  # per-entry depth weights (rare)
                e = e * part.weight
            if part.repeat is not None:
                e = e.view(size, part.repeat).sum(1)
            if part.identity or part.repeat is not None:
                acc = e if acc is None else acc.add_(e)
            else:
                if acc is None:
                    acc = torch.zeros(size, dtype=self.acc_dtype, device=e.device)
                acc.index_add_(0, part.local, e)
        if acc is None:  # nothing balanced on this side: the block's factors stay one
            acc = torch.zeros(size, dtype=self.acc_dtype, device=self.device)
        return acc

    def _squares(self, s: _Slot) -> torch.Tensor:
        if s.sq is None:
            s.sq = self._powered(s, s.sq_lane)
        return s.sq

    def _weights(self, other, part: _Part, dtype) -> torch.Tensor:
        """The vector of the matrix-vector product: (other side's factors)^p times the weight."""
        if other is None and part.ones is not None:
            return part.ones  # weight already folded in
        v = self._pow(other, dtype) if other is not None else None
        if part.weight is None:
            return v
        if isinstance(part.weight, float):
            return v * part.weight
        return v  # per-entry weights are applied by _block_sum

    def _rows_energy(self, s: _Slot, part: _Part) -> torch.Tensor:
        """Weighted sum_j |w_ij|^p q_j^p r_i^p with the row (r) and column (q) factors so far."""
        e = s.row_cache
        if e is not None:
            s.row_cache = None
            return e
        g, nr, nc = s.shape3
        if not s.has_cols:  # bias, norm affine, or a layer reading frozen input
            m = s.view()
            if nc == 1:
                e = m.reshape(-1)
                e = e * e if self.p == 2.0 else e.abs().pow(self.p)
            else:
                e = torch.linalg.vector_norm(m, ord=self.p, dim=2).view(-1)
                e = e * e if self.p == 2.0 else e.pow(self.p)
            if part.weight is not None and not isinstance(part.weight, torch.Tensor):
                e = e * part.weight
        else:
            sq = self._squares(s)
            v = self._weights(s.col_f, part, sq.dtype)
            if v is None:
                v = s.ones_cols
            e = torch.mv(sq[0], v) if g == 1 else torch.bmm(sq, v.view(g, nc, 1)).view(-1)
        if s.row_f is not None:
            e = e * self._pow(s.row_f, e.dtype)
        return e

    def _cols_energy(self, s: _Slot, part: _Part) -> torch.Tensor:
        """Weighted sum_i r_i^p |w_ij|^p q_j^p with the factors chosen so far."""
        g, nr, nc = s.shape3
        sq = self._squares(s)
        v = self._weights(s.row_f, part, sq.dtype)
        if v is None:
            v = s.ones_rows
        e = torch.mv(sq[0].t(), v) if g == 1 else torch.bmm(v.view(g, 1, nr), sq).view(-1)
        if s.col_f is not None:
            e = e * self._pow(s.col_f, e.dtype)
        return e

    @staticmethod
    def _pick(f: torch.Tensor, part: _Part, shape3, rows: bool) -> torch.Tensor:
        """The block's factors f spread over a slot's rows (columns); one outside the block."""
        picked = f[part.local]
        if part.positions is None:
            return picked
        g, nr, nc = shape3
        full = torch.ones(g * (nr if rows else nc), dtype=f.dtype, device=f.device)
        full[part.positions] = picked
        return full

    # --- diagnostics --------------------------------------------------------------------------

    @torch.no_grad()
    def objective(self) -> float:
        """J_c = sum over balanced slots of c^(-p depth) * ||slot||_p^p (in float64)."""
        total = 0.0
        for s in self.slots:
            if s.balanced:
                m = s.param.detach().double()
                total += s.abs_w * float(m.abs().pow(self.p).sum())
        return total

    @torch.no_grad()
    def pending_factors(self) -> torch.Tensor:
        """Per variable: (B_i / A_i)^(1/2p), the factor a lone update would apply (1 = balanced)."""
        a = torch.zeros(self.n + 1, dtype=torch.float64)
        b = torch.zeros(self.n + 1, dtype=torch.float64)
        for s in self.slots:
            sq = s.view().detach().double().cpu().abs().pow(self.p)
            if s.has_rows and s.balanced:
                w = s.row_w.double().cpu() if isinstance(s.row_w, torch.Tensor) else s.row_w
                a.index_add_(0, s.rows.cpu(), sq.sum(2).view(-1) * w)
            if s.has_cols:
                w = s.col_w.double().cpu() if isinstance(s.col_w, torch.Tensor) else s.col_w
                b.index_add_(0, s.cols.cpu(), sq.sum(1).view(-1) * w)
        return self._factors(a, b)[: self.n]
