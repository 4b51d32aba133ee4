"""The studies that reproduce each method's experiment, and the runner they share."""

from . import baseline  # noqa: F401  (registers the study)
from . import batch_size  # noqa: F401  (registers the study)
from . import riemannian_bn  # noqa: F401  (registers the study)
from . import sphere_regimes  # noqa: F401  (registers the study)
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
