"""Figures shared by the reports: curves against epoch, with a mean ± std band over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written to files, on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "train_loss": "training loss",
    "train_acc": "training accuracy",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "test_error": "test error (%)",
    "lr": "learning rate",
}


def column(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metrics column, skipping missing values."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if key == "test_error" and row.get("test_acc") is not None:
            value = 100.0 * (1.0 - row["test_acc"])
        if value is None:
            continue
        xs.append(row["epoch"])
        ys.append(float(value))
    return xs, ys


def plot_curves(
    series: Mapping[str, Sequence[Mapping]],
    keys: Sequence[str],
    *,
    log_y: set[str] = frozenset(),
    title: str = "",
):
    """One panel per metric ``key``, one line per entry of ``series`` (label -> metrics rows)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in series.items():
            xs, ys = column(rows, key)
            ax.plot(xs, ys, label=label, lw=1.4)
        _style(ax, key, key in log_y)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_mean_std(
    ax,
    groups: Mapping[str, Sequence[Sequence[Mapping]]],
    key: str,
    *,
    log_y: bool = False,
    colors: Mapping[str, str] | None = None,
):
    """On ``ax``: for each label, the mean over runs of metric ``key`` with a ±1 std band."""
    for label, runs in groups.items():
        curves = [column(rows, key) for rows in runs]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        by_epoch: dict[int, list[float]] = {}
        for xs, ys in curves:
            for x, y in zip(xs, ys):
                if math.isfinite(y):
                    by_epoch.setdefault(x, []).append(y)
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        stds = [
            math.sqrt(sum((v - m) ** 2 for v in by_epoch[e]) / max(1, len(by_epoch[e]) - 1))
            for e, m in zip(epochs, means)
        ]
        color = (colors or {}).get(label)
        (line,) = ax.plot(epochs, means, label=label, lw=1.5, color=color)
        lo = [m - s for m, s in zip(means, stds)]
        hi = [m + s for m, s in zip(means, stds)]
        if log_y:
            lo = [max(v, 1e-12) for v in lo]
        ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    _style(ax, key, log_y)


def _style(ax, key: str, log_y: bool) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(LABELS.get(key, key))
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


__all__ = ["LABELS", "column", "plot_curves", "plot_mean_std", "plt"]
