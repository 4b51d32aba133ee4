"""The probe: a float64 train-mode copy of a model, its Euler statistics and actual rescales.

:class:`Probe` evaluates the copy with substituted parameters (``torch.func.functional_call``),
computes per parameter and per output row e = <g, w> and m = ||g|| ||w|| (:class:`PointStats`;
Euler's identity says e = 0 for a scale-invariant w) and the relative output change of an actual
rescale. :class:`Evidence` holds the probe points theta_k (the model's own weights and generic
perturbations of them), their statistics and the confirming rescale used by every decision of
:func:`normlab.scale_invariance.find_scale_invariant`. The maths and the tolerance are in the
package docstring.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..nn.layer_registry import find_norm_layer

__all__ = ["EPS_SCALE", "Evidence", "PointStats", "Probe", "default_tolerance", "is_norm_layer"]

# Tensor-wide rescale factor of the confirmation (any c far from 1 works; 2.7 avoids "nice" values).
TENSOR_FACTOR = 2.7
# Per-row factors are drawn log-uniformly in [1/_ROW_FACTOR_RANGE, _ROW_FACTOR_RANGE].
_ROW_FACTOR_RANGE = 3.0
# Relative size of the random perturbations that make the probe points generic.
_PERTURBATION = 0.2
# A gradient counts as zero when ||g|| ||w|| is below this fraction of sum_j ||g_j|| ||w_j||
# (float64 rounding of an analytically zero gradient is ~1e-16 of that sum).
_ZERO_GRAD = 1e-9
# Default factor on every norm layer's eps in the probe copy (see the package docstring).
EPS_SCALE = 1e-6


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer: registered (:mod:`normlab.nn.layer_registry`, subclasses too), or
    custom and named *Norm* / *Renorm* (FilterResponseNorm, ...); never local response norm."""
    if find_norm_layer(module) is not None:
        return True
    if isinstance(module, nn.LocalResponseNorm | nn.CrossMapLRN2d):
        return False
    name = type(module).__name__.rstrip("123d").rstrip("123")
    return name.endswith(("Norm", "Renorm"))


def norm_eps(module: nn.Module) -> tuple[str, float] | None:
    """(attribute, value) of a norm layer's float eps (the registry names the attribute, else
    ``eps``); None for other modules and for a norm without a float eps."""
    if not is_norm_layer(module):
        return None
    entry = find_norm_layer(module)
    attr = entry.eps if entry is not None else "eps"
    eps = getattr(module, attr, None)
    return (attr, eps) if isinstance(eps, float) else None


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def _row_ids(param: Tensor, module: nn.Module, attr: str) -> tuple[Tensor, int, int]:
    """Output-channel index of every element of ``param``, the number of rows and the row dim.

    Rows are dim 0 except for ConvTranspose weights, stored (in, out/groups, *k): there the output
    channel of element [i, j, ...] is (i // (in/groups)) * (out/groups) + j.
    """
    shape = param.shape
    if param.ndim == 0:
        return torch.zeros((), dtype=torch.long), 1, 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and attr == "weight":
        in_channels, out_per_group = shape[0], shape[1]
        in_per_group = in_channels // module.groups
        i = torch.arange(in_channels).div(in_per_group, rounding_mode="floor")
        ids = i[:, None] * out_per_group + torch.arange(out_per_group)[None, :]
        ids = ids.reshape(*ids.shape, *([1] * (param.ndim - 2))).expand(shape)
        return ids.contiguous(), module.groups * out_per_group, 1
    ids = torch.arange(shape[0]).reshape(-1, *([1] * (param.ndim - 1))).expand(shape)
    return ids.contiguous(), shape[0], 0


def _batch_call(batch: Any, device: torch.device) -> tuple[tuple, dict]:
    """Model inputs: a tensor -> model(x); tuple/list -> model(*batch); dict -> model(**batch)."""

    def convert(v: Any) -> Any:
        if isinstance(v, Tensor):
            v = v.to(device)
            return v.to(torch.float64) if v.is_floating_point() else v
        return v

    if isinstance(batch, Tensor):
        return (convert(batch),), {}
    if isinstance(batch, tuple | list):
        return tuple(convert(v) for v in batch), {}
    if isinstance(batch, Mapping):
        return (), {k: convert(v) for k, v in batch.items()}
    raise TypeError(
        "Invalid batch: expected a Tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs, got {type(batch).__name__}"
    )


def _flat_output(out: Any) -> Tensor:
    """All floating-point tensors of a (nested) model output, flattened and concatenated."""
    parts: list[Tensor] = []

    def collect(v: Any) -> None:
        if isinstance(v, Tensor):
            if v.is_floating_point():
                parts.append(v.reshape(-1))
        elif isinstance(v, Mapping):
            for item in v.values():
                collect(item)
        elif isinstance(v, tuple | list):
            for item in v:
                collect(item)

    collect(out)
    if not parts:
        raise TypeError(
            f"The model output ({type(out).__name__}) holds no floating-point tensor to probe"
        )
    return torch.cat(parts)


@contextlib.contextmanager
def _name_failing_layer(model: nn.Module) -> Iterator[None]:
    """Turn an exception inside the forward pass into a ValueError naming the innermost layer."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, str, list]] = []
    finished: list[str] = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
        stack.append((names.get(id(module), "?"), type(module).__name__, shapes))

    def post_hook(module: nn.Module, args: tuple, out: Any) -> None:
        name = stack.pop()[0] if stack else "?"
        if name:
            finished.append(name)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        yield
    except Exception as err:
        if stack and stack[-1][0]:
            name, kind, shapes = stack[-1]
            shape_text = ", ".join(str(list(s)) for s in shapes) or "no tensor"
            where = f"layer '{name}' ({kind}) failed on input of shape {shape_text}"
        else:
            last = f" after layer '{finished[-1]}'" if finished else ""
            where = f"the model's own forward failed{last}"
        hint = ""
        if "more than 1 value per channel" in str(err):
            hint = " (the probe runs in train mode: use a batch with more than one sample)"
        raise ValueError(f"The probe batch does not fit the model: {where}: {err}{hint}") from err
    finally:
        for handle in handles:
            handle.remove()


def default_tolerance(model: nn.Module, eps_scale: float = EPS_SCALE) -> float:
    """``clip(100 * max(eps * eps_scale), 1e-5, 5e-2)`` over the model's norm layers.

    The eps of a norm layer leaks eps / (sigma^2 + eps) of a scaling into its output, so Euler
    cosines of norm-fed weights sit at ~eps / sigma^2. With the model's own eps
    (``eps_scale=1``) the factor 100 leaves room for pre-norm variances down to 0.01 (1e-3 for
    eps = 1e-5, the rule of the method notes). With the default ``eps_scale=1e-6`` the floor is
    negligible and the tolerance is its lower clip, 1e-5: above float64 rounding, below the
    Euler cosines of non-invariant tensors. 1e-5 without norm layers.
    """
    eps = [found[1] for m in model.modules() if (found := norm_eps(m)) is not None]
    if not eps:
        return 1e-5
    return min(5e-2, max(1e-5, 100.0 * max(eps) * eps_scale))


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


@dataclass
class PointStats:
    """Euler statistics of every probed parameter at one probe point."""

    e: dict[str, float]  # <g, w>
    m: dict[str, float]  # ||g|| ||w||
    row_e: dict[str, Tensor]  # per-row <g_r, w_r>
    row_m: dict[str, Tensor]  # per-row ||g_r|| ||w_r||
    missing: set[str]  # parameters whose gradient is None (not reached by the forward pass)
    total_m: float  # sum_j m_j: the scale against which "zero" is judged


class Probe:
    """A float64 train-mode deep copy of a model, evaluated with substituted parameters."""

    def __init__(
        self, model: nn.Module, batch: Any, loss_fn: Callable | None, seed: int, eps_scale: float
    ) -> None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        try:
            self.model = copy.deepcopy(model)
        except Exception as err:
            raise TypeError(f"The model cannot be deep-copied for probing: {err}") from err
        self.model.to(torch.float64).train()
        self.model_eps: dict[str, float] = {}
        for name, module in self.model.named_modules():
            # Dropout is positively homogeneous; switching it off makes forwards comparable.
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
            found = norm_eps(module)
            if found is not None:
                attr, eps = found
                self.model_eps[name] = eps
                setattr(module, attr, eps * eps_scale)  # the structural probe (package docstring)
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)
        self.base = {n: p.detach() for n, p in params.items() if n in trainable}
        self.frozen = [n for n in params if n not in trainable]
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        first = next(iter(params.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.args, self.kwargs = _batch_call(batch, self.device)
        self.loss_fn = loss_fn
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.first_call = True  # the first forward names the failing layer if the batch is bad
        self.rows: dict[str, tuple[Tensor, int, int]] = {}
        for name, p in self.base.items():
            ids, n_rows, row_dim = _row_ids(p, *owner(self.model, name))
            self.rows[name] = (ids.to(self.device), n_rows, row_dim)

    # -- evaluation ---------------------------------------------------------------------------

    def randn(self, shape: torch.Size | tuple) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float64).to(self.device)

    def forward(self, params: Mapping[str, Tensor]) -> Any:
        # Fresh buffer clones: every evaluation sees the same running statistics (train-mode BN
        # updates them in place; custom layers such as batch renorm also read them).
        tensors = {n: b.clone() for n, b in self.buffers.items()}
        tensors.update(params)
        devices = [self.device] if self.device.type == "cuda" else []
        locate = _name_failing_layer(self.model) if self.first_call else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), locate:
            torch.manual_seed(self.seed)
            out = functional_call(self.model, tensors, self.args, self.kwargs)
        self.first_call = False
        return out

    def scalar(self, out: Any, readout: Tensor | None) -> Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(out)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            return loss.reshape(())
        return (readout * _flat_output(out)).sum()

    @torch.no_grad()
    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """The probed quantity: the loss (with loss_fn) or the flattened output."""
        out = self.forward(params)
        if self.loss_fn is not None:
            return self.scalar(out, None).reshape(1)
        return _flat_output(out)

    def relative_change(self, reference: Tensor, params: Mapping[str, Tensor]) -> float:
        changed = self.value(params)
        denominator = max(reference.norm().item(), 1e-300)
        return (changed - reference).norm().item() / denominator

    def point_stats(
        self, params: Mapping[str, Tensor], readouts: int = 1, only: list[str] | None = None
    ) -> list[PointStats]:
        """Euler statistics at one point, for ``readouts`` random readouts (one forward pass).

        With ``loss_fn`` there is a single scalar, so one readout only. ``only`` restricts the
        gradients to these parameters (the backward pass then skips the others' weight grads).
        """
        wanted = set(params if only is None else only)
        leaves = {
            n: p.detach().clone().requires_grad_(True) for n, p in params.items() if n in wanted
        }
        out = self.forward({**params, **leaves})
        flat = None if self.loss_fn is not None else _flat_output(out)
        readouts = 1 if flat is None else readouts
        result = []
        for index in range(readouts):
            readout = None
            if flat is not None:
                readout = self.randn(flat.shape) / math.sqrt(max(flat.numel(), 1))
            scalar = self.scalar(out, readout) if flat is None else (readout * flat).sum()
            if scalar.requires_grad:
                grads = torch.autograd.grad(
                    scalar,
                    list(leaves.values()),
                    allow_unused=True,
                    retain_graph=index + 1 < readouts,
                )
            else:
                grads = (None,) * len(leaves)
            result.append(self._euler({n: params[n] for n in leaves}, grads))
        return result

    def _euler(self, params: Mapping[str, Tensor], grads: tuple) -> PointStats:
        stats = PointStats({}, {}, {}, {}, set(), 0.0)
        for (name, w), g in zip(params.items(), grads):
            if g is None:
                stats.missing.add(name)
                continue
            ids, n_rows, _ = self.rows[name]
            flat_ids = ids.reshape(-1)

            def row_sum(v: Tensor, ids: Tensor = flat_ids, n: int = n_rows) -> Tensor:
                return torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, ids, v)

            gw = (g * w).reshape(-1)
            stats.e[name] = gw.sum().item()
            stats.m[name] = g.norm().item() * w.norm().item()
            stats.row_e[name] = row_sum(gw).cpu()
            row_g = row_sum(g.reshape(-1).square()).sqrt()
            row_w = row_sum(w.reshape(-1).square()).sqrt()
            stats.row_m[name] = (row_g * row_w).cpu()
        stats.total_m = sum(stats.m.values())
        return stats

    def perturbed(self) -> dict[str, Tensor]:
        """A generic point near the model's weights: w * exp(0.2 xi) + 0.2 rms(w) xi'."""
        point = {}
        for name, w in self.base.items():
            rms = w.square().mean().sqrt().item() if w.numel() else 0.0
            scale = rms if rms > 0 else 0.1
            factor = torch.exp(_PERTURBATION * self.randn(w.shape))
            point[name] = w * factor + _PERTURBATION * scale * self.randn(w.shape)
        return point

    def row_factors(self, n_rows: int) -> Tensor:
        u = torch.rand(n_rows, generator=self.generator, dtype=torch.float64) * 2 - 1
        return torch.exp(u * math.log(_ROW_FACTOR_RANGE)).to(self.device)

    def scaled(
        self,
        params: Mapping[str, Tensor],
        names: list[str],
        factor: float,
        row_factors: Tensor | None,
    ) -> dict[str, Tensor]:
        """``params`` with ``names`` multiplied by ``factor`` (times ``row_factors[r]`` on row r)."""
        new = dict(params)
        for name in names:
            scale = factor if row_factors is None else factor * row_factors[self.rows[name][0]]
            new[name] = params[name] * scale
        return new


def max_cos(e: Tensor | float, m: Tensor | float, floor: float) -> float:
    """max |e| / m over entries with m above ``floor`` (rows with m ~ 0 constrain nothing)."""
    e = torch.as_tensor(e, dtype=torch.float64).reshape(-1)
    m = torch.as_tensor(m, dtype=torch.float64).reshape(-1)
    keep = m > floor
    if not keep.any():
        return 0.0
    return (e[keep].abs() / m[keep]).max().item()


@dataclass
class Evidence:
    """The probe points theta_k, their Euler statistics and the confirming rescale.

    ``points[0]`` is the model's own weights, the others generic perturbations. ``stats`` holds
    one :class:`PointStats` per (point, readout): the first ``n_points`` entries are the
    per-parameter tests' (one readout per point), the joint search appends more.
    ``references`` are the probed quantities at ``points[0]`` and ``points[1]``.
    """

    probe: Probe
    n_points: int
    points: list[dict[str, Tensor]] = field(default_factory=list)
    stats: list[PointStats] = field(default_factory=list)
    references: list[Tensor] = field(default_factory=list)

    def add_point(self, readouts: int = 1, only: list[str] | None = None) -> None:
        """A new generic point and its statistics (``readouts`` readouts, ``only`` these names)."""
        self.points.append(self.probe.perturbed())
        self.stats.extend(self.probe.point_stats(self.points[-1], readouts, only))

    def zero_floor(self, stats: PointStats) -> float:
        """||g|| ||w|| below this counts as a zero gradient at that point."""
        return _ZERO_GRAD * stats.total_m

    def confirm(self, names: list[str], row_factors: Tensor | None = None) -> float:
        """Relative change of the probed quantity under an actual rescale, max over two points.

        ``names`` grow by 2.7 (times ``row_factors`` per row) at the model's weights and at the
        first perturbed point. Growth suffices (f(c w) = f(w) for all w gives f(w / c) = f(w)) and
        keeps the eps leak small, which grows when a norm's input shrinks.
        """
        probe = self.probe
        return max(
            probe.relative_change(
                ref, probe.scaled(self.points[k], names, TENSOR_FACTOR, row_factors)
            )
            for k, ref in enumerate(self.references)
        )

    def max_cos(self, name: str, per_row: bool) -> float:
        """max over the first ``n_points`` points of the Euler cosine, per row or per tensor."""
        return max(
            max_cos(s.row_e[name], s.row_m[name], self.zero_floor(s))
            if per_row
            else max_cos(s.e[name], s.m[name], self.zero_floor(s))
            for s in self.stats[: self.n_points]
        )
