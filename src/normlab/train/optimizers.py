"""The optimizer registry: how a config's ``optim`` section becomes a ``torch.optim.Optimizer``.

An entry is a builder ``build(model, options, context)`` plus the defaults of its options; the
options are validated against those defaults (an unknown option is an error listing the valid ones).
The builder decides the parameter groups, which is where scale-invariant training differs from the
usual recipe (SGD-G puts BN-fed weights on the sphere, SphereSGD forms one joint sphere, ...).

Groups may carry a ``"name"`` key; the training loop reports each named group's learning rate and
weight norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import NON_NEGATIVE, POSITIVE, Bound
from ..registry import load_methods


@dataclass
class BuildContext:
    """What an optimizer builder may look at besides the model and its options."""

    probe_batch: tuple[torch.Tensor, torch.Tensor]  # one training batch on the run's device
    config: dict  # the whole resolved run config
    steps_per_epoch: int


# The valid ranges of the options that optimizers share by name. They apply to every optimizer
# that has the option, so a new optimizer gets them for free; a spec's own ``bounds`` add to or
# override them.
_UNIT = Bound(0.0, 1.0, high_open=True)
COMMON_BOUNDS: dict[str, Bound] = {
    "lr": NON_NEGATIVE,
    "lrg": NON_NEGATIVE,
    "lr_manifold": NON_NEGATIVE,
    "elr": POSITIVE,
    "momentum": _UNIT,
    "beta1": _UNIT,
    "beta2": _UNIT,
    "eps": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "weight_decay_other": NON_NEGATIVE,
    "norm_decay": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE,  # 0 (or none) disables clipping
    "omega": NON_NEGATIVE,
    "radius": POSITIVE,
}


@dataclass
class OptimizerSpec:
    name: str
    build: Callable[[nn.Module, dict, BuildContext], torch.optim.Optimizer]
    defaults: dict
    help: str = ""
    bounds: dict[str, Bound] = field(default_factory=dict)

    def option_bounds(self) -> dict[str, Bound]:
        """The bounds of this optimizer's options: the shared ones it has, then its own."""
        shared = {k: b for k, b in COMMON_BOUNDS.items() if k in self.defaults}
        return {**shared, **self.bounds}


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, overwrite: bool = False) -> None:
    """Make ``optim=NAME`` available to the training loop, the CLI and the studies."""
    if spec.name in _OPTIMIZERS and not overwrite:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _OPTIMIZERS[spec.name] = spec


def optimizer_names() -> list[str]:
    load_methods()
    return list(_OPTIMIZERS)


def optimizer_spec(name: str) -> OptimizerSpec:
    load_methods()
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid choices: {', '.join(_OPTIMIZERS)}"
        ) from None


def build_optimizer(
    model: nn.Module, options: dict, context: BuildContext
) -> torch.optim.Optimizer:
    """Build the optimizer named ``options["name"]`` for ``model``."""
    spec = optimizer_spec(options["name"])
    opts = {k: v for k, v in options.items() if k != "name"}
    return spec.build(model, opts, context)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool
) -> list[dict]:
    """One group with ``weight_decay`` for every parameter, or two groups when
    ``exclude_norm_and_bias``: ``decay`` (weights of dim >= 2) and ``no_decay`` (1-D parameters:
    biases and normalization scales/shifts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay, "name": "all"}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _build_sgd(model: nn.Module, o: dict, context: BuildContext) -> torch.optim.Optimizer:
    groups = weight_decay_groups(model, o["weight_decay"], o["no_decay_norm_and_bias"])
    return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"])


def _build_adam(model: nn.Module, o: dict, context: BuildContext) -> torch.optim.Optimizer:
    groups = weight_decay_groups(model, o["weight_decay"], o["no_decay_norm_and_bias"])
    cls = torch.optim.AdamW if o["decoupled"] else torch.optim.Adam
    return cls(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])


register_optimizer(
    OptimizerSpec(
        "sgd",
        _build_sgd,
        {
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 5e-4,
            "no_decay_norm_and_bias": False,
        },
        "torch.optim.SGD",
    )
)
register_optimizer(
    OptimizerSpec(
        "adam",
        _build_adam,
        {
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "decoupled": False,
            "no_decay_norm_and_bias": False,
        },
        "torch.optim.Adam (AdamW with decoupled=true)",
    )
)
