"""The studies that reproduce each method's experiment, and the runner they share."""

# importing a study module registers its study
from . import baseline, batch_size, enorm, riemannian_bn, sphere_regimes  # noqa: F401
from .base import (
    RunResult,
    RunSpec,
    Study,
    collect_results,
    execute_runs,
    get_study,
    group_by,
    register_study,
    run_all,
    run_study,
    study_names,
)

__all__ = [
    "RunResult",
    "RunSpec",
    "Study",
    "collect_results",
    "execute_runs",
    "get_study",
    "group_by",
    "register_study",
    "run_all",
    "run_study",
    "study_names",
]
