"""Studies: a named grid of runs plus an analysis that turns their run directories into a report.

A :class:`Study` lists its runs for a scale (``quick``: embedded data, minutes on a CPU; ``paper``:
the paper's setting on the real dataset files) and analyses the results. :func:`run_study` runs the
grid with ``jobs`` worker processes, skips runs that already ended (an interrupted study resumes where
it stopped, and a run interrupted mid-way resumes from its checkpoint), records a failing run without
stopping the others, and writes ``OUT/STUDY/report.md``.

Layout::

    OUT/STUDY/
      runs/RUN/...       one run directory per run (see normlab.train.rundir)
      report.md          tables and figures
      results.json       the numbers behind the tables
      *.png
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, UserError
from ..io import atomic_write_json, atomic_write_text
from ..registry import load_methods
from ..report import Report
from ..train.rundir import RunDirectory, RunInUseError
from .workers import run_in_workers

SCALES = ("quick", "medium", "paper")  # embedded data / real files on a CPU / the paper's


@dataclass
class RunSpec:
    """One run of a study: a unique name, its (partial) config and labels for the analysis."""

    name: str
    config: dict
    labels: dict = field(default_factory=dict)


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    status: str  # finished | diverged | interrupted | failed | missing
    summary: dict | None
    rows: list[dict]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "diverged")

    def final(self, key: str, default=None):
        """The last epoch's value of metrics column ``key``."""
        return self.rows[-1].get(key, default) if self.rows else default


class Study:
    """Base class of the studies. Subclasses set ``name``/``title``/``description`` and implement
    :meth:`runs` and :meth:`analyze`."""

    name: str = ""
    title: str = ""
    description: str = ""
    default_jobs: int = 2

    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        raise NotImplementedError

    def analyze(self, results: list[RunResult], report: Report, scale: str) -> None:
        raise NotImplementedError


_STUDIES: dict[str, Study | Callable[[], Study]] = {}


def register_study(study: Study, *, name: str | None = None, lazy: bool = False) -> None:
    """Make ``normlab study NAME`` available.

    ``lazy=True``: ``study`` is a factory called the first time the study is asked for (a method
    registers its study this way, so looking up its optimizer never imports plotting code).
    """
    if not lazy and not isinstance(study, Study):
        raise TypeError(
            f"register_study takes a Study (or a factory with lazy=True), got {study!r}"
        )
    _STUDIES[name or study.name] = study


def _baseline_study() -> Study:
    from .baseline import BaselineStudy

    return BaselineStudy()


register_study(_baseline_study, name="baseline", lazy=True)


def study_names() -> list[str]:
    load_methods()
    return list(_STUDIES)


def get_study(name: str) -> Study:
    load_methods()
    try:
        entry = _STUDIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown study {name!r}; valid choices: {', '.join(_STUDIES)}, all"
        ) from None
    if not isinstance(entry, Study):
        entry = _STUDIES[name] = entry()
    return entry


def run_study(
    study: Study | str,
    scale: str = "quick",
    jobs: int | None = None,
    out: str | Path = "studies_out",
    data_root: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
    launcher: dict | None = None,
) -> Path | None:
    """Run every pending run of ``study`` and write its report; returns the report's path.

    ``launcher`` (the ``launcher.*`` options, see :mod:`normlab.studies.launchers`) sends the runs
    to a Slurm cluster instead of local worker processes; there the report is written once every
    run has ended, and None is returned while some are still queued or running.
    """
    plan = plan_study(study, scale, out, data_root, overrides)
    if launcher and launcher.get("name", "local") != "local":
        from .launchers import launch

        return launch(plan, launcher, progress)
    jobs = jobs or plan.study.default_jobs
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    pending = plan.pending()
    check_runs(pending)
    execute_runs(pending, jobs, progress, f"{plan.study.name} ({scale})")
    return write_report(plan)


@dataclass
class StudyPlan:
    """A study's grid at one scale, resolved to run configs under ``folder``."""

    study: Study
    scale: str
    folder: Path
    specs: list[RunSpec]
    configs: dict[str, dict]  # run name -> its config (out, name, resume set)

    def run_dir(self, name: str) -> RunDirectory:
        return RunDirectory(self.folder / "runs" / name)

    def pending(self) -> list[dict]:
        """The configs of the runs that have not ended (finished or diverged)."""
        return [self.configs[s.name] for s in self.specs if not self.run_dir(s.name).is_complete()]


def plan_study(
    study: Study | str,
    scale: str = "quick",
    out: str | Path = "studies_out",
    data_root: str | None = None,
    overrides: dict | None = None,
) -> StudyPlan:
    if isinstance(study, str):
        study = get_study(study)
    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    folder = Path(out) / study.name
    specs = study.runs(scale, data_root)
    _check_unique(specs, study.name)
    configs = {s.name: _run_config(s, folder, overrides) for s in specs}
    return StudyPlan(study, scale, folder, specs, configs)


def write_report(plan: StudyPlan) -> Path:
    """The study's report from whatever its run directories hold now."""
    study, scale = plan.study, plan.scale
    results = collect_results(plan.specs, plan.folder)
    report = Report(plan.folder, study.title or study.name)
    if study.description:
        report.text(study.description)
    report.text(
        f"Scale: `{scale}`. Runs: {len(results)} "
        f"({sum(r.ok for r in results)} ended, "
        f"{sum(r.status == 'failed' for r in results)} failed)."
    )
    study.analyze(results, report, scale)
    _failure_section(results, report)
    return report.write()


def check_runs(configs: list[dict]) -> None:
    """What can fail before any run starts, checked once for the whole grid: every config
    resolves (a bad key or value), and every dataset the runs read loads (a missing or damaged
    file is one error, not one failure per run)."""
    from ..config import resolve
    from ..data import load_dataset

    seen = set()
    for cfg in configs:
        data = resolve(cfg)["data"]
        key = (data["name"], data["root"], tuple(sorted((k, str(v)) for k, v in data.items())))
        if key in seen:
            continue
        seen.add(key)
        load_dataset(data["name"], data["root"], data)


def execute_runs(configs: list[dict], jobs: int, progress: bool = True, desc: str = "runs"):
    """Train each config (``out`` and ``name`` set) with up to ``jobs`` worker processes.

    A failing run is recorded in its run directory (``error.txt``, status ``failed``) and the others
    go on. Worker processes get an equal share of the CPU cores as torch threads; with ``jobs=1``
    the runs go in this process under its own torch thread setting, which is left as it was (a
    config's ``threads`` key still applies to its run).
    """
    if not configs:
        return
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc=desc, unit="run", dynamic_ncols=True)
    if jobs == 1:
        for cfg in configs:
            execute_one(cfg)
            if bar is not None:
                bar.update(1)
    else:
        # Spawned workers (fork and torch's thread pools do not mix well) that stop together on
        # one Ctrl-C and die with this process (see studies.workers).
        threads = max(1, (os.cpu_count() or 1) // jobs)
        try:
            run_in_workers(
                configs, jobs, threads, execute_one, bar.update if bar is not None else _nothing
            )
        finally:
            if bar is not None:
                bar.close()
        return
    if bar is not None:
        bar.close()


def execute_one(cfg: dict, threads: int | None = None) -> str:
    """Train one run, never raising for a failure of the run itself (it is recorded instead).

    ``threads`` sets torch's intra-op threads first (worker processes); None leaves them alone.
    """
    import torch

    from ..train import train

    if threads is not None:
        torch.set_num_threads(threads)
    run_dir = RunDirectory(Path(cfg["out"]) / cfg["name"])
    try:
        summary = train(cfg)
        (run_dir.path / "error.txt").unlink(missing_ok=True)
        return summary["status"]
    except KeyboardInterrupt:
        raise
    except RunInUseError:
        return "in use"  # another process trains this run: its directory is not ours to write
    except Exception as exc:  # a failed run is a result of the study, not the end of it
        message = f"{type(exc).__name__}: {exc}"
        run_dir.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir.path / "error.txt", traceback.format_exc())
        summary = run_dir.read_summary() or {}
        summary.update({"status": "failed", "error": message})
        atomic_write_json(run_dir.summary_path, summary)
        return "failed"


def _nothing(*args) -> None:
    return None


def collect_results(specs: list[RunSpec], folder: Path) -> list[RunResult]:
    results = []
    for spec in specs:
        rd = RunDirectory(folder / "runs" / spec.name)
        summary = rd.read_summary()
        status = summary.get("status", "missing") if summary else "missing"
        results.append(
            RunResult(
                spec,
                rd.path,
                status,
                summary,
                rd.read_metrics(),
                summary.get("error") if summary else None,
            )
        )
    return results


def _run_config(spec: RunSpec, folder: Path, overrides: dict | None) -> dict:
    from ..config import merge

    cfg = merge(spec.config, overrides or {})
    cfg.update({"out": str(folder / "runs"), "name": spec.name, "progress": False, "resume": True})
    return cfg


def _check_unique(specs: list[RunSpec], study: str) -> None:
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"study {study} lists runs with the same name: {dupes}")


def _failure_section(results: list[RunResult], report: Report) -> None:
    failed = [r for r in results if r.status in ("failed", "missing", "interrupted")]
    if not failed:
        return
    report.heading("Runs that did not end")
    report.table(
        ["run", "status", "error"],
        [
            [r.spec.name, r.status, (r.error or "").splitlines()[0][:160] if r.error else ""]
            for r in failed
        ],
    )


def group_by(results: list[RunResult], *keys: str) -> dict[tuple, list[RunResult]]:
    """Results grouped by the values of their ``labels`` at ``keys`` (insertion order kept)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(tuple(r.spec.labels.get(k) for k in keys), []).append(r)
    return groups


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def require_root(data_root: str | None, dataset: str, study: str, scale: str = "paper") -> str:
    if not data_root:
        raise UserError(
            f"study {study} at scale={scale} trains on {dataset} files: pass data.root=PATH "
            f"(see the README's data section)"
        )
    return data_root


def run_all(
    scale: str = "quick",
    jobs: int | None = None,
    out: str | Path = "studies_out",
    data_root: str | None = None,
    progress: bool = True,
    names: list[str] | None = None,
    overrides: dict | None = None,
    launcher: dict | None = None,
) -> Path | None:
    """Run every registered study and write ``OUT/report.md`` linking their reports (None while
    a cluster still has some of their runs)."""
    out = Path(out)
    lines = ["# normlab studies\n", f"Scale: `{scale}`.\n", "| study | report |", "|---|---|"]
    complete = True
    names = names or study_names()
    if _waits_on_cluster(launcher):
        # every study's jobs go in first (waiting study by study would queue the next study only
        # once the previous one has ended); the loop below then waits and writes the reports
        for name in names:
            run_study(
                name, scale, jobs, out, data_root, progress, overrides, launcher | {"wait": False}
            )
    for name in names:
        path = run_study(name, scale, jobs, out, data_root, progress, overrides, launcher)
        complete = complete and path is not None
        lines.append(f"| {get_study(name).title or name} | [{name}/report.md]({name}/report.md) |")
    if not complete:
        return None
    index = out / "report.md"
    atomic_write_text(index, "\n".join(lines) + "\n")
    return index


def _waits_on_cluster(launcher: dict | None) -> bool:
    """A cluster launcher that submits and then waits (not a report, a cancel or ``wait=false``)."""
    if not launcher or launcher.get("name", "local") == "local":
        return False
    return (
        launcher.get("wait", True)
        and not launcher.get("report_only")
        and not launcher.get("cancel")
    )
