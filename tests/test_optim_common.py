"""Generic optimizer tests, driven by one table of optimizers (the idea of torch's ``OptimizerInfo``).

Every optimizer of :mod:`normlab.optim` is an :class:`OptimizerInfo` row of :data:`OPTIMIZERS`:

* how to build it on the two parameter groups of :class:`TinyModel` (a manifold / scale-invariant
  group and a Euclidean group): the group flags and the ``base`` hyper-parameters;
* ``inputs``: option sets that cover its options (momentum, Nesterov, clipping, omega, dampening,
  betas, eps, granularity, projection, radius, ...), each merged over ``base``;
* ``impls``: the implementations (constructor keywords); the first is the reference that every
  other one must match. A new implementation is one more :class:`Impl` in an entry's ``impls``
  (e.g. ``Impl("fused", {"fused": True})``), and every generic test runs it;
* ``errors``: bad hyper-parameters and the ValueError text that names the parameter.

The tests below are parametrized over the table (ids like ``SGDG-nesterov-clip-foreach``). The
algorithm-specific tests (paper equations, geoopt, torch's SGD/Adam, layouts, zero rows, ...) stay
in tests/test_sgdg.py, tests/test_adamg.py and tests/test_sphere_sgd.py.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.optim.optimizer import required

from normlab.optim import SGDG, AdamG, SphereSGD

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
LOW_PRECISION = (BF16, F16)
DTYPE_NAMES = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One implementation of an optimizer: the constructor keywords that select it."""

    name: str
    kwargs: dict
    #: looser tolerances of this implementation vs the reference (dtype -> atol), if it needs any
    tol: dict = field(default_factory=dict)
    #: run with the entry's rich option set only (each option set of a compiled implementation
    #: costs an inductor compile; tests/test_optim_fused.py covers every option set of it)
    rich_only: bool = False


REFERENCE = Impl("ref", {"foreach": False})  # the readable single-tensor path: the ground truth
FOREACH = Impl("foreach", {"foreach": None})  # the fast path (multi-tensor, fused row maths)
FUSED = Impl("fused", {"fused": True}, rich_only=True)  # one compiled graph per group step


@dataclass(frozen=True)
class OptInput:
    """An option set: keys of the manifold group, of the Euclidean group, constructor keywords."""

    desc: str
    manifold: dict = field(default_factory=dict)
    euclid: dict = field(default_factory=dict)
    ctor: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInput:
    """Bad hyper-parameters: ``kwargs`` go into the constructor (``where="ctor"``) or into one
    group (``"manifold"``/``"euclid"``); a ValueError matching ``match`` is expected."""

    desc: str
    where: str
    kwargs: dict
    match: str


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type
    manifold_flag: dict  # the keys that put a group on the manifold / sphere
    euclid_flag: dict  # the keys of a Euclidean group
    base: OptInput  # merged under every option set (rates)
    inputs: tuple[OptInput, ...]
    errors: tuple[ErrorInput, ...]
    manifold_shapes: tuple[tuple[int, ...], ...]
    euclid_shapes: tuple[tuple[int, ...], ...]
    impls: tuple[Impl, ...] = (REFERENCE, FOREACH, FUSED)
    #: "rows": the manifold rows are unit vectors; "radii": SphereSGD's spheres keep their radius
    invariant: str = "rows"
    #: state keys of a manifold parameter that are tangent vectors at its (new) point
    tangent_state: tuple[str, ...] = ()
    #: what a None gradient means in a manifold group: "skip" (untouched, no state) or "zero"
    #: (SphereSGD: the point still belongs to its sphere, the step is the zero-gradient one)
    manifold_none_grad: str = "skip"
    #: the option set of the tests that run one option set (schedulers, copies, closures, ...)
    rich: str = ""
    #: fast vs reference: absolute tolerance per dtype, over ``FAST_STEPS`` steps
    tol: dict = field(default_factory=lambda: {F64: 1e-10, F32: 1e-5})

    def input(self, desc: str) -> OptInput:
        return next(i for i in self.inputs if i.desc == desc)


ROW_SPHERE_SHAPES = ((8, 3, 3, 3), (16, 8, 3, 3), (5, 7), (6,), (20, 4), (3, 2, 1, 1))
EUCLID_SHAPES = ((3, 5), (5,), (3,))
SPHERE_SHAPES = ((4, 3), (5, 2, 2), (6,), (3, 2, 1, 2))


def _row_sphere_errors(name: str) -> tuple[ErrorInput, ...]:
    """Bad hyper-parameters shared by SGDG and AdamG (RowSphereOptimizer)."""
    return (
        ErrorInput("lr-negative", "ctor", {"lr": -0.1}, r"Invalid learning rate: -0\.1"),
        ErrorInput("lr-nan", "ctor", {"lr": float("nan")}, r"Invalid learning rate: nan"),
        ErrorInput("lr-manifold", "ctor", {"lr_manifold": -1.0}, r"Invalid learning rate: -1\.0"),
        ErrorInput(
            "lr-missing",
            "ctor",
            {"lr": required, "lr_manifold": None},
            r"required optimization parameter lr",
        ),
        ErrorInput("momentum-negative", "manifold", {"momentum": -0.5}, r"Invalid momentum value"),
        ErrorInput("momentum-one", "manifold", {"momentum": 1.0}, r"Invalid momentum value: 1\.0"),
        ErrorInput("momentum-one-euclid", "euclid", {"momentum": 1.0}, r"Invalid momentum value"),
        ErrorInput(
            "weight-decay", "euclid", {"weight_decay": -1e-4}, r"Invalid weight_decay value"
        ),
        ErrorInput("omega", "manifold", {"omega": -0.1}, r"Invalid omega value: -0\.1"),
        ErrorInput("clip-zero", "manifold", {"grad_clip": 0.0}, r"Invalid grad_clip value: 0\.0"),
        ErrorInput("clip-negative", "manifold", {"grad_clip": -2.0}, r"Invalid grad_clip value"),
        ErrorInput(
            "nesterov", "manifold", {"nesterov": True, "momentum": 0.0}, r"Invalid nesterov"
        ),
        ErrorInput(
            "nesterov-euclid", "euclid", {"nesterov": True, "momentum": 0.0}, r"Invalid nesterov"
        ),
        ErrorInput("grassmann-flag", "euclid", {"grassmann": "yes"}, r"Invalid grassmann flag"),
        ErrorInput(
            "ortho-dtype-str", "manifold", {"ortho_dtype": "bfloat16"}, r"Invalid ortho_dtype"
        ),
        ErrorInput(
            "ortho-dtype-int", "manifold", {"ortho_dtype": torch.int8}, r"Invalid ortho_dtype"
        ),
        ErrorInput("foreach", "ctor", {"foreach": "fast"}, r"Invalid foreach"),
        ErrorInput(
            "unknown-key",
            "manifold",
            {"momentun": 0.9},
            rf"Invalid parameter group key\(s\) \['momentun'\] for {name}; valid keys: .*momentum",
        ),
        ErrorInput("lrg-euclid", "euclid", {"lrg": 0.1}, r"Invalid key 'lrg'"),
        ErrorInput("lrg-and-lr", "manifold", {"lr": 0.1, "lrg": 0.2}, r"Invalid lr: 0\.1 and lrg"),
        ErrorInput(
            "rates-disagree",
            "manifold",
            {"lrg": 0.1, "lr_manifold": 0.2},
            r"Invalid manifold rate",
        ),
    )


_SGDG_DAMPENING_ERRORS = (
    ErrorInput(
        "dampening-nesterov",
        "euclid",
        {"momentum": 0.9, "nesterov": True, "dampening": 0.1},
        r"Invalid dampening: Nesterov",
    ),
    ErrorInput(
        "dampening-manifold",
        "manifold",
        {"momentum": 0.9, "dampening": 0.1},
        r"Invalid dampening: 0\.1 in a grassmann group",
    ),
    ErrorInput("dampening-range", "euclid", {"dampening": 1.5}, r"Invalid dampening value: 1\.5"),
)

_ADAMG_ERRORS = (
    ErrorInput(
        "beta1-one", "manifold", {"betas": (1.0, 0.99)}, r"Invalid beta parameter at index 0"
    ),
    ErrorInput(
        "beta2-negative", "manifold", {"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1"
    ),
    ErrorInput("betas-length", "manifold", {"betas": (0.9,)}, r"Invalid betas: \(0\.9,\)"),
    ErrorInput("eps-negative", "manifold", {"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
    ErrorInput("eps-ctor", "ctor", {"eps": -1e-8}, r"Invalid epsilon value"),
    ErrorInput(
        "euclidean-method",
        "euclid",
        {"euclidean": "rmsprop"},
        r"Invalid euclidean method: 'rmsprop'",
    ),
    ErrorInput(
        "beta2-alias", "manifold", {"betas": (0.9, 0.99), "beta2": 0.9}, r"Invalid beta2: 0\.9"
    ),
    ErrorInput(
        "epsilon-alias", "manifold", {"eps": 1e-8, "epsilon": 1e-6}, r"Invalid epsilon: 1e-06"
    ),
)

SGDG_INFO = OptimizerInfo(
    name="SGDG",
    cls=SGDG,
    manifold_flag={"grassmann": True},
    euclid_flag={"grassmann": False},
    base=OptInput("base", ctor={"lr": 0.05, "lr_manifold": 0.3}),
    inputs=(
        OptInput("plain"),
        OptInput("momentum", {"momentum": 0.9}, {"momentum": 0.9, "weight_decay": 5e-4}),
        OptInput("clip", {"momentum": 0.9, "grad_clip": 0.1}, {"momentum": 0.9}),
        OptInput("omega", {"momentum": 0.9, "omega": 0.1}, {"momentum": 0.9}),
        OptInput(
            "omega-clip",
            {"momentum": 0.9, "omega": 0.1, "grad_clip": 0.1, "weight_decay": 5e-4},
            {"momentum": 0.9, "weight_decay": 5e-4},
        ),
        OptInput(
            "nesterov",
            {"momentum": 0.9, "nesterov": True},
            {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        ),
        OptInput(
            "nesterov-omega-clip",
            {"momentum": 0.5, "nesterov": True, "omega": 0.2, "grad_clip": 0.05},
            {"momentum": 0.5, "nesterov": True},
        ),
        OptInput("dampening", {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3}),
        OptInput("lrg", {"lrg": 0.1, "momentum": 0.9, "omega": 0.1}, {"lr": 0.02}),
        OptInput(
            "ctor-defaults",
            ctor={"momentum": 0.9, "nesterov": True, "omega": 0.1, "grad_clip": 0.1},
        ),
    ),
    errors=_row_sphere_errors("SGDG") + _SGDG_DAMPENING_ERRORS,
    manifold_shapes=ROW_SPHERE_SHAPES,
    euclid_shapes=EUCLID_SHAPES,
    tangent_state=("momentum_buffer",),
    rich="omega-clip",
)

ADAMG_INFO = OptimizerInfo(
    name="AdamG_sgd",
    cls=AdamG,
    manifold_flag={"grassmann": True},
    euclid_flag={"grassmann": False},
    base=OptInput("base", ctor={"lr": 0.05, "lr_manifold": 0.2, "euclidean": "sgd"}),
    inputs=(
        OptInput("plain"),
        OptInput("clip", {"grad_clip": 0.1}, {"momentum": 0.9}),
        OptInput("omega", {"omega": 0.1}, {"momentum": 0.9, "nesterov": True}),
        OptInput(
            "omega-clip",
            {"omega": 0.1, "grad_clip": 0.1},
            {"momentum": 0.9, "dampening": 0.3, "weight_decay": 5e-4},
        ),
        OptInput(
            "betas-eps-clip",
            {"betas": (0.5, 0.9), "eps": 1e-4, "grad_clip": 0.3},
            {"momentum": 0.9, "weight_decay": 5e-4},
        ),
        OptInput("aliases", {"beta2": 0.95, "epsilon": 1e-6}, {"momentum": 0.5}),
    ),
    errors=_row_sphere_errors("AdamG") + _SGDG_DAMPENING_ERRORS[:2] + _ADAMG_ERRORS,
    manifold_shapes=ROW_SPHERE_SHAPES,
    euclid_shapes=EUCLID_SHAPES,
    tangent_state=("exp_avg",),
    rich="omega-clip",
)

ADAMG_ADAM_INFO = OptimizerInfo(
    name="AdamG_adam",
    cls=AdamG,
    manifold_flag={"grassmann": True},
    euclid_flag={"grassmann": False},
    base=OptInput("base", ctor={"lr": 0.01, "lr_manifold": 0.2, "euclidean": "adam"}),
    inputs=(
        OptInput("plain"),
        OptInput("clip", {"grad_clip": 0.1}),
        OptInput("omega-clip", {"omega": 0.1, "grad_clip": 0.1}, {"weight_decay": 1e-3}),
        OptInput(
            "betas-eps",
            {"betas": (0.5, 0.9), "eps": 1e-4, "grad_clip": 0.3},
            {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 5e-4},
        ),
        OptInput("ctor-defaults", ctor={"betas": (0.8, 0.9), "eps": 1e-6, "omega": 0.1}),
    ),
    errors=_row_sphere_errors("AdamG")
    + _ADAMG_ERRORS
    + (
        ErrorInput(
            "dampening-adam",
            "euclid",
            {"dampening": 0.1},
            r"Invalid dampening: it applies to euclidean='sgd' groups only",
        ),
    ),
    manifold_shapes=ROW_SPHERE_SHAPES,
    euclid_shapes=EUCLID_SHAPES,
    tangent_state=("exp_avg",),
    rich="betas-eps",
)


def _sphere_inputs() -> tuple[OptInput, ...]:
    inputs = []
    for granularity in ("global", "tensor", "row"):
        for momentum, project in ((0.0, False), (0.5, False), (0.0, True), (0.5, True)):
            desc = granularity + ("-momentum" if momentum else "") + ("-project" if project else "")
            manifold = {"granularity": granularity, "momentum": momentum}
            manifold["project_gradient"] = project
            euclid = {"momentum": 0.9, "weight_decay": 5e-4} if momentum else {}
            inputs.append(OptInput(desc, manifold, euclid))
    inputs.append(
        OptInput("global-radius", {"radius": 2.5, "momentum": 0.9}, {"momentum": 0.9, "lr": 0.05})
    )
    inputs.append(OptInput("row-radius", {"radius": 0.5, "granularity": "row", "elr": 0.05}))
    inputs.append(OptInput("lr-alias", {"lr": 0.01, "momentum": 0.5}, ctor={"elr": None}))
    return tuple(inputs)


SPHERE_INFO = OptimizerInfo(
    name="SphereSGD",
    cls=SphereSGD,
    manifold_flag={"scale_invariant": True},
    euclid_flag={"scale_invariant": False},
    base=OptInput("base", euclid={"lr": 0.1}, ctor={"elr": 0.02}),
    inputs=_sphere_inputs(),
    errors=(
        ErrorInput("elr-negative", "ctor", {"elr": -1.0}, r"Invalid elr: -1\.0"),
        ErrorInput("elr-nan", "ctor", {"elr": float("nan")}, r"Invalid elr: nan"),
        ErrorInput("elr-missing", "ctor", {"elr": None}, r"Invalid elr: None"),
        ErrorInput("elr-group", "manifold", {"elr": -0.5}, r"Invalid elr: -0\.5"),
        ErrorInput("momentum-one", "ctor", {"momentum": 1.0}, r"Invalid momentum: 1\.0"),
        ErrorInput("momentum-negative", "manifold", {"momentum": -0.1}, r"Invalid momentum: -0\.1"),
        ErrorInput("momentum-euclid", "euclid", {"momentum": 1.0}, r"Invalid momentum: 1\.0"),
        ErrorInput(
            "granularity", "manifold", {"granularity": "filter"}, r"Invalid granularity: 'filter'"
        ),
        ErrorInput("radius-zero", "manifold", {"radius": 0.0}, r"Invalid radius: 0\.0"),
        ErrorInput("radius-negative", "ctor", {"radius": -2.0}, r"Invalid radius: -2\.0"),
        ErrorInput(
            "weight-decay-si", "manifold", {"weight_decay": 1e-4}, r"Invalid weight_decay: 0\.0001"
        ),
        ErrorInput(
            "weight-decay-euclid", "euclid", {"weight_decay": -1.0}, r"Invalid weight_decay: -1\.0"
        ),
        ErrorInput(
            "project-gradient",
            "manifold",
            {"project_gradient": "yes"},
            r"Invalid project_gradient: 'yes'",
        ),
        ErrorInput("foreach", "ctor", {"foreach": "fast"}, r"Invalid foreach: 'fast'"),
        ErrorInput("lr-missing-euclid", "euclid", {"lr": None}, r"Invalid lr: None"),
        ErrorInput("lr-negative-euclid", "euclid", {"lr": -1.0}, r"Invalid lr: -1\.0"),
        ErrorInput(
            "elr-lr-alias", "manifold", {"elr": 0.1, "lr": 0.2}, r"Invalid lr: 0\.2.* alias"
        ),
        ErrorInput(
            "scale-invariant-flag",
            "manifold",
            {"scale_invariant": "no"},
            r"Invalid scale_invariant: 'no'",
        ),
        ErrorInput(
            "unknown-key",
            "manifold",
            {"granularty": "row"},
            r"Invalid parameter group key\(s\) \['granularty'\] for SphereSGD; valid keys: "
            r".*granularity",
        ),
    ),
    manifold_shapes=SPHERE_SHAPES,
    euclid_shapes=EUCLID_SHAPES,
    invariant="radii",
    manifold_none_grad="zero",
    rich="tensor-momentum-project",
    # float64: tighter than rtol 1e-13 + atol 1e-14 (measured: 2e-15 after 60 steps)
    tol={F64: 1e-14, F32: 1e-5},
)

OPTIMIZERS = (SGDG_INFO, ADAMG_INFO, ADAMG_ADAM_INFO, SPHERE_INFO)


# ------------------------------------------------------------------------------------------------
# parametrization
# ------------------------------------------------------------------------------------------------


def _cases(*, inputs: str = "all", impls: str = "all", extra=((None, ""),)):
    """pytest params over the table: ``(info, input, impl, extra)`` with readable ids.

    ``inputs``: "all" option sets or the entry's "rich" one; ``impls``: "all" or "fast" (all
    but the reference); ``extra``: (value, id) pairs, one case each.
    """
    cases = []
    for info in OPTIMIZERS:
        chosen = info.inputs if inputs == "all" else (info.input(info.rich),)
        impl_list = {"all": info.impls, "fast": info.impls[1:]}[impls]
        for inp in chosen:
            for impl in impl_list:
                if impl.rich_only and inp.desc != info.rich:
                    continue
                for value, tag in extra:
                    parts = [info.name, inp.desc, impl.name, tag]
                    cases.append(
                        pytest.param(info, inp, impl, value, id="-".join(p for p in parts if p))
                    )
    return cases


def _error_cases():
    return [
        pytest.param(info, err, id=f"{info.name}-{err.desc}")
        for info in OPTIMIZERS
        for err in info.errors
    ]


# ------------------------------------------------------------------------------------------------
# the model, its gradients, building and running optimizers
# ------------------------------------------------------------------------------------------------


def _num_rows(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() > 1 else 1


class TinyModel(nn.Module):
    """A manifold group (the entry's shapes) and a Euclidean group, with a smooth test loss.

    The loss is scale-invariant in every row of every manifold tensor (so per tensor and jointly
    too) and quadratic in the Euclidean tensors; it is computed in float64 from upcast parameters,
    so the gradients of low-precision parameters are their float64 gradients, rounded once.
    """

    def __init__(self, info: OptimizerInfo, seed: int, dtype=F32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def make(shapes):
            return nn.ParameterList(
                nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype)) for s in shapes
            )

        self.manifold = make(info.manifold_shapes)
        self.euclid = make(info.euclid_shapes)

    def forward(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + step)
        total = torch.zeros((), dtype=F64)
        for p in self.manifold:
            rows = p.to(F64).reshape(_num_rows(p), -1)
            unit = rows / rows.norm(dim=1, keepdim=True)
            a = 0.5 * torch.randn(rows.shape, generator=gen, dtype=F64)
            b = 0.5 * torch.randn(rows.shape, generator=gen, dtype=F64)
            total = total + nn.functional.softplus((a * unit).sum(1)).sum()
            total = total + ((b * unit).sum(1) ** 2).sum()
        for p in self.euclid:
            target = torch.randn(p.shape, generator=gen, dtype=F64)
            total = total + 0.5 * ((p.to(F64) - target) ** 2).sum()
        return total


def _groups(info: OptimizerInfo, inp: OptInput, model: TinyModel) -> list[dict]:
    manifold = {**info.manifold_flag, **info.base.manifold, **inp.manifold}
    euclid = {**info.euclid_flag, **info.base.euclid, **inp.euclid}
    return [
        {"params": list(model.manifold), **manifold},
        {"params": list(model.euclid), **euclid},
    ]


def _ctor(info: OptimizerInfo, inp: OptInput, impl: Impl | None) -> dict:
    return {**info.base.ctor, **inp.ctor, **(impl.kwargs if impl else {})}


def build(info, inp, impl, model, groups: Callable[[list], list] | None = None):
    """The entry's optimizer on ``model``'s two groups (``groups`` may select/reorder them)."""
    param_groups = _groups(info, inp, model)
    if groups is not None:
        param_groups = groups(param_groups)
    return info.cls(param_groups, **_ctor(info, inp, impl))


def _all_params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def set_random_grads(params, seed: int, step: int, none=(), scale: float = 1.0) -> None:
    """Gradients that do not depend on the point (no feedback): N(0, scale^2) in the params'
    dtype; the parameters at the positions in ``none`` get None."""
    gen = torch.Generator().manual_seed(1_000 * seed + step)
    for k, p in enumerate(params):
        g = (scale * torch.randn(p.shape, generator=gen, dtype=F64)).to(p.dtype)
        p.grad = None if k in none else g


def set_loss_grads(model: TinyModel, step: int) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(step)
    loss.backward()
    return loss.item()


def train(model, opt, steps: range) -> list[float]:
    """Steps on the model's loss; returns the losses."""
    losses = []
    for step in steps:
        losses.append(set_loss_grads(model, step))
        opt.step()
    return losses


def _hyper(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_same_state(opt_a, opt_b, *, atol: float | None = None) -> None:
    """Same parameters and state, bit for bit (``atol=None``) or within ``atol``."""
    params_a, params_b = _all_params(opt_a), _all_params(opt_b)
    assert len(params_a) == len(params_b)
    for k, (pa, pb) in enumerate(zip(params_a, params_b)):
        if atol is None:
            assert torch.equal(pa, pb), f"parameter {k} differs"
        else:
            torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=f"parameter {k}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), f"parameter {k}: state keys {sa.keys()} != {sb.keys()}"
        for key, va in sa.items():
            vb = sb[key]
            if not torch.is_tensor(va):
                assert va == vb
                continue
            assert (va.dtype, va.device, va.shape) == (vb.dtype, vb.device, vb.shape), key
            if atol is None or key == "step":
                assert torch.equal(va, vb), f"parameter {k}: state {key!r} differs"
            else:
                torch.testing.assert_close(va, vb, rtol=0, atol=atol, msg=f"{k}: {key}")


def _spheres(info: OptimizerInfo, opt) -> list[torch.Tensor]:
    """The norms of every sphere of the manifold group (float64, written without normlab)."""
    group = opt.param_groups[0]
    params = [p.detach().to(F64) for p in group["params"]]
    if info.invariant == "rows":
        return [p.reshape(_num_rows(p), -1).norm(dim=1) for p in params]
    granularity = group["granularity"]
    if granularity == "global":
        return [torch.cat([p.reshape(-1) for p in params]).norm().reshape(1)]
    if granularity == "tensor":
        return [p.norm().reshape(1) for p in params]
    return [p.reshape(_num_rows(p), -1).norm(dim=1) for p in params]


def check_invariants(info: OptimizerInfo, opt, start: list[torch.Tensor], rtol: float) -> None:
    """Rows stay unit vectors (SGDG/AdamG), spheres keep their radius (SphereSGD); manifold
    momenta stay tangent; every parameter and state tensor is finite."""
    now = _spheres(info, opt)
    for k, (a, b) in enumerate(zip(now, start)):
        target = torch.ones_like(a) if info.invariant == "rows" else b
        torch.testing.assert_close(a, target, rtol=rtol, atol=0, msg=f"sphere norms of {k}")
    group = opt.param_groups[0]
    for k, p in enumerate(group["params"]):
        state = opt.state.get(p, {})
        if info.invariant == "radii" and "radius" in state:
            radius = state["radius"].double().reshape(-1)
            torch.testing.assert_close(
                radius, start[0 if len(start) == 1 else k], rtol=rtol, atol=0
            )
        for key in info.tangent_state:
            if key in state:
                y = p.detach().to(F64).reshape(_num_rows(p), -1)
                tau = state[key].to(F64).reshape(y.shape)
                cos = (y * tau).sum(1).abs() / (y.norm(dim=1) * tau.norm(dim=1)).clamp_min(1e-300)
                assert cos.max() < min(max(50 * rtol, 1e-10), 0.05), f"{key} of {k} is not tangent"
    for p in _all_params(opt):
        assert torch.isfinite(p).all()
        for v in opt.state.get(p, {}).values():
            assert not torch.is_tensor(v) or torch.isfinite(v).all()


def _rtol(dtype) -> float:
    return {F64: 1e-12, F32: 2e-6, BF16: 1e-2, F16: 2e-3}[dtype]


# ------------------------------------------------------------------------------------------------
# fast vs reference
# ------------------------------------------------------------------------------------------------

FAST_STEPS = 60
FAST_SEEDS = (0, 1, 2)
#: gradient scale of the comparison: float64 takes the large random steps of the old per-file
#: tests (several radians per step with momentum); in float32 the rounding of such steps grows
#: along the trajectory (~1e-2 after 60 steps) whatever the implementation, so float32 takes
#: steps of a realistic size
FAST_GRAD_SCALE = {F64: 1.0, F32: 0.1}


def _none_at(info: OptimizerInfo, step: int) -> tuple[int, ...]:
    """Missing gradients along the trajectory: one manifold and one Euclidean tensor at step 2,
    the whole Euclidean group at step 5 (positions in the flat list of the two groups)."""
    n = len(info.manifold_shapes)
    if step == 2:
        return (1, n)
    if step == 5:
        return tuple(range(n, n + len(info.euclid_shapes)))
    return ()


@pytest.mark.parametrize(
    "info,inp,impl,dtype",
    _cases(impls="fast", extra=((F64, "f64"), (F32, "f32"))),
)
def test_fast_matches_reference(info, inp, impl, dtype):
    """Every implementation equals the reference over 60 steps (float64 1e-10 or tighter,
    float32 1e-5), parameters and every state tensor; the invariants hold on both."""
    for seed in FAST_SEEDS:
        runs = []
        for im in (info.impls[0], impl):
            model = TinyModel(info, seed, dtype)
            opt = build(info, inp, im, model)
            start = _spheres(info, opt)
            for step in range(FAST_STEPS):
                none = _none_at(info, step)
                set_random_grads(_all_params(opt), seed, step, none, FAST_GRAD_SCALE[dtype])
                opt.step()
            check_invariants(info, opt, start, _rtol(dtype))
            runs.append(opt)
        assert_same_state(*runs, atol=max(info.tol[dtype], impl.tol.get(dtype, 0.0)))


# ------------------------------------------------------------------------------------------------
# state_dict: round trip, resume in every precision, the loaded state's dtype
# ------------------------------------------------------------------------------------------------


def _other_input(info: OptimizerInfo, inp: OptInput) -> OptInput:
    """A different option set with the same groups: the loaded state_dict must overwrite it."""
    return next(i for i in info.inputs if i.desc != inp.desc)


def _expected_state_dtype(info, in_manifold: bool, p: torch.Tensor, key: str) -> torch.dtype:
    """The rule: manifold state in float32 for float16/bfloat16 parameters (the parameter's
    dtype otherwise); Euclidean state in the parameter's dtype (torch's rule); ``step`` counters
    float32 (torch keeps them)."""
    if key == "step":
        return F32
    if in_manifold and p.dtype in LOW_PRECISION:
        return F32
    return p.dtype


def check_state_dtypes(info, opt) -> None:
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    expected = _expected_state_dtype(info, gi == 0, p, key)
                    assert value.dtype == expected, (gi, key, value.dtype, expected)
                    assert value.device == p.device


@pytest.mark.parametrize("info,inp,impl,_", _cases())
def test_state_dict_round_trip_is_bit_exact(info, inp, impl, _):
    """k steps, save, a fresh optimizer (other hyper-parameters, other model) loads both
    checkpoints and continues: bit for bit the uninterrupted run; hyper-parameters come from the
    state_dict."""
    model = TinyModel(info, 0)
    opt = build(info, inp, impl, model)
    train(model, opt, range(4))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    losses = train(model, opt, range(4, 9))

    # resume in the usual order: build model and optimizer, then load both checkpoints (building
    # an optimizer may change the parameters: unit rows, the radius option)
    fresh = TinyModel(info, 99)
    resumed = build(info, _other_input(info, inp), impl, fresh)
    fresh.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    assert _hyper(resumed) == [
        {k: v for k, v in g.items() if k != "params"} for g in saved_opt["param_groups"]
    ]
    assert train(fresh, resumed, range(4, 9)) == losses
    assert_same_state(opt, resumed)
    assert _hyper(resumed) == _hyper(opt)


RESUME_AT, RESUME_STEPS = 5, 20


@pytest.mark.parametrize(
    "info,inp,impl,dtype",
    _cases(extra=((BF16, "bf16"), (F16, "f16"), (F32, "f32"))),
)
def test_resume_equals_uninterrupted(info, inp, impl, dtype, tmp_path):
    """bfloat16/float16/float32 parameters: resumed through a state_dict or through a file
    (torch.save / torch.load) the run equals the uninterrupted one bit for bit, the loaded state
    follows the dtype rule, the invariants hold."""
    model = TinyModel(info, 1, dtype)
    opt = build(info, inp, impl, model)
    start = _spheres(info, opt)
    train(model, opt, range(RESUME_AT))
    check_state_dtypes(info, opt)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}
    in_memory = copy.deepcopy(checkpoint)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    losses = train(model, opt, range(RESUME_AT, RESUME_STEPS))
    check_invariants(info, opt, start, _rtol(dtype))
    for source in ("state_dict", "file"):
        saved = in_memory if source == "state_dict" else torch.load(tmp_path / "checkpoint.pt")
        fresh = TinyModel(info, 2, dtype)
        resumed = build(info, inp, impl, fresh)
        fresh.load_state_dict(saved["model"])
        resumed.load_state_dict(saved["opt"])
        check_state_dtypes(info, resumed)
        assert train(fresh, resumed, range(RESUME_AT, RESUME_STEPS)) == losses, source
        assert_same_state(opt, resumed)


@pytest.mark.parametrize("impl", (REFERENCE, FOREACH), ids=lambda i: i.name)
def test_regression_bf16_adamg_adam_after_load_state_dict(impl, tmp_path):
    """Issue 10: AdamG(euclidean="adam") with bfloat16 parameters after load_state_dict (its
    Euclidean Adam state was put in float32); the resumed run equals the uninterrupted one."""
    info = ADAMG_ADAM_INFO
    test_resume_equals_uninterrupted(info, info.input("betas-eps"), impl, BF16, tmp_path)


@pytest.mark.parametrize("impl", (REFERENCE, FOREACH), ids=lambda i: i.name)
def test_regression_bf16_sgdg_resume_equals_uninterrupted(impl, tmp_path):
    """Issue 10: a resumed bfloat16 SGD-G run equals the uninterrupted one (float32 momentum)."""
    info = SGDG_INFO
    test_resume_equals_uninterrupted(info, info.input("nesterov-omega-clip"), impl, BF16, tmp_path)


# ------------------------------------------------------------------------------------------------
# missing gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info,inp,impl,_", _cases())
def test_none_and_zero_grads(info, inp, impl, _):
    """A step without any gradient changes nothing; a parameter without a gradient is untouched
    and gets no state (SphereSGD manifold groups: it steps as with a zero gradient); a group whose
    gradients are all None is skipped (parameters and state); zero gradients are safe."""
    model = TinyModel(info, 3)
    opt = build(info, inp, impl, model)
    params = _all_params(opt)
    manifold, euclid = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    n = len(manifold)
    start = _spheres(info, opt)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients at all
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not any(opt.state.get(p) for p in params)

    # manifold[0] gets a zero gradient; manifold[1] and euclid[1] none. The twin gets zeros for
    # manifold[1] (the meaning of None in SphereSGD's manifold groups)
    twin = build(info, inp, impl, TinyModel(info, 3))
    set_random_grads(params, 0, 0, none=(1, n + 1))
    set_random_grads(_all_params(twin), 0, 0, none=(n + 1,))
    manifold[0].grad.zero_()
    for p in twin.param_groups[0]["params"][:2]:
        p.grad.zero_()
    opt.step()
    twin.step()
    assert torch.equal(euclid[1], before[n + 1]) and not opt.state.get(euclid[1])
    if info.manifold_none_grad == "skip":
        assert torch.equal(manifold[1], before[1]) and not opt.state.get(manifold[1])
    else:
        assert_same_state(opt, twin)
    check_invariants(info, opt, start, _rtol(F32))

    # then a step without the Euclidean group's gradients, and one without the manifold group's
    for step, (missing, moved) in enumerate(((euclid, manifold), (manifold, euclid)), start=1):
        snapshot = copy.deepcopy(opt.state_dict()["state"])
        kept = [p.detach().clone() for p in missing]
        moved_before = [p.detach().clone() for p in moved]
        set_random_grads(params, 0, step)
        for p in missing:
            p.grad = None
        opt.step()
        assert all(torch.equal(p, k) for p, k in zip(missing, kept))
        state = opt.state_dict()["state"]
        for i, p in enumerate(params):
            if any(p is q for q in missing):
                now, was = state.get(i, {}), snapshot.get(i, {})
                assert now.keys() == was.keys()
                assert all(torch.equal(now[k], was[k]) for k in now if torch.is_tensor(now[k]))
        assert any(not torch.equal(p, b) for p, b in zip(moved, moved_before))
    check_invariants(info, opt, start, _rtol(F32))


@pytest.mark.parametrize("info,inp,impl,_", _cases())
def test_step_never_modifies_grads(info, inp, impl, _):
    model = TinyModel(info, 4)
    opt = build(info, inp, impl, model)
    for step in range(3):
        set_loss_grads(model, step)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


# ------------------------------------------------------------------------------------------------
# learning-rate schedulers
# ------------------------------------------------------------------------------------------------

SCHED_STEPS = 12
SCHEDULERS = (
    (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.3), "StepLR"),
    (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e)), "LambdaLR"),
    (
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[2.0 * g["lr"] for g in opt.param_groups],
            total_steps=SCHED_STEPS,
            cycle_momentum=False,
        ),
        "OneCycleLR",
    ),
    (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SCHED_STEPS), "Cosine"),
)


def _state_snapshot(opt) -> dict:
    return {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
        for p in _all_params(opt)
    }


@pytest.mark.parametrize("info,inp,impl,make_scheduler", _cases(inputs="rich", extra=SCHEDULERS))
def test_lr_scheduler_reaches_the_step_and_keeps_the_state(info, inp, impl, make_scheduler):
    """A scheduler's lr is the lr of the next step (bit for bit the run that sets the group's
    "lr" by hand; SphereSGD: "lr" is the ELR of a scale-invariant group), a scheduler step never
    touches the state, and the schedule matters (the constant-lr run differs)."""
    model = TinyModel(info, 5)
    opt = build(info, inp, impl, model)
    scheduler = make_scheduler(opt)
    lrs = []
    for step in range(SCHED_STEPS):
        lrs.append([g["lr"] for g in opt.param_groups])
        set_loss_grads(model, step)
        opt.step()
        if info.cls is SphereSGD:
            assert opt.param_groups[0]["elr"] == lrs[-1][0]  # "lr" is the ELR alias
        before = _state_snapshot(opt)
        scheduler.step()
        after = _state_snapshot(opt)
        assert before.keys() == after.keys()
        for pid, state in before.items():
            assert state.keys() == after[pid].keys()
            for k, v in state.items():
                assert torch.equal(v, after[pid][k]) if torch.is_tensor(v) else v == after[pid][k]
    assert len({tuple(lr) for lr in lrs}) > 1

    by_hand_model = TinyModel(info, 5)
    by_hand = build(info, inp, impl, by_hand_model)
    constant_model = TinyModel(info, 5)
    constant = build(info, inp, impl, constant_model)
    for step in range(SCHED_STEPS):
        for g, lr in zip(by_hand.param_groups, lrs[step]):
            g["lr"] = lr
        set_loss_grads(by_hand_model, step)
        by_hand.step()
        set_loss_grads(constant_model, step)
        constant.step()
    assert_same_state(opt, by_hand)
    for g_sched, g_const in zip(opt.param_groups, constant.param_groups):  # every group's
        pairs = zip(g_sched["params"], g_const["params"])
        assert any(not torch.equal(a, b) for a, b in pairs)
    for p in _all_params(opt):  # the state lived through every lr change
        if "step" in opt.state.get(p, {}):
            assert opt.state[p]["step"].item() == SCHED_STEPS


# ------------------------------------------------------------------------------------------------
# bad hyper-parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info,err", _error_cases())
def test_bad_hyper_parameters_raise(info, err):
    """A ValueError that names the parameter, in the constructor and in add_param_group (which
    then leaves the optimizer and the parameters as they were)."""
    inp = OptInput("bad")
    model = TinyModel(info, 6)
    groups = _groups(info, inp, model)
    ctor = _ctor(info, inp, None)
    if err.where == "ctor":
        ctor.update(err.kwargs)
    else:
        groups[0 if err.where == "manifold" else 1].update(err.kwargs)
    with pytest.raises(ValueError, match=err.match):
        info.cls(groups, **ctor)
    if err.where == "ctor":
        return
    bad = 0 if err.where == "manifold" else 1
    opt = info.cls([_groups(info, inp, model)[1 - bad]], **_ctor(info, inp, None))
    hyper = _hyper(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=err.match):
        opt.add_param_group(groups[bad])
    assert _hyper(opt) == hyper
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------------------------------------
# copies, closures, zero_grad, add_param_group
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info,inp,impl,_", _cases(inputs="rich"))
def test_deepcopy_and_pickle_continue_identically(info, inp, impl, _):
    model = TinyModel(info, 7)
    opt = build(info, inp, impl, model)
    start = _spheres(info, opt)
    for step in range(3):
        set_random_grads(_all_params(opt), 7, step)
        opt.step()
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for step in range(3, 6):
        set_random_grads(_all_params(opt), 7, step)
        opt.step()
    for clone in clones:
        assert _hyper(clone) == [
            {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
        ]
        assert not any(p is q for p in _all_params(clone) for q in _all_params(opt))
        for step in range(3, 6):
            set_random_grads(_all_params(clone), 7, step)
            clone.step()
        assert_same_state(opt, clone)
        check_invariants(info, clone, start, _rtol(F32))


@pytest.mark.parametrize("info,inp,impl,_", _cases(inputs="rich"))
def test_closure_loss_is_returned_and_used(info, inp, impl, _):
    model, twin_model = TinyModel(info, 8), TinyModel(info, 8)
    opt, twin = build(info, inp, impl, model), build(info, inp, impl, twin_model)
    for step in range(3):
        returned = []

        def closure(step=step, returned=returned):
            opt.zero_grad()
            loss = model(step)
            loss.backward()
            returned.append(loss)
            return loss

        assert opt.step(closure) is returned[0]
        set_loss_grads(twin_model, step)
        assert twin.step() is None
    assert_same_state(opt, twin)


@pytest.mark.parametrize("info,inp,impl,_", _cases(inputs="rich"))
def test_zero_grad(info, inp, impl, _):
    model = TinyModel(info, 9)
    opt = build(info, inp, impl, model)
    set_loss_grads(model, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "info,inp,impl,later", _cases(inputs="rich", extra=((1, "euclid"), (0, "manifold")))
)
def test_add_param_group_later(info, inp, impl, later):
    """Adding a group after k steps equals having it from the start with no gradients (so that it
    was skipped) for those k steps; a manifold group added later is put on the manifold then."""
    model, twin_model = TinyModel(info, 10), TinyModel(info, 10)
    opt = build(info, inp, impl, model, groups=lambda g: [g[1 - later]])
    twin = build(info, inp, impl, twin_model, groups=lambda g: [g[1 - later], g[later]])
    for step in range(6):
        if step == 3:
            opt.add_param_group(_groups(info, inp, model)[later])
        set_loss_grads(model, step)
        set_loss_grads(twin_model, step)
        if step < 3:
            for p in twin.param_groups[1]["params"]:
                p.grad = None
        opt.step()
        twin.step()
    assert_same_state(opt, twin)
    assert _hyper(opt) == _hyper(twin)
