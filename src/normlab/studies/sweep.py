"""Sweeps: a grid over any config keys, run like a study (parallel workers, resumable, one failure
never stopping the others) and summarized in a results table.

Axis syntax (``normlab sweep KEY=VALUES ...``):

* ``optim.lr=0.01,0.1,1``: a list of values;
* ``optim.elr=log:1e-5:1e-1:9``: 9 values log-spaced from 1e-5 to 1e-1;
* ``optim.momentum=lin:0:0.9:4``: 4 values evenly spaced;
* ``seed=range:0:3``: the integers 0, 1, 2.

Every other ``key=value`` is a fixed override of the base config.
"""

from __future__ import annotations

import itertools
import math
import re

from ..config import parse_value, set_dotted
from ..errors import ConfigError
from ..plots import plot_curves
from ..report import Report, pm
from .base import RunResult, RunSpec, Study

_RANGE = re.compile(r"^(log|lin|range):(.+)$")


def parse_axis(text: str) -> list:
    """The values of one sweep axis (see the module docstring for the syntax)."""
    match = _RANGE.match(text.strip())
    if match:
        kind, args = match.groups()
        parts = [parse_value(p) for p in args.split(":")]
        try:
            if kind == "range":
                return list(range(*[int(p) for p in parts]))
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, TypeError, IndexError):
            raise ConfigError(
                f"cannot read the sweep axis {text!r}; use log:LO:HI:N, lin:LO:HI:N or range:A:B"
            ) from None
        if n < 1:
            raise ConfigError(f"sweep axis {text!r} needs N >= 1 values")
        if n == 1:
            return [lo]
        if kind == "log":
            if lo <= 0 or hi <= 0:
                raise ConfigError(f"log axis {text!r} needs positive bounds")
            a, b = math.log10(lo), math.log10(hi)
            return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.6g}") for i in range(n)]
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    if "," in text:
        return [parse_value(p) for p in text.split(",") if p.strip()]
    return [parse_value(text)]


class SweepStudy(Study):
    """A study over the cartesian product of ``axes`` (dotted key -> values) on a base config."""

    default_jobs = 2

    def __init__(self, name: str, base: dict, axes: dict[str, list]):
        if not axes:
            raise ConfigError("a sweep needs at least one axis, for example optim.lr=0.01,0.1")
        self.name = name
        self.title = f"Sweep {name}"
        self.base = base
        self.axes = axes
        self.description = "Axes: " + "; ".join(f"`{k}` = {v}" for k, v in axes.items())

    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        import copy

        specs = []
        keys = list(self.axes)
        for values in itertools.product(*(self.axes[k] for k in keys)):
            cfg = copy.deepcopy(self.base)
            for key, value in zip(keys, values):
                set_dotted(cfg, key, value)
            name = "-".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
            specs.append(RunSpec(name, cfg, dict(zip(keys, values))))
        return specs

    def analyze(self, results: list[RunResult], report: Report, scale: str) -> None:
        keys = list(self.axes)
        rows = []
        for r in results:
            rows.append(
                [
                    *(r.spec.labels[k] for k in keys),
                    r.status,
                    r.final("epoch"),
                    r.final("train_loss"),
                    pm([r.final("test_acc")], 100.0),
                ]
            )
        report.table([*keys, "status", "epochs", "final train loss", "test acc %"], rows, "Results")
        report.data["runs"] = [
            {**r.spec.labels, "status": r.status, "final": r.rows[-1] if r.rows else None}
            for r in results
        ]
        series = {r.spec.name: r.rows for r in results if r.rows}
        if series:
            fig = plot_curves(series, ["train_loss", "test_acc"], log_y={"train_loss"})
            report.figure(fig, "curves.png", "training loss and test accuracy per run")


def sweep_from_args(options: list[str], base: dict) -> tuple[SweepStudy, dict]:
    """Split ``key=value`` strings into sweep axes (several values) and fixed overrides."""
    axes, fixed, extra = {}, {}, {}
    for item in options:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key in ("jobs", "out", "sweep_name", "wait", "report_only", "cancel"):
            extra[key] = parse_value(value)
            continue
        if key == "launcher" or key.startswith("launcher."):  # where the runs go, not an axis
            set_dotted(extra, key, parse_value(value))
            continue
        values = parse_axis(value)
        if len(values) > 1 or _RANGE.match(value.strip()):
            axes[key] = values
        else:
            set_dotted(fixed, key, values[0])
    from ..config import merge

    name = str(extra.get("sweep_name") or "-".join(k.split(".")[-1] for k in axes) or "sweep")
    return SweepStudy(name, merge(base, fixed), axes), extra
