"""Which parameters is a network's training-mode output invariant to scaling, and how.

A function f is positively homogeneous of degree 0 in a tensor w if f(c*w) = f(w) for all c > 0.
Differentiating at c = 1 gives Euler's identity

    d/dc f(c*w) |_{c=1} = <grad_w f, w> = 0,

so a scale-invariant (SI) weight has a gradient orthogonal to itself. A weight whose output goes
into a normalization layer is SI in training mode (the layer divides by a batch statistic):

* per row: every output channel (row of w viewed as (out, -1)) can be scaled by its own c_r > 0,
  e.g. conv -> [ReLU | max/avg-pool | dropout]* -> BatchNorm (per-channel statistics absorb c_r);
* per tensor only: one c for the whole tensor, e.g. conv -> GroupNorm (a group mixes rows) or
  Linear -> LayerNorm (the statistics run over all features of a sample);
* jointly: only a set of tensors scaled together, e.g. the convs whose outputs are summed in a
  residual stream before the next norm, a conv and its bias before ReLU -> BN, or (gamma, beta)
  of a BN that feeds ReLU -> conv -> BN.

The probe (:func:`find_scale_invariant`) decides per parameter, on a float64 deep copy of the
model in train mode (batch statistics), with a random linear readout r of the output (or
``loss_fn``):

1. Euler test at a few points theta_k (the model's own weights and random multiplicative and
   additive perturbations of all of them, so that a zero-initialized bias or a coincidental
   orthogonality cannot pass): per row |cos(g_r, w_r)| = |<g_r, w_r>| / (||g_r|| ||w_r||) <= tol,
   per tensor |cos(g, w)| <= tol.
2. Confirmation by an actual rescale with ``torch.func.functional_call``: rows multiplied by
   random factors in [1/3, 3] (per-row claim) or the tensor by 2.7 (per-tensor claim); the
   relative change ||f(theta') - f(theta)|| / ||f(theta)|| of the output (or loss) must be <= tol.
3. Joint sets among the rest: with e_kj = <g_j, w_j> and m_kj = ||g_j|| ||w_j|| at K points
   (K > number of candidates), S is jointly SI iff |sum_{j in S} e_kj| <= tol sum_{j in S} m_kj
   at every k. Minimal sets are vertices of the linear program
       min sum_j cost_j x_j   s.t.  x_seed = 1,  0 <= x <= 1,  |E_k x| <= tol M_k x
   (scipy's HiGHS); weight matrices cost less than 1-D parameters so that sets are made of
   weights where possible. Each set is confirmed by rescaling it by 2.7. The sets are found
   greedily (model order, weights first) as a disjoint family; a parameter left out only because
   its set overlaps an earlier one then gets its own, overlapping set.

Tolerance and the eps floor. A norm layer computes (z - mu) / sqrt(sigma^2 + eps), which is not
exactly homogeneous: scaling z by c gives d/dc log(output)|_{c=1} = eps / (sigma^2 + eps) per
channel, so the Euler cosine of a BN-fed weight is ~eps / sigma^2 instead of 0 (~1e-5 for
eps = 1e-5 and unit pre-norm variance; measured up to 2e-4 at PyTorch's default init, and larger
for channels with small variance or after weight decay has shrunk the weights). Euler cosines of
non-invariant tensors are ~0.1 - 0.5 for small tensors but shrink like 1/sqrt(numel) for large
ones (AdamP's delta / sqrt(dim) rule). With the model's own eps the window between the two is
narrow, so by default the probe copy divides every norm layer's eps by 1e6 (``eps_scale``): the
floor drops to ~1e-11 / sigma^2 and tol = 1e-5 separates cleanly (it accepts channels with
sigma^2 >= 1e-6). With ``eps_scale=1`` the model is probed as is and the default tolerance is
the note's rule, 100 x the largest eps (1e-3 for eps = 1e-5), clipped to [1e-5, 5e-2]; i.e.
``tol = clip(100 * max(eps * eps_scale), 1e-5, 5e-2)``. Either way a warning reports norm layers
whose median eps / (sigma^2 + eps) with the model's own eps exceeds 1e-2: there invariance of
the real model is only approximate (tiny weights; cf. Kodryan et al. on the sphere radius).
Norm layers must read their ``eps`` attribute in ``forward`` (all torch norms do).

Optionally a torch.fx walk (Conv/Linear -> chain of positively homogeneous ops -> norm layer)
explains each result; it falls back silently (``result.fx_error``) when tracing fails.

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv
1709.09603); Kodryan et al., "Training Scale-Invariant Neural Networks on the Sphere Can Happen
in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); Heo et al., "AdamP", ICLR 2021
(arXiv 2006.08217).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "KINDS",
    "InvarianceReport",
    "ScaleInvarianceResult",
    "default_tolerance",
    "find_scale_invariant",
    "grassmann_param_groups",
    "scale_invariant_param_groups",
]

ROW, TENSOR, JOINT, NONE, INERT, UNUSED, FROZEN = (
    "row",
    "tensor",
    "joint",
    "none",
    "inert",
    "unused",
    "frozen",
)
KINDS = (ROW, TENSOR, JOINT, NONE, INERT, UNUSED, FROZEN)

_KIND_HELP = {
    ROW: "invariant to scaling each output row (channel) separately",
    TENSOR: "invariant to scaling the whole tensor, not row by row",
    JOINT: "invariant only when scaled together with the other members of its joint set",
    NONE: "not scale-invariant",
    INERT: "the output does not depend on it in train mode (zero gradient)",
    UNUSED: "not used by the forward pass (no gradient)",
    FROZEN: "requires_grad=False; not probed",
}

# Tensor-wide rescale factor of the confirmation (any c far from 1 works; 2.7 avoids "nice" values).
_TENSOR_FACTOR = 2.7
# Per-row factors are drawn log-uniformly in [1/_ROW_FACTOR_RANGE, _ROW_FACTOR_RANGE].
_ROW_FACTOR_RANGE = 3.0
# Relative size of the random perturbations that make the probe points generic.
_PERTURBATION = 0.2
# A gradient counts as zero when ||g|| ||w|| is below this fraction of sum_j ||g_j|| ||w_j||
# (float64 rounding of an analytically zero gradient is ~1e-16 of that sum).
_ZERO_GRAD = 1e-9
# Default factor on every norm layer's eps in the probe copy (see the module docstring).
_EPS_SCALE = 1e-6
# Warn when a norm layer's median eps / (sigma^2 + eps), with the model's own eps, exceeds this.
_LEAK_WARNING = 1e-2
# Euler rows (point x readout) beyond the number of joint candidates: with more constraints than
# unknowns only true symmetries survive in the linear program.
_JOINT_MARGIN = 4
# Readouts per extra point of the joint search (one forward, several backward passes); rows from
# different points keep accidental null vectors of a single point's Jacobian out.
_READOUTS_PER_POINT = 4
# Linear-program costs: prefer sets of weight matrices over biases and norm affine parameters.
_COST_WEIGHT, _COST_VECTOR = 1.0, 4.0


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvarianceReport:
    """What the probe found for one parameter.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        shape: parameter shape.
        kind: one of ``"row"``, ``"tensor"``, ``"joint"``, ``"none"``, ``"inert"``, ``"unused"``,
            ``"frozen"`` (see ``KINDS``); ``"row"`` implies tensor invariance too.
        row_dim: the dimension that indexes output channels (1 for ConvTranspose weights, else 0).
        row_cos: max over probe points and rows of |cos(g_r, w_r)| (None if not probed).
        tensor_cos: max over probe points of |cos(g, w)|.
        rescale_change: relative output change in the confirming rescale of the claim made
            (per row, per tensor, joint set); None when no claim was confirmed.
        joint_group: index into ``result.joint_sets`` for ``kind == "joint"``.
        joint_members: names of the joint set (including this one).
        joint_granularity: ``"row"`` if the members can also be scaled row by row together
            (same channel count, channel r of every member by the same c_r), else ``"tensor"``.
        fx_path: the graph path found by the fx walk, e.g. ``"conv (Conv2d) -> bn (BatchNorm2d)"``.
        note: a short explanation of unusual outcomes.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    row_dim: int = 0
    row_cos: float | None = None
    tensor_cos: float | None = None
    rescale_change: float | None = None
    joint_group: int | None = None
    joint_members: tuple[str, ...] = ()
    joint_granularity: str | None = None
    fx_path: str | None = None
    note: str = ""

    @property
    def scale_invariant(self) -> bool:
        """True if the parameter is scale-invariant on its own (per row or per tensor)."""
        return self.kind in (ROW, TENSOR)


@dataclass
class ScaleInvarianceResult(Mapping):
    """Mapping ``name -> InvarianceReport`` plus the joint sets, tolerance and diagnostics.

    ``joint_sets`` lists the jointly invariant sets found: first a disjoint family, then sets
    that overlap it (a member of several sets reports the first). ``disjoint_joint_sets()``
    picks a non-overlapping selection. ``str(result)`` is a readable table.
    """

    reports: dict[str, InvarianceReport]
    tol: float
    joint_sets: list[tuple[str, ...]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fx_error: str | None = None
    n_points: int = 0

    def __getitem__(self, name: str) -> InvarianceReport:
        return self.reports[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def disjoint_joint_sets(self) -> list[tuple[str, ...]]:
        """``joint_sets`` without the sets that overlap an earlier one."""
        taken: set[str] = set()
        chosen = []
        for members in self.joint_sets:
            if taken.isdisjoint(members):
                chosen.append(members)
                taken.update(members)
        return chosen

    def names(self, *kinds: str) -> list[str]:
        """Names of the parameters whose kind is one of ``kinds`` (model order)."""
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"Invalid kind: {bad[0]!r} (expected one of {KINDS})")
        return [n for n, r in self.reports.items() if r.kind in kinds]

    def __str__(self) -> str:
        def cos(v: float | None) -> str:
            return "-" if v is None else f"{v:.1e}"

        rows = [("parameter", "shape", "kind", "row|cos|", "tensor|cos|", "joint", "why")]
        for r in self.reports.values():
            joint = "-" if r.joint_group is None else f"#{r.joint_group} ({r.joint_granularity})"
            why = r.note or (r.fx_path or "")
            shape = "x".join(map(str, r.shape)) or "scalar"
            rows.append((r.name, shape, r.kind, cos(r.row_cos), cos(r.tensor_cos), joint, why))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6] for row in rows
        ]
        lines.insert(1, "-" * (sum(widths) + 12))
        lines.append(
            f"tolerance {self.tol:.1e}, {self.n_points} probe points (train mode, float64)"
        )
        for i, members in enumerate(self.joint_sets):
            lines.append(f"joint set #{i}: {', '.join(members)}")
        if self.fx_error:
            lines.append(f"fx walk unavailable: {self.fx_error}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    """Normalization layers (torch's and custom ones named *Norm*), not local response norm."""
    known = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    known += (nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    if isinstance(module, known):
        return True
    if isinstance(module, nn.LocalResponseNorm | nn.CrossMapLRN2d):
        return False
    # Custom layers by name: BatchRenorm2d, SyncBatchNorm, FilterResponseNorm, ...
    name = type(module).__name__.rstrip("123d").rstrip("123")
    return name.endswith(("Norm", "Renorm"))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
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


def _norm_input_leaks(
    model: nn.Module, model_eps: Mapping[str, float]
) -> tuple[list, Callable[[], None]]:
    """Hooks recording eps / (median pre-norm variance + eps), eps = the model's own eps."""
    leaks: list[tuple[str, float]] = []
    handles = []

    def variance(module: nn.Module, x: Tensor) -> Tensor | None:
        x = x.detach()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and x.ndim >= 2:
            return x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and x.ndim >= 3:
            return x.reshape(x.shape[0] * x.shape[1], -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.GroupNorm):
            return x.reshape(x.shape[0] * module.num_groups, -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.LayerNorm):
            dims = len(module.normalized_shape)
            return x.reshape(-1, math.prod(x.shape[-dims:])).var(dim=1, unbiased=False)
        return None

    for name, module in model.named_modules():
        eps = model_eps.get(name)
        if eps is None:
            continue

        def hook(module: nn.Module, args: tuple, name: str = name, eps: float = eps) -> None:
            if args and isinstance(args[0], Tensor):
                var = variance(module, args[0])
                if var is not None and var.numel():
                    leaks.append((name, eps / (var.median().item() + eps)))

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return leaks, remove


def default_tolerance(model: nn.Module, eps_scale: float = _EPS_SCALE) -> float:
    """``clip(100 * max(eps * eps_scale), 1e-5, 5e-2)`` over the model's norm layers.

    The eps of a norm layer leaks eps / (sigma^2 + eps) of a scaling into its output, so Euler
    cosines of norm-fed weights sit at ~eps / sigma^2. With the model's own eps
    (``eps_scale=1``) the factor 100 leaves room for pre-norm variances down to 0.01 (1e-3 for
    eps = 1e-5, the rule of the method notes). With the default ``eps_scale=1e-6`` the floor is
    negligible and the tolerance is its lower clip, 1e-5: above float64 rounding, below the
    Euler cosines of non-invariant tensors. 1e-5 without norm layers.
    """
    eps = [
        m.eps for m in model.modules() if _is_norm(m) and isinstance(getattr(m, "eps", None), float)
    ]
    if not eps:
        return 1e-5
    return min(5e-2, max(1e-5, 100.0 * max(eps) * eps_scale))


# --------------------------------------------------------------------------------------------
# fx walk (explanation / fast first pass)
# --------------------------------------------------------------------------------------------

_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
)
_HOMOGENEOUS_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.max_pool3d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.avg_pool3d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.dropout,
    torch.flatten,
}
_HOMOGENEOUS_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}


def _norm_scope(module: nn.Module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return "per channel"
    if isinstance(module, nn.GroupNorm):
        if module.num_groups == module.num_channels:
            return "per channel"
        return f"per group of {module.num_channels // module.num_groups} channels"
    if isinstance(module, nn.LayerNorm):
        return "per sample"
    return "custom norm"


def _fx_paths(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """Map parameter names of Conv/Linear-like layers to their path into a norm layer.

    From every ``call_module`` node of a layer with a >= 2-D weight, follow single-user chains
    through positively homogeneous ops (ReLU, pools, dropout, flatten) to a norm module. Returns
    ({param name: path text}, None) or ({}, error text) when tracing fails.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...): all mean "no fx"
        return {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    modules = dict(model.named_modules())
    found: dict[str, list[str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        start = modules.get(node.target)
        weight = getattr(start, "weight", None)
        if _is_norm(start) or not isinstance(weight, Tensor) or weight.ndim < 2:
            continue
        chain = [f"{node.target} ({type(start).__name__})"]
        current, path = node, None
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op == "call_module":
                module = modules.get(user.target)
                if module is not None and _is_norm(module):
                    scope = _norm_scope(module)
                    chain.append(f"{user.target} ({type(module).__name__}, {scope})")
                    path = " -> ".join(chain)
                    break
                if not isinstance(module, _HOMOGENEOUS_MODULES):
                    break
                chain.append(f"{user.target} ({type(module).__name__})")
            elif user.op == "call_function" and user.target in _HOMOGENEOUS_FUNCTIONS:
                chain.append(getattr(user.target, "__name__", str(user.target)))
            elif user.op == "call_method" and user.target in _HOMOGENEOUS_METHODS:
                chain.append(f".{user.target}()")
            else:
                break
            current = user
        for pname, _ in start.named_parameters(recurse=False):
            found.setdefault(f"{node.target}.{pname}" if node.target else pname, []).append(path)
    paths = {}
    for name, options in found.items():
        if all(p is not None for p in options):
            paths[name] = options[0] if len(options) == 1 else " | ".join(options)
    return paths, None


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


@dataclass
class _PointStats:
    """Euler statistics of every probed parameter at one probe point."""

    e: dict[str, float]  # <g, w>
    m: dict[str, float]  # ||g|| ||w||
    row_e: dict[str, Tensor]  # per-row <g_r, w_r>
    row_m: dict[str, Tensor]  # per-row ||g_r|| ||w_r||
    missing: set[str]  # parameters whose gradient is None (not reached by the forward pass)
    total_m: float  # sum_j m_j: the scale against which "zero" is judged


class _Probe:
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
            eps = getattr(module, "eps", None)
            if _is_norm(module) and isinstance(eps, float):
                self.model_eps[name] = eps
                module.eps = eps * eps_scale  # the structural probe (module docstring)
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
            ids, n_rows, row_dim = _row_ids(p, *_owner(self.model, name))
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
    ) -> list[_PointStats]:
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

    def _euler(self, params: Mapping[str, Tensor], grads: tuple) -> _PointStats:
        stats = _PointStats({}, {}, {}, {}, set(), 0.0)
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


def _max_cos(e: Tensor | float, m: Tensor | float, floor: float) -> float:
    """max |e| / m over entries with m above ``floor`` (rows with m ~ 0 constrain nothing)."""
    e = torch.as_tensor(e, dtype=torch.float64).reshape(-1)
    m = torch.as_tensor(m, dtype=torch.float64).reshape(-1)
    keep = m > floor
    if not keep.any():
        return 0.0
    return (e[keep].abs() / m[keep]).max().item()


def _find_joint_sets(
    candidates: list[str],
    ndims: dict[str, int],
    stats: list[_PointStats],
    tol: float,
    confirm: Callable[[list[str]], float],
) -> list[tuple[list[str], float]]:
    """Minimal jointly invariant sets (with their rescale change) from the module's LP.

    Phase 1 builds a disjoint family greedily. Phase 2 adds, for each parameter still left, its
    cheapest set even if it overlaps earlier ones (e.g. a LayerNorm-fed Linear whose bias is
    also needed by a residual-stream set).
    """
    import numpy as np
    from scipy.optimize import linprog

    n = len(candidates)
    e = np.array([[s.e.get(c, 0.0) for c in candidates] for s in stats])
    m = np.array([[s.m.get(c, 0.0) for c in candidates] for s in stats])
    scale = m.sum(axis=1, keepdims=True)
    scale[scale == 0] = 1.0  # rows are homogeneous constraints: normalizing them changes nothing
    e, m = e / scale, m / scale
    a_ub = np.vstack([e - tol * m, -e - tol * m])
    b_ub = np.zeros(a_ub.shape[0])
    cost = np.array([_COST_WEIGHT if ndims[c] >= 2 else _COST_VECTOR for c in candidates])
    order = sorted(range(n), key=lambda j: (ndims[candidates[j]] < 2, j))

    def solve(seed: int, excluded: set[int]) -> tuple[list[str], float] | None:
        bounds = [(0.0, 0.0) if j in excluded else (0.0, 1.0) for j in range(n)]
        bounds[seed] = (1.0, 1.0)
        result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        if result.status != 0:
            return None
        members = [j for j in range(n) if result.x[j] > 0.5]
        if len(members) < 2:
            return None
        # The LP vertex may sit on the tolerance boundary: re-check the rounded 0/1 set exactly.
        residual = np.abs(e[:, members].sum(axis=1)) - tol * m[:, members].sum(axis=1)
        if (residual > 0).any():
            return None
        names = [candidates[j] for j in members]
        change = confirm(names)
        return (names, change) if change <= tol else None

    # Phase 1: a disjoint family, seeds in model order, weight matrices first.
    assigned: set[int] = set()
    sets: list[tuple[list[str], float]] = []
    for seed in order:
        if seed not in assigned and (found := solve(seed, assigned)) is not None:
            sets.append(found)
            assigned.update(candidates.index(c) for c in found[0])
    # Phase 2: parameters left out only because their set overlaps an earlier one.
    for seed in order:
        if seed not in assigned and (found := solve(seed, set())) is not None:
            sets.append(found)
            assigned.update(candidates.index(c) for c in found[0])
    return sets


def find_scale_invariant(
    model: nn.Module,
    batch: Any,
    *,
    tol: float | None = None,
    use_fx: bool = True,
    loss_fn: Callable[[Any], Tensor] | None = None,
    joint: bool = True,
    n_points: int = 3,
    eps_scale: float = _EPS_SCALE,
    seed: int = 0,
) -> ScaleInvarianceResult:
    """Find which parameters the train-mode output is invariant to scaling, and how.

    Args:
        model: any ``nn.Module``. It is not modified: the probe runs on a float64 deep copy in
            train mode (dropout off), its mode, parameters, buffers and ``.grad`` stay as they were.
        batch: model inputs only (not targets): a tensor (``model(batch)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``); a few samples suffice (BatchNorm
            needs more than one value per channel).
        tol: tolerance for Euler cosines, relative output changes and joint-set residuals;
            default :func:`default_tolerance` (1e-5; 1e-3 with ``eps_scale=1`` and eps = 1e-5).
        use_fx: also trace the model with torch.fx to explain results (``fx_path``); silently
            skipped (``result.fx_error``) when tracing fails.
        loss_fn: ``loss_fn(output) -> scalar``; probed instead of a random linear readout of the
            output (close over targets: ``lambda out: F.cross_entropy(out, y)``). The rescale
            checks then compare the loss value instead of the output.
        joint: look for jointly invariant sets among the rest (costs about one forward/backward
            per remaining parameter; needs scipy).
        n_points: probe points for the per-parameter tests (the weights themselves plus
            ``n_points - 1`` random perturbations of them); at least 2.
        eps_scale: factor on every norm layer's eps in the probe copy; the default 1e-6 probes
            structural invariance, 1.0 the model exactly as it is (see the module docstring).
        seed: seed of the readouts, perturbations and rescale factors (the global RNG is untouched).

    Returns:
        A :class:`ScaleInvarianceResult`, a mapping ``name -> InvarianceReport`` in
        ``named_parameters()`` order, with ``joint_sets``, ``tol``, ``warnings``, ``fx_error``.

    Raises:
        ValueError: bad ``tol``/``n_points``, or a batch that does not fit the model (the message
            names the innermost failing layer and its input shape).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(64, 2))
        >>> result = find_scale_invariant(net, torch.randn(8, 3, 6, 6))
        >>> result["0.weight"].kind, result["4.weight"].kind
        ('row', 'none')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if tol is not None and not 0.0 < tol < 1.0:
        raise ValueError(f"Invalid tol: {tol} (expected 0 < tol < 1)")
    if n_points < 2:
        raise ValueError(f"Invalid n_points: {n_points} (expected >= 2)")
    if not eps_scale > 0.0:
        raise ValueError(f"Invalid eps_scale: {eps_scale} (expected > 0)")
    probe = _Probe(model, batch, loss_fn, seed, eps_scale)
    tol = default_tolerance(model, eps_scale) if tol is None else float(tol)
    notes: list[str] = []
    fx_paths, fx_error = _fx_paths(probe.model) if use_fx else ({}, None)

    # Probe points: the model's own weights, then generic perturbations of them.
    points = [dict(probe.base)]
    leaks, remove_hooks = _norm_input_leaks(probe.model, probe.model_eps)
    try:
        stats = probe.point_stats(points[0])
    finally:
        remove_hooks()
    for layer, leak in leaks:
        if leak > _LEAK_WARNING:
            notes.append(
                f"norm layer '{layer}': median eps/(var+eps) = {leak:.1e} at the model's weights "
                "(its own eps): scale invariance of the real model is only approximate here"
            )
    for message in dict.fromkeys(notes):
        warnings.warn(message, stacklevel=2)
    while len(points) < n_points:
        points.append(probe.perturbed())
        stats.extend(probe.point_stats(points[-1]))
    references = [probe.value(points[k]) for k in (0, 1)]

    def confirm(names: list[str], row_factors: Tensor | None = None) -> float:
        """Relative change of the probed quantity under an actual rescale, max over two points.

        ``names`` grow by 2.7 (times ``row_factors`` per row) at the model's weights and at the
        first perturbed point. Growth suffices (f(c w) = f(w) for all w gives f(w / c) = f(w)) and
        keeps the eps leak small, which grows when a norm's input shrinks.
        """
        return max(
            probe.relative_change(ref, probe.scaled(points[k], names, _TENSOR_FACTOR, row_factors))
            for k, ref in enumerate(references)
        )

    def zero_floor(s: _PointStats) -> float:
        return _ZERO_GRAD * s.total_m

    reports: dict[str, dict[str, Any]] = {}
    candidates: list[str] = []
    for name, w in probe.base.items():
        _, n_rows, row_dim = probe.rows[name]
        info: dict[str, Any] = {"name": name, "shape": tuple(w.shape), "row_dim": row_dim}
        info["fx_path"] = fx_paths.get(name)
        reports[name] = info
        if name in stats[0].missing:
            info.update(kind=UNUSED, note="no gradient: the forward pass does not use it")
            continue
        info["row_cos"] = max(
            _max_cos(s.row_e[name], s.row_m[name], zero_floor(s)) for s in stats[:n_points]
        )
        info["tensor_cos"] = max(
            _max_cos(s.e[name], s.m[name], zero_floor(s)) for s in stats[:n_points]
        )
        if all(s.m[name] <= zero_floor(s) for s in stats[:n_points]):
            # Zero gradient everywhere we looked: inert if neither rescaling nor a random change
            # of the values moves the output (a flat region is not invariance).
            change = confirm([name], probe.row_factors(n_rows))
            moved = dict(points[0])
            moved[name] = points[1][name]  # an unrelated generic value of this parameter
            change = max(change, probe.relative_change(references[0], moved))
            if change <= tol:
                info.update(kind=INERT, rescale_change=change, note=_KIND_HELP[INERT])
                continue
            info["note"] = f"zero gradient, but changing it moves the output by {change:.1e}"
            candidates.append(name)
            continue
        if info["row_cos"] <= tol:
            change = confirm([name], probe.row_factors(n_rows))
            if change <= tol:
                info.update(kind=ROW, rescale_change=change)
                continue
            info["note"] = (
                f"Euler test passed, but a per-row rescale moved the output by {change:.1e}"
            )
        if info["tensor_cos"] <= tol:
            change = confirm([name])
            if change <= tol:
                info.update(kind=TENSOR, rescale_change=change)
                if not info.get("note"):
                    info["note"] = f"rows alone are not invariant (row |cos| {info['row_cos']:.1e})"
                continue
            info["note"] = (
                f"Euler test passed, but rescaling by 2.7 moved the output by {change:.1e}"
            )
        if info["fx_path"] and not info.get("note"):
            info["note"] = "fx path reaches a norm, but the probe finds no invariance"
        candidates.append(name)

    joint_sets: list[tuple[str, ...]] = []
    if joint and len(candidates) >= 2:
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            notes.append("scipy is not installed: joint sets were not searched")
            candidates_for_lp: list[str] = []
        else:
            candidates_for_lp = candidates
        if candidates_for_lp:
            while len(stats) < len(candidates_for_lp) + _JOINT_MARGIN:
                points.append(probe.perturbed())
                more = probe.point_stats(points[-1], _READOUTS_PER_POINT, candidates_for_lp)
                stats.extend(more)
            ndims = {c: probe.base[c].ndim for c in candidates_for_lp}
            found = _find_joint_sets(candidates_for_lp, ndims, stats, tol, confirm)
            for members, change in found:
                index = len(joint_sets)
                joint_sets.append(tuple(members))
                granularity = TENSOR
                counts = {probe.rows[c][1] for c in members}
                if len(counts) == 1:
                    row_ok = all(
                        _max_cos(
                            sum(s.row_e[c] for c in members if c in s.row_e),
                            sum(s.row_m[c] for c in members if c in s.row_m),
                            zero_floor(s),
                        )
                        <= tol
                        for s in stats
                        if any(c in s.row_e for c in members)
                    )
                    if row_ok:
                        row_change = confirm(members, probe.row_factors(counts.pop()))
                        if row_change <= tol:
                            granularity, change = ROW, max(change, row_change)
                for c in members:
                    if reports[c].get("kind") == JOINT:
                        continue  # already reported with an earlier (overlapping) set
                    reports[c].update(
                        kind=JOINT,
                        joint_group=index,
                        joint_members=tuple(members),
                        joint_granularity=granularity,
                        rescale_change=change,
                        note="",
                    )
    for name in probe.frozen:
        w = dict(probe.model.named_parameters())[name]
        reports[name] = {
            "name": name,
            "shape": tuple(w.shape),
            "kind": FROZEN,
            "note": _KIND_HELP[FROZEN],
            "fx_path": fx_paths.get(name),
        }
    for info in reports.values():
        info.setdefault("kind", NONE)
    order = [n for n, _ in model.named_parameters()]
    return ScaleInvarianceResult(
        reports={n: InvarianceReport(**reports[n]) for n in order if n in reports},
        tol=tol,
        joint_sets=joint_sets,
        warnings=list(dict.fromkeys(notes)),
        fx_error=fx_error,
        n_points=len(points),
    )


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------

_OVERCOMPLETE = ("euclidean", "grassmann")
_JOINTLY = ("euclidean", "grassmann")
_GRANULARITIES = ("row", "tensor", "global")
_JOINT_SETS = ("weights", "all", "none")


def _result_for(
    model: nn.Module,
    batch: Any,
    report: ScaleInvarianceResult | None,
    loss_fn: Callable | None,
    joint: bool,
) -> ScaleInvarianceResult:
    if report is not None:
        missing = [n for n, _ in model.named_parameters() if n not in report]
        if missing:
            raise ValueError(f"Invalid report: it does not cover parameter '{missing[0]}'")
        return report
    if batch is None:
        raise ValueError("Invalid batch: None (pass a probe batch or a precomputed report=)")
    return find_scale_invariant(model, batch, loss_fn=loss_fn, joint=joint)


def _is_norm_or_bias(model: nn.Module, name: str, param: Tensor) -> bool:
    """BN-like affine parameters and biases (every <= 1-D parameter): no weight decay."""
    return param.ndim <= 1 or _is_norm(_owner(model, name)[0])


def _is_overcomplete(model: nn.Module, name: str, param: Tensor) -> bool:
    """More rows than the row length within a group: p/groups > n, so Y Y^T = I is infeasible."""
    module, _ = _owner(model, name)
    groups = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1
    rows = param.shape[0]
    return rows // groups > param[0].numel()


def _drop_empty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]


def grassmann_param_groups(
    model: nn.Module,
    batch: Any,
    *,
    lr: float = 0.01,
    lr_euclidean: float = 0.1,
    weight_decay: float = 5e-4,
    overcomplete: str = "euclidean",
    jointly_invariant: str = "euclidean",
    report: ScaleInvarianceResult | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    **extra: Any,
) -> list[dict]:
    """Parameter groups of Cho & Lee's SGD-G / Adam-G, chosen by structure instead of by name.

    Groups (empty ones are dropped; every trainable parameter appears exactly once):

    * ``"grassmann"``: >= 2-D weights that are scale-invariant per output row (row dim 0), i.e.
      each row is a point of G(1, n): ``{"grassmann": True, "lr": lr, "weight_decay": 0}``.
    * ``"grassmann_overcomplete"`` (only with ``overcomplete="grassmann"``): row-invariant weights
      with more rows than the row length per conv group (p/groups > n). On G(1, n) every row is its
      own sphere, so this is harmless for the update; only the orthogonality regularizer
      (omega/2)||Y Y^T - I||^2 is infeasible, hence ``"omega": 0.0`` in this group.
    * ``"no_decay"``: norm-layer parameters and all <= 1-D parameters (biases), Euclidean,
      ``weight_decay=0`` (the paper's ``bnDecay = 0``).
    * ``"euclidean"``: everything else (head, non-invariant weights), ``lr_euclidean`` and
      ``weight_decay``.

    Policies:
        overcomplete: ``"euclidean"`` (default; the paper's PyTorch code keeps p > n weights, e.g.
            1x1 shortcut convs, Euclidean with weight decay) or ``"grassmann"`` (see above).
            Depthwise/grouped convs are judged per group: a depthwise 3x3 conv (1 row of length 9
            per group) is not overcomplete.
        jointly_invariant: weights invariant only jointly with others (the second conv of a
            pre-activation residual block, summed with the shortcut before the next BN) have an
            individual norm that matters (it balances the branches). ``"euclidean"`` (default)
            keeps them Euclidean with weight decay; ``"grassmann"`` puts them on G(1, n) as the
            paper's code does, which constrains the model (a hard per-row norm) rather than
            exploiting a symmetry.

    Weights ``find_scale_invariant`` marks row-invariant with rows on dim 1 (ConvTranspose) go to
    ``"euclidean"``: SGD-G's rows are dim 0. The optimizer (or the user) should normalize the
    Grassmann rows to unit norm before training (Cho & Lee section 1.1).

    Args:
        batch: probe batch for :func:`find_scale_invariant` (may be None when ``report`` is given).
        report: a precomputed :class:`ScaleInvarianceResult` for this model.
        loss_fn: forwarded to :func:`find_scale_invariant`.
        **extra: further keys (``momentum``, ``grad_clip``, ``omega``, ...) copied into every group;
            the policy keys above take precedence.

    Returns:
        A list of plain dicts for ``normlab.optim.SGDG`` / ``AdamG`` (any torch optimizer accepts
        them; the ``grassmann`` and ``name`` keys are carried along).

    References: Cho & Lee, NIPS 2017, arXiv 1709.09603 (PT code: ``main.py`` parameter groups).
    """
    if overcomplete not in _OVERCOMPLETE:
        raise ValueError(
            f"Invalid overcomplete policy: {overcomplete!r} (expected {_OVERCOMPLETE})"
        )
    if jointly_invariant not in _JOINTLY:
        raise ValueError(
            f"Invalid jointly_invariant policy: {jointly_invariant!r} (expected {_JOINTLY})"
        )
    for key, value in (("lr", lr), ("lr_euclidean", lr_euclidean)):
        if not value >= 0.0:
            raise ValueError(f"Invalid learning rate {key}: {value}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    # Joint sets only matter when they go on the sphere (the search costs the most).
    result = _result_for(model, batch, report, loss_fn, joint=jointly_invariant == "grassmann")
    buckets: dict[str, list[Tensor]] = {
        "grassmann": [],
        "grassmann_overcomplete": [],
        "euclidean": [],
        "no_decay": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        info = result[name]
        on_sphere = info.kind == ROW or (info.kind == JOINT and jointly_invariant == "grassmann")
        if _is_norm_or_bias(model, name, param):
            bucket = "no_decay"
        elif on_sphere and info.row_dim == 0:
            bucket = "grassmann"
            if _is_overcomplete(model, name, param):
                bucket = "grassmann_overcomplete" if overcomplete == "grassmann" else "euclidean"
        else:
            bucket = "euclidean"
        buckets[bucket].append(param)
    sphere = {"grassmann": True, "lr": lr, "weight_decay": 0.0}
    plain = {"grassmann": False, "lr": lr_euclidean}
    return _drop_empty(
        [
            {**extra, "params": buckets["grassmann"], **sphere, "name": "grassmann"},
            {
                **extra,
                "params": buckets["grassmann_overcomplete"],
                **sphere,
                "omega": 0.0,
                "name": "grassmann_overcomplete",
            },
            {
                **extra,
                "params": buckets["euclidean"],
                **plain,
                "weight_decay": weight_decay,
                "name": "euclidean",
            },
            {
                **extra,
                "params": buckets["no_decay"],
                **plain,
                "weight_decay": 0.0,
                "name": "no_decay",
            },
        ]
    )


def scale_invariant_param_groups(
    model: nn.Module,
    batch: Any,
    granularity: str = "row",
    *,
    joint_sets: str = "weights",
    report: ScaleInvarianceResult | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    non_si: Mapping[str, Any] | None = None,
    **extra: Any,
) -> list[dict]:
    """Parameter groups for sphere optimizers, tagged with ``"granularity"``.

    Every scale-invariant group has ``"scale_invariant": True``, ``"geometry": "sphere"`` and a
    ``"granularity"``: ``"row"`` (each output row its own sphere), ``"tensor"`` (each tensor its
    own sphere) or ``"global"`` (one sphere over the concatenation of all tensors in the group).

    * ``granularity="row"``: row-invariant >= 2-D weights (rows on dim 0) -> group ``"si_row"``;
      other individually invariant tensors -> ``"si_tensor"``; each joint set (a disjoint
      selection, ``result.disjoint_joint_sets()``) -> its own ``"global"`` group
      ``"si_joint<k>"`` (only the set's total norm is free).
    * ``granularity="tensor"``: all individually invariant tensors -> ``"si_tensor"``; joint sets
      as above.
    * ``granularity="global"``: all of them in one ``"global"`` group ``"si_global"`` (the union of
      invariant tensors and joint sets is jointly invariant; Kodryan et al.'s joint sphere).

    Everything else goes to ``"non_si"`` (``"scale_invariant": False``, ``"geometry":
    "euclidean"``) with the keys of ``non_si`` (e.g. ``{"lr": 0.0}`` freezes it as in the paper).

    Args:
        joint_sets: which joint sets count as invariant: ``"weights"`` (default: sets with at least
            one >= 2-D tensor; sets made only of norm affine parameters are left to ``non_si``),
            ``"all"`` or ``"none"``.
        report, loss_fn: as in :func:`grassmann_param_groups`.
        **extra: keys copied into every scale-invariant group (e.g. ``elr=1e-3``).

    References: Kodryan et al., NeurIPS 2022, arXiv 2209.03695.
    """
    if granularity not in _GRANULARITIES:
        raise ValueError(f"Invalid granularity: {granularity!r} (expected {_GRANULARITIES})")
    if joint_sets not in _JOINT_SETS:
        raise ValueError(f"Invalid joint_sets: {joint_sets!r} (expected {_JOINT_SETS})")
    result = _result_for(model, batch, report, loss_fn, joint=joint_sets != "none")
    params = dict(model.named_parameters())
    selected_sets = []
    if joint_sets != "none":
        for members in result.disjoint_joint_sets():
            if joint_sets == "all" or any(params[n].ndim >= 2 for n in members):
                selected_sets.append(list(members))
    in_sets = {n for members in selected_sets for n in members}
    row, tensor, rest = [], [], []
    for name, param in params.items():
        if not param.requires_grad or name in in_sets:
            continue
        info = result[name]
        if info.kind == ROW and param.ndim >= 2 and info.row_dim == 0 and granularity == "row":
            row.append(param)
        elif info.kind in (ROW, TENSOR):
            tensor.append(param)
        else:
            rest.append(param)
    sphere = {"scale_invariant": True, "geometry": "sphere"}
    groups: list[dict] = []
    if granularity == "global":
        # Individually invariant tensors and the selected joint sets, in model order.
        chosen = {id(p) for p in tensor} | {id(params[n]) for n in in_sets}
        union = [p for p in params.values() if p.requires_grad and id(p) in chosen]
        groups.append(
            {**extra, "params": union, **sphere, "granularity": "global", "name": "si_global"}
        )
    else:
        groups.append({**extra, "params": row, **sphere, "granularity": "row", "name": "si_row"})
        groups.append(
            {**extra, "params": tensor, **sphere, "granularity": "tensor", "name": "si_tensor"}
        )
        for k, members in enumerate(selected_sets):
            group_params = [params[n] for n in members if params[n].requires_grad]
            groups.append(
                {**extra, "params": group_params, **sphere, "granularity": "global"}
                | {"name": f"si_joint{k}"}
            )
    groups.append(
        {
            **dict(non_si or {}),
            "params": rest,
            "scale_invariant": False,
            "geometry": "euclidean",
            "name": "non_si",
        }
    )
    return _drop_empty(groups)
