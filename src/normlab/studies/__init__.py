"""The studies that reproduce each method's experiment, and the runner they share."""

# The core's own study is ``baseline``; each method's study lives in its method package
# (normlab.methods.*) and is registered, like baseline, lazily: the plotting code a study imports
# loads only when the study is asked for.
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
