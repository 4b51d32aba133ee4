"""``launcher=slurm``: a study's runs as one Slurm job array, submitted through submitit.

What is written where (``OUT/STUDY/``)::

    runs/RUN/slurm_job.json   the run's job id and when it was submitted (written by the submitter)
    runs/RUN/slurm_attempts.json  every start of the run's job (written by the job: a requeued job
                              starts again)
    slurm/                    submitit's folder: sbatch scripts, pickled jobs, stdout/stderr logs

Re-entering is the same command. It reads every run's state from its run directory
(``summary.json``) and from the queue (``squeue`` on the recorded job ids): finished, diverged and
failed runs are done, queued and running ones are left alone, and only the rest (never submitted,
or whose job died without a word) is submitted again. The report is written once every run has
ended (``wait=true``, the default, blocks until then with a progress bar).

Time limits and preemption lose nothing. Slurm warns a job with SIGUSR2 before its time limit
(submitit asks for it 90 s ahead) and on preemption; the job turns it into the training loop's own
stop request (a SIGINT, deferred to the end of the current step), so the run writes an exact
checkpoint, and then submitit's checkpointing protocol requeues the job, which resumes the run
from that checkpoint with the same numbers as an uninterrupted run (a run may hit
``launcher.max_timeouts`` time limits; preemptions do not count). With ``gpus_per_run > 1`` the
job has one task per GPU and each task gets torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...), so the loop's DDP path runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from ...errors import UserError
from ...io import atomic_write_json
from ...train.rundir import FINAL_STATUSES, RunDirectory

JOB_FILE = "slurm_job.json"
ATTEMPTS_FILE = "slurm_attempts.json"
POLL_SECONDS = 5.0
WAIT_RETRIES = 12  # squeue failures in a row (a minute) before waiting gives up
QUEUED = ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")


# ------------------------------------------------------------------------------- the job itself
class SlurmRun:
    """One run as a submitit job: a picklable callable with submitit's ``checkpoint`` protocol."""

    def __init__(self, config: dict, tasks: int = 1, threads: int = 1):
        self.config = config
        self.tasks = tasks
        self.threads = threads

    def __call__(self) -> str:
        from ..base import execute_one

        cfg = self.config
        run_dir = RunDirectory(Path(cfg["out"]) / cfg["name"])
        if self.tasks > 1:
            import submitit

            # torchrun's variables for this task: the loop then trains with DDP
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if int(os.environ.get("RANK", "0")) == 0:
            _record_attempt(run_dir)
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def stop_after_step(signum, frame):
            # the loop defers a SIGINT to the end of the step and checkpoints there
            os.kill(os.getpid(), signal.SIGINT)

        signal.signal(signal.SIGUSR2, stop_after_step)
        try:
            return execute_one(cfg, threads=self.threads)
        except KeyboardInterrupt:
            signal.signal(signal.SIGUSR2, submitit_handler)  # from here a warning is submitit's
            status = (run_dir.read_summary() or {}).get("status")
            if status in FINAL_STATUSES:
                # the signal came during the last step or the final evaluation: the run is
                # complete and recorded, so there is nothing to requeue
                return status
            if callable(submitit_handler):
                # submitit: checkpoint() below, requeue this array task, exit
                submitit_handler(signal.SIGUSR2, None)
            raise
        finally:
            signal.signal(signal.SIGUSR2, submitit_handler)

    def checkpoint(self, *args, **kwargs):
        """The requeued job resumes the run (its config has ``resume=true``) from the
        checkpoint that the stopped step wrote."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _record_attempt(run_dir: RunDirectory) -> None:
    attempts = read_attempts(run_dir)
    attempts.append({"started": _now(), "job_id": _current_job_id(), "host": os.uname().nodename})
    atomic_write_json(run_dir.path / ATTEMPTS_FILE, attempts)


def read_attempts(run_dir: RunDirectory) -> list[dict]:
    """Every start of the run's job so far (one more for each requeue)."""
    try:
        return list(json.loads((run_dir.path / ATTEMPTS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return []


def _current_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


# ----------------------------------------------------------------------------- the submitter
def run_on_slurm(
    plan, options: dict, *, progress: bool, wait: bool, report_only: bool, cancel: bool
) -> Path | None:
    from ..base import check_runs, write_report

    if report_only:
        return write_report(plan)
    check_environment(options.get("partition"))
    if str(plan.folder.resolve()).startswith("/tmp/"):
        warnings.warn(
            f"the study folder {plan.folder} is under /tmp, which compute nodes other than this "
            "one usually cannot see; pass out=DIR on a shared file system",
            stacklevel=2,
        )
    if cancel:
        cancelled = cancel_jobs(plan)
        print(f"cancelled {len(cancelled)} job(s) of {plan.study.name}")
        return None
    states = run_states(plan)
    to_submit = [name for name, state in states.items() if state == "missing"]
    print(f"{plan.study.name}: {_counts(states)}; submitting {len(to_submit)}", flush=True)
    for line in _details(plan, states):
        print(f"  {line}")
    if to_submit:
        configs = [plan.configs[name] for name in to_submit]
        check_runs(configs)
        submit(plan, configs, options)
        print(f"  logs: {plan.folder / 'slurm'}/JOBID/ (sbatch script, stdout, stderr)", flush=True)
    if wait:
        _wait(plan, progress)
    states = run_states(plan)
    if any(state in ("pending", "running") for state in states.values()):
        print(
            f"{plan.study.name}: {_counts(states)}; run the same command again to follow it and "
            "write the report when every run has ended"
        )
        return None
    return write_report(plan)


def check_environment(partition: str | None) -> None:
    """One clear error for each set-up that cannot submit."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError(
            "launcher=slurm needs submitit: pip install 'normlab[slurm]' (or pip install submitit)"
        ) from None
    if shutil.which("sbatch") is None:
        raise UserError(
            "launcher=slurm needs Slurm's sbatch on the PATH: run on a login node of the cluster "
            "(or load its module), or use launcher=local"
        )
    if partition:
        known = _partitions()
        if known and partition not in known:
            raise UserError(
                f"unknown Slurm partition {partition!r}; this cluster has: {', '.join(known)} "
                "(sinfo -s lists them)"
            )


def _partitions() -> list[str]:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [p.strip().rstrip("*") for p in out.split() if p.strip()]


def submit(plan, configs: list[dict], options: dict) -> list[str]:
    """Submit ``configs`` as one job array; record each job id in its run directory."""
    import submitit

    gpus = int(options["gpus_per_run"])
    tasks = max(1, gpus)
    cpus = int(options["cpus_per_run"])
    executor = submitit.SlurmExecutor(
        folder=plan.folder / "slurm" / "%j", max_num_timeout=int(options["max_timeouts"])
    )
    parameters = {
        "job_name": f"normlab-{plan.study.name}",
        "time": int(options["timeout_min"]),
        "cpus_per_task": max(1, cpus // tasks),
        "ntasks_per_node": tasks,
        "mem": f"{int(float(options['mem_gb']) * 1024)}M",
        "array_parallelism": int(options["array_parallelism"]),
        "setup": [*_import_path_setup(), *options["setup"]],
        "additional_parameters": dict(options["slurm_extra"]),
    }
    if gpus:
        parameters["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if options.get(key):
            parameters[key] = options[key]
    executor.update_parameters(**parameters)
    threads = max(1, cpus // tasks)
    jobs = []
    try:
        with executor.batch():
            for cfg in configs:
                jobs.append(executor.submit(SlurmRun(cfg, tasks=tasks, threads=threads)))
    except subprocess.CalledProcessError as exc:  # sbatch refused the array
        message = (exc.stderr or exc.output or b"").decode(errors="replace").strip()
        raise UserError(f"sbatch refused the job array: {message or exc}") from exc
    for cfg, job in zip(configs, jobs):
        run_dir = RunDirectory(Path(cfg["out"]) / cfg["name"])
        run_dir.path.mkdir(parents=True, exist_ok=True)
        record = {
            "job_id": str(job.job_id),
            "submitted": _now(),
            "log_folder": str(job.paths.folder),
        }
        atomic_write_json(run_dir.path / JOB_FILE, record)
    return [str(job.job_id) for job in jobs]


def _import_path_setup() -> list[str]:
    """The job runs this same Python and unpickles a callable from ``normlab``: when normlab is
    imported from a checkout (``PYTHONPATH=src``, possibly relative) rather than installed, the
    job gets that folder's absolute path, so it imports the same code wherever it starts."""
    import normlab

    root = Path(normlab.__file__).resolve().parents[1]
    if root.name in ("site-packages", "dist-packages"):
        return []  # installed: the interpreter finds it by itself
    return [f'export PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}"']


def run_states(plan) -> dict[str, str]:
    """Each run's state: finished, diverged, failed, running, pending or missing."""
    jobs = {s.name: (_read_job(plan.run_dir(s.name)) or {}).get("job_id") for s in plan.specs}
    queue = queue_states([j for j in jobs.values() if j])
    states = {}
    for spec in plan.specs:
        summary = plan.run_dir(spec.name).read_summary() or {}
        status = summary.get("status")
        job_state = queue.get(jobs[spec.name] or "")
        if status in FINAL_STATUSES:
            states[spec.name] = status
        elif job_state in RUNNING:
            states[spec.name] = "running"
        elif job_state in QUEUED:
            states[spec.name] = "pending"
        elif status == "failed":
            states[spec.name] = "failed"
        else:
            states[spec.name] = "missing"  # never submitted, or its job ended without a result
    return states


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """``{job id: state}`` of the given jobs still in Slurm's queue (array tasks expanded)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        done = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"squeue did not answer ({exc}); try again when Slurm responds") from exc
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        # without the queue every run would look missing and be submitted a second time
        raise UserError(
            f"squeue failed: {done.stderr.strip() or done.returncode}; try again when Slurm "
            "responds (sinfo shows its state)"
        )
    states = {}  # 'Invalid job id': every job has left the queue
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def cancel_jobs(plan) -> list[str]:
    """``scancel`` the study's queued and running jobs; returns their ids."""
    jobs = [(_read_job(plan.run_dir(s.name)) or {}).get("job_id") for s in plan.specs]
    queue = queue_states([j for j in jobs if j])
    live = [j for j in jobs if j and queue.get(j) in QUEUED + RUNNING]
    if live:
        subprocess.run(["scancel", *live], check=False, timeout=60)
    return live


def _wait(plan, progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.specs), desc=f"{plan.study.name} (slurm)", unit="run")
    failures = 0
    try:
        while True:
            try:
                states = run_states(plan)
                failures = 0
            except UserError:
                # squeue did not answer: a busy controller answers again a little later
                failures += 1
                if failures >= WAIT_RETRIES:
                    raise
                time.sleep(POLL_SECONDS)
                continue
            ended = sum(state not in ("pending", "running") for state in states.values())
            if bar is not None:
                bar.n = ended
                bar.set_postfix_str(_counts(states), refresh=True)
            if ended == len(states):
                return
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print(
            "\nnormlab: stopped waiting; the jobs go on (cancel=true cancels them)",
            file=sys.stderr,
        )
        raise
    finally:
        if bar is not None:
            bar.close()


def _details(plan, states: dict[str, str]) -> list[str]:
    """One line for each run that needs a look: failed ones (their error) and ones whose job
    ended without a result (submitted again; the old job's log says why)."""
    lines = []
    for name, state in states.items():
        run_dir = plan.run_dir(name)
        if state == "failed":
            error = (run_dir.read_summary() or {}).get("error", "see error.txt")
            lines.append(f"failed: {name}: {error}")
        elif state == "missing" and (run_dir.read_summary() or {}).get("status") == "interrupted":
            lines.append(f"again: {name}: stopped at a checkpoint, resumes from it")
        elif state == "missing" and (job := _read_job(run_dir)):
            log = Path(job.get("log_folder", plan.folder / "slurm")) / f"{job['job_id']}_0_log.err"
            lines.append(f"again: {name}: job {job['job_id']} ended without a result (see {log})")
    return lines


def _counts(states: dict[str, str]) -> str:
    order = ("finished", "diverged", "failed", "running", "pending", "missing")
    counts = {k: sum(v == k for v in states.values()) for k in order}
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no runs"


def _read_job(run_dir: RunDirectory) -> dict | None:
    try:
        return json.loads((run_dir.path / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = [
    "SlurmRun",
    "read_attempts",
    "cancel_jobs",
    "check_environment",
    "queue_states",
    "run_states",
    "submit",
]
