"""Learning-rate schedules as functions of training progress, stepped once per optimizer step.

Each schedule is a multiplier ``f(step)`` of every group's initial ``lr`` (``torch.optim``'s
``LambdaLR``), so it composes with any optimizer that keeps its step size in ``group["lr"]``.

* ``constant``
* ``multistep``: times ``gamma`` at each milestone; milestones are fractions of training when <= 1
  (``[0.3, 0.6, 0.8]`` = 30 %, 60 %, 80 %) or epoch numbers when > 1; applied at epoch boundaries.
* ``linear``: from 1 down to ``end_factor`` over training, per step (ENorm's schedule).
* ``cosine``: half a cosine from 1 down to ``end_factor``, per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import NON_NEGATIVE, POSITIVE, Bound


@dataclass
class ScheduleSpec:
    name: str
    factor: Callable[..., Callable[[int], float]]  # (options, steps_per_epoch, epochs) -> f(step)
    defaults: dict
    help: str = ""
    bounds: dict[str, Bound] = field(default_factory=dict)


_SCHEDULES: dict[str, ScheduleSpec] = {}


def register_schedule(spec: ScheduleSpec) -> None:
    _SCHEDULES[spec.name] = spec


def schedule_names() -> list[str]:
    return list(_SCHEDULES)


def schedule_spec(name: str) -> ScheduleSpec:
    try:
        return _SCHEDULES[name]
    except KeyError:
        raise ValueError(
            f"unknown schedule {name!r}; valid choices: {', '.join(_SCHEDULES)}"
        ) from None


def build_scheduler(
    optimizer: torch.optim.Optimizer, options: dict, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    spec = schedule_spec(options["name"])
    opts = {k: v for k, v in options.items() if k != "name"}
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, spec.factor(opts, max(1, steps_per_epoch), max(1, epochs))
    )


def _constant(o, steps_per_epoch, epochs):
    return _Constant()


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


class _MultiStep:
    def __init__(self, milestones, gamma, steps_per_epoch, epochs):
        if any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be >= 0, got {list(milestones)}")
        # Milestones in epochs (fractions of training are converted), applied at epoch boundaries.
        self.epochs = sorted(m * epochs if m <= 1 else m for m in milestones)
        self.gamma = gamma
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return self.gamma ** sum(1 for m in self.epochs if epoch >= round(m))


class _Linear:
    def __init__(self, end_factor, total):
        self.end_factor, self.total = end_factor, total

    def __call__(self, step: int) -> float:
        t = min(step / self.total, 1.0)
        return 1.0 + (self.end_factor - 1.0) * t


class _Cosine:
    def __init__(self, end_factor, total):
        self.end_factor, self.total = end_factor, total

    def __call__(self, step: int) -> float:
        t = min(step / self.total, 1.0)
        return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


register_schedule(ScheduleSpec("constant", _constant, {}, "constant learning rate"))
register_schedule(
    ScheduleSpec(
        "multistep",
        lambda o, spe, ep: _MultiStep(o["milestones"], o["gamma"], spe, ep),
        {"milestones": [0.5, 0.75], "gamma": 0.1},
        "lr x gamma at each milestone (fractions of training, or epochs)",
        {"gamma": POSITIVE},
    )
)
register_schedule(
    ScheduleSpec(
        "linear",
        lambda o, spe, ep: _Linear(o["end_factor"], spe * ep),
        {"end_factor": 0.0},
        "linear decay to end_factor over training",
        {"end_factor": NON_NEGATIVE},
    )
)
register_schedule(
    ScheduleSpec(
        "cosine",
        lambda o, spe, ep: _Cosine(o["end_factor"], spe * ep),
        {"end_factor": 0.0},
        "cosine decay to end_factor over training",
        {"end_factor": NON_NEGATIVE},
    )
)
