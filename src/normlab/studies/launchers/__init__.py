"""Where a study's runs go: ``launcher=local`` (worker processes here, the default) or
``launcher=slurm`` (one Slurm job per run through submitit, see :mod:`.slurm`).

The ``launcher.*`` options, each written once here with its default::

    launcher=slurm launcher.partition=gpu launcher.gpus_per_run=1 launcher.cpus_per_run=8 \\
        launcher.mem_gb=32 launcher.timeout_min=240 launcher.max_timeouts=20 \\
        launcher.array_parallelism=32 \\
        launcher.account=ACC launcher.qos=QOS launcher.constraint=a100 \\
        launcher.setup='["module load cuda"]' launcher.slurm_extra='{"exclusive": true}'

and the study-level switches ``wait`` (block with a progress bar until every job ended),
``report_only`` (write the report from what exists, submit nothing) and ``cancel`` (cancel the
study's queued and running jobs).
"""

from __future__ import annotations

from ...config import NON_NEGATIVE, POSITIVE, Bound, check_bounds
from ...errors import ConfigError

LAUNCHERS = ("local", "slurm")

SLURM_DEFAULTS: dict[str, object] = {
    "partition": None,  # Slurm's default partition when None
    "gpus_per_run": 0,  # > 1: one task per GPU, the loop's DDP path (torchrun's environment)
    "cpus_per_run": 2,
    "mem_gb": 8.0,
    "timeout_min": 60,  # a run that needs longer is checkpointed, requeued and resumed
    "max_timeouts": 20,  # time limits one run may hit (each one requeues it); preemptions are free
    "array_parallelism": 64,  # runs of the array running at once
    "account": None,
    "qos": None,
    "constraint": None,
    "setup": [],  # shell lines before each run (module loads, conda activate, ...)
    "slurm_extra": {},  # any other sbatch option, e.g. {"exclusive": true}
}
SLURM_BOUNDS = {
    "gpus_per_run": NON_NEGATIVE,
    "cpus_per_run": Bound(1),
    "mem_gb": POSITIVE,
    # Slurm warns 90 s before the limit: a shorter limit would be warned at once, every time
    "timeout_min": Bound(2),
    "max_timeouts": NON_NEGATIVE,
    "array_parallelism": Bound(1),
}
SWITCHES = {"wait": True, "report_only": False, "cancel": False}


def launcher_options(given) -> dict:
    """The resolved ``launcher`` section: ``{"name": ..., **options}`` (an error names the
    unknown option or bad value and lists the valid ones)."""
    if given is None:
        return {"name": "local"}
    if isinstance(given, str):
        given = {"name": given}
    if not isinstance(given, dict):
        raise ConfigError(
            f"launcher takes local or slurm (and launcher.OPTION=VALUE), got {given!r}"
        )
    name = given.get("name", "slurm" if len(given) else "local")
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {name!r}; valid choices: {', '.join(LAUNCHERS)}")
    options = {k: v for k, v in given.items() if k != "name"}
    if name == "local":
        if options:
            raise ConfigError(f"launcher=local takes no options, got {sorted(options)}")
        return {"name": "local"}
    unknown = sorted(set(options) - set(SLURM_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"launcher=slurm has no option(s) {unknown}; valid options: {', '.join(SLURM_DEFAULTS)}"
        )
    resolved = {"name": name, **SLURM_DEFAULTS, **options}
    check_bounds("launcher", resolved, SLURM_BOUNDS)
    if isinstance(resolved["setup"], str):
        resolved["setup"] = [resolved["setup"]]
    if not isinstance(resolved["slurm_extra"], dict):
        raise ConfigError('launcher.slurm_extra takes a JSON object, e.g. {"exclusive": true}')
    return resolved


def launch(plan, launcher: dict, progress: bool = True):
    """Send ``plan``'s pending runs to ``launcher`` (see :func:`normlab.studies.run_study`)."""
    from .slurm import run_on_slurm

    switches = {k: launcher.get(k, v) for k, v in SWITCHES.items()}
    options = {k: v for k, v in launcher.items() if k not in SWITCHES}
    return run_on_slurm(plan, options, progress=progress, **switches)


__all__ = ["LAUNCHERS", "SLURM_DEFAULTS", "SWITCHES", "launch", "launcher_options"]
