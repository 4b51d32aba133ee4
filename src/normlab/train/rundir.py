"""The run directory: everything one training run leaves behind.

::

    runs/NAME/
      config.json     the resolved config (every option, defaults included)
      metrics.csv     one row per epoch, stable columns (see normlab.train.loop.BASE_COLUMNS)
      summary.json    status (running / finished / diverged / interrupted / failed), final figures,
                      environment (torch version, device, threads)
      checkpoint.pt   model, optimizer, scheduler, loop position, callback and RNG states
      .lock           held (flock) by the one process that trains the run

Every file is written atomically (temporary file + rename), so a crash or Ctrl-C leaves the previous
complete version in place.

One run directory has one writer: :meth:`RunDirectory.lock` takes an exclusive ``flock`` on
``.lock`` (the OS releases it when the process ends, however it ends), and a second process on the
same run gets :class:`RunInUseError`. A resumed run must be the run that was started:
:func:`config_differences` lists what a new config changes against the recorded ``config.json``,
apart from ``epochs`` (which may grow) and the :data:`RUN_SETTINGS` that say how, not what, to train.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..io import atomic_torch_save, atomic_write_json, atomic_write_text, json_compatible

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FINAL_STATUSES = ("finished", "diverged")

# Config keys that say how to run, not what is trained: a resumed run may change them.
RUN_SETTINGS = (
    "name",
    "out",
    "resume",
    "overwrite",
    "progress",
    "checkpoint",
    "checkpoint_interval",
    "threads",
    "device",
    "deterministic",
    "data.root",  # where the dataset files are (the same data may move between machines)
)


class RunInUseError(UserError):
    """Another process holds the run directory's lock."""


def run_path(out: str | os.PathLike, name: str) -> Path:
    """``out/name``, for a ``name`` that is one folder name (it cannot escape ``out``)."""
    name = str(name)
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    if (
        not name
        or name in (".", "..")
        or any(s in name for s in separators)
        or "\0" in name
        or Path(name).is_absolute()
    ):
        raise ConfigError(
            f"run name {name!r} must be a single folder name inside out={out} (no path "
            "separators, not absolute, not '.' or '..'); pick e.g. name=my-run, and out=DIR to "
            "put the runs elsewhere"
        )
    return Path(out) / name


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's exclusive lock for the ``with`` block, or raise :class:`RunInUseError`.

        ``flock(LOCK_EX | LOCK_NB)`` on ``.lock``: the kernel drops it when the file is closed or
        the process dies (kill -9 included), so a stale lock cannot outlive its holder. The file
        stays (deleting it would let two processes lock two different inodes of one name); it
        holds the pid of the last holder, for the error message. Not reliable on network file
        systems without flock support.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(
                f"cannot write {self.lock_path}: {exc.strerror or exc}; make its folder writable "
                "or write elsewhere (e.g. out=DIR)"
            ) from exc
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise RunInUseError(
                        f"run directory {self.path} is in use by another process{who}; wait for "
                        "it to end or stop it, or pick another name=NAME"
                    ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock

    def exists(self) -> bool:
        return self.config_path.exists() or self.checkpoint_path.exists()

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def read_config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.metrics_path, metrics_to_csv(rows))

    def read_metrics(self) -> list[dict]:
        return read_metrics_csv(self.metrics_path)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, _finite_or_none(summary))

    def read_summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(self.checkpoint_path, state)

    def load_checkpoint(self, map_location=None) -> dict:
        """The checkpoint's content; an unreadable one (truncated, not a checkpoint, no
        permission) is a :class:`UserError` that says how to go on."""
        try:
            state = torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
        except Exception as exc:  # torch raises RuntimeError, EOFError, pickle and zip errors
            raise UserError(
                f"cannot read the checkpoint {self.checkpoint_path} ({type(exc).__name__}: "
                f"{exc}); it is damaged or not a normlab checkpoint: pass overwrite=true to start "
                "the run over, or name=NEW for a new run"
            ) from exc
        if not isinstance(state, dict) or "model" not in state:
            raise UserError(
                f"{self.checkpoint_path} is not a normlab checkpoint (no model state); pass "
                "overwrite=true to start the run over, or name=NEW for a new run"
            )
        return state

    def is_complete(self) -> bool:
        """True when the run ended with a final status (finished or diverged)."""
        summary = self.read_summary()
        return bool(summary) and summary.get("status") in FINAL_STATUSES


_ABSENT = object()


def config_differences(recorded: dict, new: dict) -> list[str]:
    """What ``new`` changes against the ``recorded`` config, as ``"key: old -> new"`` lines.

    Ignored: the :data:`RUN_SETTINGS`, and ``epochs`` when it grows (a run may be extended; a
    smaller value is a difference). Values are compared as JSON (the form of ``config.json``).
    """
    out: list[str] = []
    _diff(json_compatible(recorded), json_compatible(new), "", out)
    return out


def _diff(old, new, key: str, out: list[str]) -> None:
    if key in RUN_SETTINGS:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            _diff(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else k, out)
        return
    if key == "epochs" and isinstance(old, int) and isinstance(new, int) and new >= old:
        return
    if old != new or type(old) is not type(new):
        out.append(f"{key}: {_show(old)} -> {_show(new)}")


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def check_resume_config(run_dir: RunDirectory, new: dict) -> None:
    """ConfigError listing the differences when ``new`` is not the run recorded in ``run_dir``."""
    if not run_dir.config_path.exists():
        return
    try:
        recorded = run_dir.read_config()
    except json.JSONDecodeError:
        return  # not ours (atomic writes never leave half a file); the checkpoint decides
    diffs = config_differences(recorded, new)
    if diffs:
        raise ConfigError(
            f"resume=true continues the run in {run_dir.path}, but this config differs from its "
            f"config.json: {'; '.join(diffs)}. Resume with the recorded values (epochs may grow), "
            "start over with overwrite=true, or pick a new name=NAME"
        )


def metrics_to_csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in columns})
    return buffer.getvalue()


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics.csv with numbers parsed (empty cells become None)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _parse(text: str):
    if text == "" or text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _finite_or_none(obj):
    # JSON has no NaN/Inf; a diverged run's loss is written as null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj
