"""The run directory: everything one training run leaves behind.

::

    runs/NAME/
      config.json     the resolved config (every option, defaults included)
      metrics.csv     one row per epoch, stable columns (see normlab.train.loop.BASE_COLUMNS)
      summary.json    status (running / finished / diverged / interrupted / failed), final figures,
                      environment (torch version, device, threads)
      checkpoint.pt   model, optimizer, scheduler, loop position, callback and RNG states

Every file is written atomically (temporary file + rename), so a crash or Ctrl-C leaves the previous
complete version in place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_torch_save, atomic_write_json, atomic_write_text

FINAL_STATUSES = ("finished", "diverged")


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
