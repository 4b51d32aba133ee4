"""Reports: markdown tables and PNG figures written into a folder as ``report.md``.

:class:`Report` is what a study's analysis writes into; :func:`report_runs` builds a report for any
list of run directories (``normlab report RUN_DIR...``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_write_json, atomic_write_text
from .train.rundir import RunDirectory


class Report:
    """A markdown report under construction; figures are saved beside it as PNG files."""

    def __init__(self, folder: str | Path, title: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = [f"# {title}\n"]
        self.data: dict = {}  # machine-readable results, written as results.json
        self.figures: list[Path] = []
        self.tables = 0

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"{'#' * level} {text}\n")

    def text(self, markdown: str) -> None:
        self.parts.append(markdown.rstrip() + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence], caption: str = "") -> None:
        self.tables += 1
        self.parts.append(markdown_table(headers, rows, caption))

    def figure(self, fig, filename: str, caption: str = "") -> Path:
        """Save a matplotlib figure as ``filename`` (PNG) and link it in the report."""
        import matplotlib.pyplot as plt

        path = self.folder / filename
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
        plt.close(fig)
        self.figures.append(path)
        self.parts.append(f"![{caption or filename}]({filename})\n")
        if caption:
            self.parts.append(f"*{caption}*\n")
        return path

    def write(self) -> Path:
        path = self.folder / "report.md"
        atomic_write_text(path, "\n".join(self.parts))
        if self.data:
            atomic_write_json(self.folder / "results.json", self.data)
        return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], caption: str = "") -> str:
    lines = []
    if caption:
        lines.append(f"**{caption}**\n")
    lines.append("| " + " | ".join(str(h) for h in headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of ``values * scale`` (n/a when none is finite)."""
    mean, std = mean_std([v * scale for v in values if v is not None])
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """A table of final figures and curve plots for any run directories."""
    from .plots import plot_curves

    runs = []
    for path in run_dirs:
        rd = RunDirectory(path)
        if not rd.config_path.exists():
            from .errors import UserError

            raise UserError(f"{path} is not a run directory (no config.json)")
        runs.append((Path(path).name, rd.read_summary() or {}, rd.read_metrics()))
    out = (
        Path(out) if out else (Path(run_dirs[0]).parent if len(run_dirs) > 1 else Path(run_dirs[0]))
    )
    report = Report(out, "Runs")
    rows = []
    for name, summary, metrics in runs:
        last = metrics[-1] if metrics else {}
        rows.append(
            [
                name,
                summary.get("status", "?"),
                last.get("epoch"),
                last.get("train_loss"),
                _pct(last.get("test_acc")),
                _pct(summary.get("best_test_acc")),
            ]
        )
    report.table(["run", "status", "epochs", "train loss", "test acc %", "best test acc %"], rows)
    series = {name: metrics for name, _, metrics in runs}
    fig = plot_curves(series, ["train_loss", "test_acc"], log_y={"train_loss"})
    report.figure(fig, "curves.png", "training loss and test accuracy per epoch")
    return report.write()


def _pct(x):
    return None if x is None else 100.0 * x
