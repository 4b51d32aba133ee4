"""The training pipeline: optimizer and schedule registries, callbacks, run directories and the one
training loop."""

from .. import config as _config
from ..models import model_names, model_options
from .callbacks import Callback, CallbackList
from .loop import BASE_COLUMNS, TrainState, evaluate, train
from .optimizers import (
    BuildContext,
    OptimizerSpec,
    build_optimizer,
    optimizer_names,
    optimizer_spec,
    register_optimizer,
    weight_decay_groups,
)
from .rundir import RunDirectory, read_metrics_csv
from .schedules import ScheduleSpec, register_schedule, schedule_names, schedule_spec

_config.register_named_section(
    "model", _config.NamedSection("mlp", model_names, model_options, "the network")
)
_config.register_named_section(
    "optim",
    _config.NamedSection(
        "sgd",
        optimizer_names,
        lambda n: dict(optimizer_spec(n).defaults),
        bounds=lambda n: optimizer_spec(n).option_bounds(),
    ),
)
_config.register_named_section(
    "schedule",
    _config.NamedSection(
        "constant",
        schedule_names,
        lambda n: dict(schedule_spec(n).defaults),
        bounds=lambda n: schedule_spec(n).bounds,
    ),
)

__all__ = [
    "BASE_COLUMNS",
    "BuildContext",
    "Callback",
    "CallbackList",
    "OptimizerSpec",
    "RunDirectory",
    "ScheduleSpec",
    "TrainState",
    "build_optimizer",
    "evaluate",
    "optimizer_names",
    "read_metrics_csv",
    "register_optimizer",
    "register_schedule",
    "schedule_names",
    "train",
    "weight_decay_groups",
]
