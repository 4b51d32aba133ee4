"""The ENorm object: trace once, then one (or more) balancing cycles per optimizer step."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from .balance import Balancer
from .fused import FusedCycle
from .graph import ParamSlot, RescalingGroup, RescalingPlan, _unwrap, trace_plan
from .optim_state import check_optimizer, state_entries, state_powers, state_tensors

__all__ = ["ENORM_PRESETS", "ENorm", "last_hidden_groups"]

_ORDERS = ("sequential", "simultaneous")

# Named settings. ``original`` reproduces facebookresearch/enorm's cycle exactly: a Jacobi
# (simultaneous) update in which the last hidden layer is never balanced (its loop stops one
# layer early; shared/notes/enorm.md section 1.3). The same as excluding the last hidden
# activation, e.g. ``exclude=["28"]`` on the FC-15 ``fully_connected`` model.
ENORM_PRESETS: dict[str, dict] = {
    "paper": {"order": "sequential", "balance_last_hidden": True},
    "original": {"order": "simultaneous", "balance_last_hidden": False},
}


def _module_from(model) -> nn.Module:
    """``model`` itself, or the module behind a ``model.named_parameters()`` generator."""
    if isinstance(model, nn.Module):
        return model
    if inspect.isgenerator(model) and model.gi_code.co_name in ("named_parameters", "parameters"):
        frame = model.gi_frame
        owner = frame.f_locals.get("self") if frame is not None else None
        if isinstance(owner, nn.Module):
            return owner
    raise TypeError(
        "Invalid model: ENorm needs the nn.Module (or the generator model.named_parameters(), as "
        f"in the original code) to trace its graph; got {type(model).__name__}. A list of "
        "parameters does not say how the layers are connected."
    )


class ENorm:
    r"""Equi-normalization: rebalance a ReLU network's weights without changing its function.

    Every hidden channel i of a positively homogeneous network can be rescaled, rows writing it
    times d_i and columns reading it divided by d_i, leaving the function unchanged. One ENorm
    cycle picks, for every channel, the d_i minimising

    .. math::  J_c(W) = \sum_k c^{-p\,k} \|W_k\|_p^p

    (k = layer depth, first layer 0) with the other channels fixed:
    d_i = (B_i / A_i)^{1/(2p)}, A_i = sum of c^{-p k} ||row_i||_p^p over the producers of i,
    B_i = the same over its consumers' columns. For a chain this is the paper's update: after it,
    every hidden neuron's outgoing norm is c times its incoming norm. Repeated cycles converge to
    the unique minimiser of J_c over the network's rescaling-equivalence class (J_c is strictly
    convex in log d when every channel has nonzero incoming and outgoing weights; a dead
    channel keeps d = 1).

    The rescaling groups are found by tracing ``model`` with torch.fx (see
    :mod:`normlab.enorm.graph`): hidden channels between Linear and Conv1d/2d/3d layers (grouped
    and depthwise too) through ReLU, LeakyReLU, PReLU, pooling, dropout, padding, identity,
    flatten (a conv channel maps to its block of flattened features) and concatenation. Channels
    added together share one factor (a residual stream is one group; a learned shortcut starts a
    new one). The input of a BatchNorm/GroupNorm/LayerNorm is left unscaled (normalization is
    scale-invariant only up to eps, and running statistics would change); its output channels
    are rescaled through the affine weight and bias, which is exact in train and eval mode.
    Running statistics are never read or written. An operation on rescalable channels that is
    not positively homogeneous (GELU, sigmoid, tanh, a gate, an untraceable submodule) raises
    :class:`~normlab.enorm.ENormGraphError` naming it; list it in ``exclude`` to leave the
    channels around it unscaled.

    Biases and norm shifts are always rescaled with their channel (so the function is kept);
    with ``include_bias=True`` their energy also enters A_i (the original README found training
    more stable without). Norm scales count as weights.

    Args:
        model: the network, or ``model.named_parameters()`` as in the original code (the module
            is recovered from the generator and traced the same way).
        optimizer: its state is rescaled with the weights (SGD momentum, Adam/AdamW moments, ...;
            see :mod:`normlab.enorm.optim_state`). None: no state to rescale.
        c: asymmetric scaling coefficient (> 0): layer k's energy is weighted by c^(-p k); c = 1
            is plain equi-normalization, values slightly above 1 let deeper layers grow.
        p: the norm (> 0; 2 in the paper's experiments).
        cycles: cycles per :meth:`step` that runs.
        every: run on every ``every``-th call of :meth:`step`.
        include_bias: balance biases and norm shifts too (they are rescaled either way).
        order: ``"sequential"`` (default): Gauss-Seidel sweep over the groups from input to
            output, each from the current weights (the paper's block-coordinate descent).
            ``"simultaneous"``: Jacobi update, all factors from the start-of-cycle weights (what
            the original code computes; same fixed point, more cycles to reach it).
        exclude: module names (``model.named_modules()``) or traced operation names to treat as
            opaque cuts: channels entering or leaving them are not rescaled and their
            parameters are untouched. Excluded modules are not traced into.
        balance_last_hidden: False leaves the last hidden layer (every group that feeds only
            the output layer, see :func:`last_hidden_groups`) unscaled, as the original code
            does. ``ENORM_PRESETS["original"]`` (``order="simultaneous"``,
            ``balance_last_hidden=False``) is the original's cycle to rounding (1e-14).
        fused: run each cycle (either order, optimizer state included) as one compiled graph
            (``torch.compile``, see :mod:`normlab.enorm.fused`) that writes into the weights and
            the optimizer's state tensors in place: the same numbers to rounding, fewer passes
            over memory. Compiled at the first cycle (seconds; once more if a cycle runs before
            the optimizer created its state); where compiling is impossible, one
            ``RuntimeWarning`` and the eager cycle.

    Usage (after each optimizer step)::

        enorm = normlab.ENorm(model, optimizer, c=1.2)
        ...
        optimizer.step()
        enorm.step()

    The cycle is a deterministic function of the parameters (no data, no random numbers, no
    running statistics), so data-parallel replicas stay identical without communication.
    Build ENorm after the model has its final device and dtype (a later ``.to(device)`` is
    followed; energies accumulate in float32, or float64 for float64 models).

    References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks",
    ICLR 2019, arXiv:1902.10416.
    """

    def __init__(
        self,
        model: nn.Module | Iterable,
        optimizer: torch.optim.Optimizer | None = None,
        c: float = 1.0,
        p: float = 2,
        cycles: int = 1,
        every: int = 1,
        include_bias: bool = False,
        order: str = "sequential",
        exclude: Iterable[str] = (),
        balance_last_hidden: bool = True,
        fused: bool = False,
    ) -> None:
        if not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"Invalid c: {c} (must be a finite number > 0)")
        if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"Invalid p: {p} (must be a finite number > 0)")
        if not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"Invalid cycles: {cycles} (must be an int >= 1)")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every} (must be an int >= 1)")
        if order not in _ORDERS:
            raise ValueError(f"Invalid order: {order!r} (one of {', '.join(_ORDERS)})")
        if isinstance(exclude, str):
            exclude = [exclude]
        module = _unwrap(_module_from(model))
        self.model = module
        self.optimizer = optimizer
        if optimizer is not None:
            check_optimizer(optimizer)
        self.c = float(c)
        self.p = float(p)
        self.cycles = cycles
        self.every = every
        self.include_bias = bool(include_bias)
        self.order = order
        self.exclude = tuple(exclude)
        self.balance_last_hidden = bool(balance_last_hidden)
        plan = trace_plan(module, self.exclude)
        if not self.balance_last_hidden:
            plan = _freeze_groups(plan, last_hidden_groups(plan))
        self.plan: RescalingPlan = plan
        self._balancer = Balancer(self.plan, self.c, self.p, self.include_bias)
        self.fused = bool(fused)
        self._fused: FusedCycle | None = FusedCycle(self._balancer, order) if self.fused else None
        self._calls = 0

    # --- inspection ---------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[RescalingGroup, ...]:
        """The rescaling groups found in the model, input to output."""
        return tuple(self.plan.groups)

    @property
    def num_variables(self) -> int:
        """Number of rescaled channels (free factors)."""
        return self.plan.num_variables

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the parameters ENorm rescales."""
        return tuple(s.name for s in self.plan.slots)

    def __repr__(self) -> str:
        return (
            f"ENorm(c={self.c}, p={self.p}, cycles={self.cycles}, every={self.every}, "
            f"include_bias={self.include_bias}, order={self.order!r}, "
            f"balance_last_hidden={self.balance_last_hidden}, fused={self.fused}, "
            f"groups={len(self.groups)}, "
            f"channels={self.num_variables})"
        )

    # --- the update ---------------------------------------------------------------------------

    def _state_lookup(self):
        """Per parameter, its optimizer state tensors with their transform powers."""
        if self.optimizer is None:
            return lambda param: ()
        optimizer = self.optimizer
        powers = state_powers(optimizer)  # looked up per cycle: registrations may come later
        return lambda param: state_tensors(optimizer, powers, param)

    def _state_entries(self) -> list:
        """(slot index, state dict, key, tensor, power) of every state tensor to rescale."""
        if self.optimizer is None:
            return []
        optimizer = self.optimizer
        powers = state_powers(optimizer)
        return [
            (i, *entry)
            for i, s in enumerate(self._balancer.slots)
            for entry in state_entries(optimizer, powers, s.param)
        ]

    @property
    def compiles(self) -> int:
        """Graphs compiled for ``fused=True`` (0 for the eager cycle)."""
        return self._fused.compiles if self._fused is not None else 0

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the fused cycle."""
        return self._fused.step.compile_seconds if self._fused is not None else 0.0

    @property
    def fused_form(self) -> str:
        """How the fused cycle runs (``"in place"``; see :attr:`normlab._fused.FusedStep.form`)."""
        return self._fused.step.form if self._fused is not None else "eager (fused=False)"

    @torch.no_grad()
    def cycle(self) -> None:
        """One balancing cycle over all groups, optimizer state included."""
        if self._fused is not None and self._fused.run(self._state_entries()):
            return
        if self.order == "sequential":
            self._balancer.sequential(self._state_lookup())
        else:
            self._balancer.simultaneous(self._state_lookup())

    @torch.no_grad()
    def step(self) -> None:
        """Call after ``optimizer.step()``: runs ``cycles`` cycles on every ``every``-th call."""
        self._calls += 1
        if self._calls % self.every == 0:
            for _ in range(self.cycles):
                self.cycle()

    def objective(self) -> float:
        """The balanced objective J_c = sum_k c^(-p k) ||W_k||_p^p over the rescaled parameters."""
        return self._balancer.objective()

    def pending_factors(self) -> torch.Tensor:
        """Per channel, the factor (B_i / A_i)^(1/2p) a lone update would apply (1 = balanced)."""
        return self._balancer.pending_factors()

    @torch.no_grad()
    def rescale(self, factors: torch.Tensor) -> None:
        """Multiply every channel i by ``factors[i] > 0`` (rows times, columns divided by it).

        A function-preserving reparametrisation (optimizer state transformed too); used by the
        tests and by :meth:`check` to probe the discovered groups.
        """
        d = self._full_factors(factors)
        self._balancer.rescale(d, self._state_lookup())

    def _full_factors(self, factors: torch.Tensor) -> torch.Tensor:
        factors = torch.as_tensor(factors)
        if factors.shape != (self.num_variables,):
            raise ValueError(
                f"Invalid factors: expected shape ({self.num_variables},), got "
                f"{tuple(factors.shape)}"
            )
        if not bool((factors > 0).all()):
            raise ValueError("Invalid factors: all must be > 0")
        d = torch.ones(self.num_variables + 1, dtype=self._balancer.acc_dtype)
        d[:-1] = factors.to(d.dtype)
        return d.to(self._balancer.device)

    @torch.no_grad()
    def check(self, *example_inputs, sigma: float = 1.0, seed: int = 0) -> float:
        """Relative output change of a copy of the model under random function-preserving factors.

        Draws log-normal factors (log-std ``sigma``) for every channel, rescales a deep copy of
        the model with them, and returns max|f(x) - f'(x)| / max|f(x)| on ``example_inputs``
        (the model's current train/eval mode; dropout sees the same random numbers). A value
        at rounding level confirms the discovered groups. The model itself is not touched (both
        forwards run on copies).
        """
        gen = torch.Generator().manual_seed(seed)
        factors = torch.exp(sigma * torch.randn(self.num_variables, generator=gen,
                                                dtype=torch.float64))  # fmt: skip
        twin = copy.deepcopy(self.model)
        by_name = dict(twin.named_parameters())
        slots = [
            ParamSlot(s.name, by_name[s.name], s.shape3, s.rows, s.cols, s.depth, s.kind, s.module)
            for s in self.plan.slots
        ]
        plan = RescalingPlan(slots, self.plan.groups, self.plan.num_variables)
        Balancer(plan, self.c, self.p, self.include_bias).rescale(
            self._full_factors(factors), lambda _: ()
        )
        reference = copy.deepcopy(self.model)  # forwards may update BN running statistics
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = reference(*example_inputs)
            torch.manual_seed(seed)
            out = twin(*example_inputs)
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))

    # --- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])


def last_hidden_groups(plan: RescalingPlan) -> list[RescalingGroup]:
    """The groups read only by parameters that write no group: the last hidden layer(s), whose
    consumers form the network's output layer."""
    producers = {name for group in plan.groups for name in group.producers}
    return [g for g in plan.groups if not (set(g.consumers) & producers)]


def _freeze_groups(plan: RescalingPlan, frozen: list[RescalingGroup]) -> RescalingPlan:
    """``plan`` with the variables of ``frozen`` fixed at 1 (renumbered; frozen index = count)."""
    drop = {id(g) for g in frozen}
    keep = [g for g in plan.groups if id(g) not in drop]
    old_to_new = torch.full((plan.num_variables + 1,), -1, dtype=torch.long)
    groups, start = [], 0
    for g in keep:
        size = g.stop - g.start
        old_to_new[g.start : g.stop] = torch.arange(start, start + size)
        groups.append(RescalingGroup(g.name, size, g.producers, g.consumers, start, start + size))
        start += size
    old_to_new[old_to_new < 0] = start  # dropped groups and the old frozen index

    def remap(idx):
        if idx is None:
            return None
        new = old_to_new[idx]
        return None if bool((new == start).all()) else new

    slots = []
    for s in plan.slots:
        rows, cols = remap(s.rows), remap(s.cols)
        if rows is not None or cols is not None:
            slots.append(
                ParamSlot(s.name, s.param, s.shape3, rows, cols, s.depth, s.kind, s.module)
            )
    return RescalingPlan(slots, groups, start)
