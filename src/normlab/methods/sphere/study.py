"""The ``sphere_regimes`` study: fixed-ELR training on the sphere has three regimes.

Kodryan et al. (2022) train fully scale-invariant networks (BN without affine parameters, a fixed
last layer) with SGD on the sphere of the initial norm at a constant effective learning rate
(ELR). Depending on the ELR the training ends in one of three regimes: **convergence** (small
ELR: the train loss falls like a power law, the effective gradient norm with it),
**chaotic equilibrium** (medium ELR: loss and effective gradient norm settle on a noisy plateau)
and **divergence** (large ELR: random-guess accuracy, huge effective gradient norm, successive
iterates nearly orthogonal). This study sweeps a log-spaced ELR grid, labels every run with
:func:`normlab.regimes.classify_regime`, finds the boundaries with
:func:`normlab.regimes.find_boundaries` and draws the paper's Figure-1 panels. Conventional
training (SGD with weight decay on the same model, no sphere: the original's ``fix_lr`` mode) is
added to show its ELR ``lr / |w|^2`` drifting to where the fixed-ELR regimes predict.

Scales:

* ``quick``: SI-MLP (3 x 128, fixed head of norm 10) on mnist1d, the first 1000 train signals,
  150 epochs, ELRs 1e-4 ... 1 (9 values, half decades), plus three SGD + weight decay runs.
  A smaller train set is easier to fit, so regime 1 reaches higher ELRs than with all 4000
  signals (the 1 -> 2 boundary moves up, the 2 -> 3 boundary stays).
* ``medium``: ConvNetSI (c = 8) on MNIST files (``data.root``), the first 2000 training and 2000
  test images, 60 epochs (960 steps), the quick ELR grid and baselines.
* ``paper``: ConvNetSI (c = 32) on CIFAR-10 files (``data.root``), batch 128, no augmentation,
  1000 epochs, the ELRs of the paper's Figure 1 (1e-5 ... 1e-1), and SGD + weight decay runs.

Every run measures the train loss/accuracy with a full pass in train-mode BN after each epoch
(``sphere_metrics``), as the paper does; the regime labels use those curves.

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); official code
``tipt0p/three_regimes_on_the_sphere`` (``Plots.ipynb``, "Fully scale-invariant, ConvNet,
CIFAR10").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ...plots import plt
from ...regimes import (
    CHAOTIC_EQUILIBRIUM,
    CONVERGENCE,
    DIVERGENCE,
    REGIMES,
    RegimeClassification,
    classify_regime,
    find_boundaries,
)
from ...report import Report, fmt
from ...studies.base import RunResult, RunSpec, Study, require_root
from ...studies.sweep import parse_axis

# ------------------------------------------------------------------------------------ grids
QUICK_ELRS: list[float] = parse_axis("log:1e-4:1:9")  # 1e-4, 3.16e-4, ..., 1
QUICK_EPOCHS = 150
QUICK_TRAIN_LIMIT = 1000
QUICK_MODEL = {"name": "mlp_si", "width": 128, "depth": 3}
# (lr, weight decay) of the conventional runs, momentum 0 as in the fixed-ELR runs
QUICK_CONVENTIONAL: list[tuple[float, float]] = [(1.0, 1e-4), (1.0, 1e-2), (1.0, 1e-1)]

# the quick grid plus quarter-decade points where MNIST's convergence meets divergence
MEDIUM_ELRS: list[float] = sorted({*QUICK_ELRS, 0.0147, 0.0215})
MEDIUM_EPOCHS = 60
MEDIUM_TRAIN_LIMIT = 2000  # 16 steps an epoch at batch 128: 960 steps, as many as quick's
MEDIUM_TEST_LIMIT = 2000
MEDIUM_MODEL = {"name": "convnet_si", "c": 8}
MEDIUM_CONVENTIONAL: list[tuple[float, float]] = QUICK_CONVENTIONAL

PAPER_ELRS: list[float] = [1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 5e-2, 1e-1]  # Figure 1
PAPER_EPOCHS = 1000
PAPER_MODEL = {"name": "convnet_si", "c": 32}
# Our choice (the repo does not pin the paper's lr/wd): lr * wd spanning 5e-5 ... 5e-3.
PAPER_CONVENTIONAL: list[tuple[float, float]] = [(0.1, 5e-4), (1.0, 5e-4), (1.0, 5e-3)]

NUM_CLASSES = 10
SEED = 0

# Where the original results put the boundaries (normlab notes, sphere_regimes.md).
ORIGINAL_BOUNDARIES = [
    # (source, 1 -> 2 interval, 2 -> 3 interval)
    (
        "paper: ConvNetSI c=32, CIFAR-10, 1000 epochs (Plots.ipynb, Figure 1)",
        (5e-4, 1e-3),
        (5e-3, 5e-2),
    ),
    (
        "notes' CPU reproduction: SI-MLP, mnist1d (4000 train), 100-300 epochs",
        (3e-4, 1e-3),
        (5e-2, 1e-1),
    ),
]

REGIME_NUMBER = {CONVERGENCE: 1, CHAOTIC_EQUILIBRIUM: 2, DIVERGENCE: 3}
REGIME_COLORS = {CONVERGENCE: "#4c9be8", CHAOTIC_EQUILIBRIUM: "#f2b134", DIVERGENCE: "#e8604c"}


# ------------------------------------------------------------------------------------ analysis
def regimes_in_order(elrs: Sequence[float], labels: Sequence[str]) -> bool:
    """True when the labels, sorted by ELR, never go back: convergence <= equilibrium <= divergence."""
    if len(elrs) != len(labels):
        raise ValueError(f"need one label per ELR, got {len(elrs)} ELRs and {len(labels)} labels")
    ranks = [REGIME_NUMBER[label] for _, label in sorted(zip(elrs, labels), key=lambda t: t[0])]
    return all(a <= b for a, b in zip(ranks, ranks[1:]))


def train_curves(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Per-epoch train loss and accuracy: the full train-mode pass when every epoch has one (the
    paper's measure), else the running means of the training loop."""
    full_loss = [r.get("full_train_loss") for r in rows]
    full_acc = [r.get("full_train_acc") for r in rows]
    if rows and all(_finite(v) for v in full_loss + full_acc):
        return full_loss, full_acc
    return [r["train_loss"] for r in rows], [r["train_acc"] for r in rows]


def classify_run(result: RunResult) -> RegimeClassification | None:
    """The regime of one run (None when it has fewer than 2 epochs of metrics)."""
    rows = result.rows
    if len(rows) < 2:
        if result.status == "diverged":  # the loss became NaN at once
            return RegimeClassification(DIVERGENCE, {}, True, ["diverged within one epoch"])
        return None
    loss, acc = train_curves(rows)
    grad = [r.get("effective_grad_norm") for r in rows]
    angle = [r.get("step_angle") for r in rows]
    return classify_regime(
        loss,
        acc,
        int(result.spec.labels.get("num_classes", NUM_CLASSES)),
        grad if all(_finite(v) for v in grad) else None,
        angle if all(_finite(v) for v in angle) else None,
    )


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _tail_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return math.nan
    count = max(1, int(math.ceil(fraction * len(vals))))
    return float(np.mean(vals[-count:]))


def _interval(pair: tuple[float, float] | None) -> str:
    return "not found" if pair is None else f"({fmt(pair[0])}, {fmt(pair[1])})"


def _boundary(boundaries, low: str, high: str) -> tuple[float, float] | None:
    """The ELR interval of the first change from regime ``low`` to ``high`` (via any step)."""
    lo = [b.low_elr for b in boundaries if b.low_label == low]
    hi = [b.high_elr for b in boundaries if b.high_label == high]
    if not lo or not hi:
        return None
    first_lo = lo[0]
    above = [h for h in hi if h > first_lo]
    return (first_lo, above[0]) if above else None


def predicted_regime(elr: float, sweep: list[tuple[float, str]]) -> str:
    """What the fixed-ELR sweep says about ``elr``: a regime, or "between a and b"."""
    if not sweep or not _finite(elr):
        return "-"
    sweep = sorted(sweep)
    exact = [label for e, label in sweep if e == elr]
    if exact:
        return str(REGIME_NUMBER[exact[0]])
    if elr <= sweep[0][0]:
        return f"{REGIME_NUMBER[sweep[0][1]]} (below grid)"
    if elr >= sweep[-1][0]:
        return f"{REGIME_NUMBER[sweep[-1][1]]} (above grid)"
    for (lo, lo_label), (hi, hi_label) in zip(sweep, sweep[1:]):
        if lo < elr < hi:
            if lo_label == hi_label:
                return str(REGIME_NUMBER[lo_label])
            return f"{REGIME_NUMBER[lo_label]}-{REGIME_NUMBER[hi_label]} boundary"
    return "-"


# ------------------------------------------------------------------------------------ the study
class SphereRegimesStudy(Study):
    name = "sphere_regimes"
    title = "Training scale-invariant networks on the sphere: the three regimes of a fixed ELR"
    description = (
        "Fully scale-invariant networks (BatchNorm without affine parameters, a fixed last layer "
        "of norm 10) trained by `optim=sphere` (SphereSGD: one joint sphere of the initial norm, "
        "`lr = ELR * rho^2`, momentum 0) on a log-spaced grid of effective learning rates, "
        "single seed; plus conventional SGD + weight decay on the same model (`fix_lr`). Train "
        "loss and accuracy are full passes over the train set with BatchNorm in train mode. "
        "Regimes: `normlab.regimes.classify_regime` (1 = convergence, 2 = chaotic equilibrium, "
        "3 = divergence). Kodryan et al., NeurIPS 2022 (arXiv 2209.03695)."
    )

    # -- grid ---------------------------------------------------------------------------
    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        if scale == "quick":
            data = {"name": "mnist1d", "train_limit": QUICK_TRAIN_LIMIT}
            model, epochs, elrs = dict(QUICK_MODEL), QUICK_EPOCHS, QUICK_ELRS
            conventional, checkpoint = QUICK_CONVENTIONAL, False  # runs of seconds
            threads = 1  # a 128-wide MLP gains nothing from more threads, a busy machine loses
        elif scale == "medium":
            root = require_root(data_root, "MNIST", self.name, scale)
            data = {
                "name": "mnist",
                "root": root,
                "train_limit": MEDIUM_TRAIN_LIMIT,
                "test_limit": MEDIUM_TEST_LIMIT,
            }
            model, epochs, elrs = dict(MEDIUM_MODEL), MEDIUM_EPOCHS, MEDIUM_ELRS
            conventional, checkpoint = MEDIUM_CONVENTIONAL, True
            threads = 1
        else:
            root = require_root(data_root, "CIFAR-10", self.name)
            data = {"name": "cifar10", "root": root}  # no augmentation (the paper's noaug)
            model, epochs, elrs = dict(PAPER_MODEL), PAPER_EPOCHS, PAPER_ELRS
            conventional, checkpoint = PAPER_CONVENTIONAL, True
            threads = 0  # torch's default
        base = {
            "data": data,
            "model": model,
            "epochs": epochs,
            "batch_size": 128,
            "seed": SEED,
            "checkpoint": checkpoint,
            "threads": threads,
            "sphere_metrics": {"every": 1, "full_train_every": 1},
        }
        specs = []
        for elr in elrs:
            optim = {"name": "sphere", "elr": elr, "momentum": 0.0, "lr_other": 0.0}
            specs.append(
                RunSpec(
                    f"elr={elr:g}",
                    {**base, "optim": optim},
                    {"kind": "fixed_elr", "elr": elr, "num_classes": NUM_CLASSES},
                )
            )
        for lr, wd in conventional:
            optim = {"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": wd}
            specs.append(
                RunSpec(
                    f"sgd-lr={lr:g}-wd={wd:g}",
                    {**base, "optim": optim},
                    {"kind": "fix_lr", "lr": lr, "wd": wd, "num_classes": NUM_CLASSES},
                )
            )
        return specs

    # -- analysis -----------------------------------------------------------------------
    def analyze(self, results: list[RunResult], report: Report, scale: str) -> None:
        fixed = sorted(
            (r for r in results if r.spec.labels.get("kind") == "fixed_elr" and r.rows),
            key=lambda r: r.spec.labels["elr"],
        )
        conventional = [r for r in results if r.spec.labels.get("kind") == "fix_lr" and r.rows]
        classified = [(r, classify_run(r)) for r in fixed]
        labelled = [(r, c) for r, c in classified if c is not None]
        sweep = [(r.spec.labels["elr"], c.label) for r, c in labelled]

        report.heading("Regime of each ELR")
        self._regime_table(labelled, report)
        report.heading("Boundaries")
        self._boundary_table(sweep, report, scale)
        if fixed:
            report.heading("Curves (the paper's Figure 1)")
            self._curves_figure(labelled, report)
            self._diagram_figure(labelled, report)
            self._final_figure(labelled, report)
        if conventional:
            report.heading("Conventional training: SGD with weight decay (fix_lr)")
            self._conventional(conventional, sweep, report)

    def _regime_table(self, labelled, report: Report) -> None:
        rows, data = [], []
        for r, c in labelled:
            e = c.evidence
            test_error = 100.0 * (1.0 - _tail_mean([row["test_acc"] for row in r.rows]))
            row = [
                fmt(r.spec.labels["elr"]),
                f"{REGIME_NUMBER[c.label]}: {c.label.replace('_', ' ')}"
                + (" (low confidence)" if c.low_confidence else ""),
                e.get("epochs"),
                e.get("train_loss_tail"),
                e.get("loss_slope"),
                100.0 * e.get("train_accuracy_tail", math.nan),
                test_error,
                e.get("effective_grad_norm_tail"),
                e.get("step_angle_tail"),
                "; ".join(c.reasons),
            ]
            rows.append(row)
            data.append(
                {
                    "elr": r.spec.labels["elr"],
                    "regime": c.label,
                    "low_confidence": c.low_confidence,
                    "test_error_tail": test_error,
                    "evidence": e,
                    "reasons": c.reasons,
                    "status": r.status,
                }
            )
        report.table(
            [
                "ELR",
                "regime",
                "epochs",
                "train loss (end)",
                "log-log loss slope",
                "train acc % (end)",
                "test error % (end)",
                "eff. grad norm (end)",
                "step angle rad (end)",
                "why",
            ],
            rows,
            "End values are means over the last 10 % of the epochs; the slope is the least-squares "
            "slope of log(train loss) against log(epoch) over the second half",
        )
        report.data["regimes"] = data

    def _boundary_table(self, sweep, report: Report, scale: str) -> None:
        boundaries = find_boundaries(*zip(*sweep)) if sweep else []
        found_12 = _boundary(boundaries, CONVERGENCE, CHAOTIC_EQUILIBRIUM)
        found_23 = _boundary(boundaries, CHAOTIC_EQUILIBRIUM, DIVERGENCE)
        direct = _boundary(boundaries, CONVERGENCE, DIVERGENCE)  # no equilibrium run between
        setting = {
            "quick": f"SI-MLP, mnist1d ({QUICK_TRAIN_LIMIT} train), {QUICK_EPOCHS} epochs",
            "medium": f"ConvNetSI c=8, MNIST ({MEDIUM_TRAIN_LIMIT} train), {MEDIUM_EPOCHS} epochs",
            "paper": f"ConvNetSI c=32, CIFAR-10, {PAPER_EPOCHS} epochs",
        }
        setting = f"this run (`{scale}`): {setting[scale]}"
        rows = [[setting, _interval(found_12), _interval(found_23)]]
        if direct is not None and found_12 is None:
            rows[0][1] = rows[0][2] = f"1 -> 3 directly in {_interval(direct)}"
        rows += [[source, _interval(a), _interval(b)] for source, a, b in ORIGINAL_BOUNDARIES]
        report.table(
            [
                "setting",
                "1 -> 2 (convergence -> equilibrium)",
                "2 -> 3 (equilibrium -> divergence)",
            ],
            rows,
            "ELR intervals in which the regime changes",
        )
        found = {label for _, label in sweep}
        in_order = regimes_in_order(*zip(*sweep)) if sweep else False
        report.text(
            f"Regimes found: {', '.join(r.replace('_', ' ') for r in REGIMES if r in found) or 'none'}"
            f" ({len(found)} of 3); in the expected ELR order: {'yes' if in_order else 'NO'}."
        )
        if scale == "quick":
            report.text(
                "The quick setting trains on 1000 of the 4000 mnist1d signals: a smaller train set "
                "is easier to fit, so convergence reaches higher ELRs than in the notes' "
                "4000-signal reproduction; the divergence boundary does not depend on it."
            )
        report.data["boundaries"] = {
            "found": {"1->2": found_12, "2->3": found_23, "1->3": direct},
            "all": [b.__dict__ for b in boundaries],
            "original": [{"source": s, "1->2": a, "2->3": b} for s, a, b in ORIGINAL_BOUNDARIES],
            "all_three_found": len(found) == 3,
            "in_order": in_order,
        }

    @staticmethod
    def _colors(labelled):
        elrs = [r.spec.labels["elr"] for r, _ in labelled]
        lo, hi = math.log10(min(elrs)), math.log10(max(elrs))
        cmap = plt.get_cmap("viridis")
        return [cmap(0.0 if hi == lo else (math.log10(e) - lo) / (hi - lo)) for e in elrs]

    def _curves_figure(self, labelled, report: Report) -> None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for (r, c), color in zip(labelled, self._colors(labelled)):
            epochs = [row["epoch"] for row in r.rows]
            loss, _ = train_curves(r.rows)
            label = f"ELR {fmt(r.spec.labels['elr'])} ({REGIME_NUMBER[c.label]})"
            axes[0].plot(epochs, loss, color=color, lw=1.2, label=label)
            axes[1].plot(
                epochs, [100 * (1 - row["test_acc"]) for row in r.rows], color=color, lw=1.0
            )
            axes[2].plot(
                epochs, [row["effective_grad_norm"] for row in r.rows], color=color, lw=1.2
            )
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        for ax, title in zip(
            axes, ("train loss", "test error (%)", "mean effective gradient norm")
        ):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, title="ELR (regime)", title_fontsize=7)
        fig.tight_layout()
        report.figure(
            fig,
            "curves.png",
            "Train loss (full pass, train-mode BN; log), test error (linear) and mean effective "
            "gradient norm |g| |w| (log) against the epoch, one line per ELR",
        )

    def _diagram_figure(self, labelled, report: Report) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        for (r, c), color in zip(labelled, self._colors(labelled)):
            loss, _ = train_curves(r.rows)
            grad = [row["effective_grad_norm"] for row in r.rows]
            label = f"ELR {fmt(r.spec.labels['elr'])} ({REGIME_NUMBER[c.label]})"
            ax.plot(loss, grad, color=color, lw=1.0, label=label)
            ax.plot(loss[:1], grad[:1], marker="*", ms=12, color=color, mec="black", mew=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train loss")
        ax.set_ylabel("mean effective gradient norm")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="ELR (regime)", title_fontsize=7)
        fig.tight_layout()
        report.figure(
            fig,
            "diagram.png",
            "Effective gradient norm against train loss (log-log), one trajectory per ELR; the "
            "star marks the first epoch",
        )

    def _final_figure(self, labelled, report: Report) -> None:
        elrs = [r.spec.labels["elr"] for r, _ in labelled]
        keys = [
            ("train_loss_tail", "train loss (end)", True),
            ("train_accuracy_tail", "train accuracy (end)", False),
            ("effective_grad_norm_tail", "effective gradient norm (end)", True),
            ("step_angle_tail", "step angle, rad (end)", True),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        for ax, (key, title, log_y) in zip(axes, keys):
            values = [c.evidence.get(key, math.nan) for _, c in labelled]
            for (_, c), x, y in zip(labelled, elrs, values):
                ax.scatter([x], [y], color=REGIME_COLORS[c.label], zorder=3, s=25)
            ax.plot(elrs, values, color="gray", lw=0.8, zorder=2)
            ax.set_xscale("log")
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("ELR")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[3].axhline(math.pi / 2, color="black", ls=":", lw=0.8)
        for label, color in REGIME_COLORS.items():
            axes[0].scatter([], [], color=color, label=f"{REGIME_NUMBER[label]}: {label}")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        report.figure(
            fig,
            "final.png",
            "End values against the ELR, coloured by regime (dotted: pi/2, the angle of "
            "nearly orthogonal successive iterates)",
        )

    def _conventional(self, conventional, sweep, report: Report) -> None:
        rows, data = [], []
        for r in conventional:
            elr = [row["elr"] for row in r.rows]
            c = classify_run(r)
            loss, acc = train_curves(r.rows)
            end_elr = _tail_mean(elr)
            rows.append(
                [
                    fmt(r.spec.labels["lr"]),
                    fmt(r.spec.labels["wd"]),
                    elr[0],
                    end_elr,
                    r.rows[-1]["si_norm"],
                    predicted_regime(end_elr, sweep),
                    "-"
                    if c is None
                    else f"{REGIME_NUMBER[c.label]}: {c.label.replace('_', ' ')}"
                    + (" (low confidence)" if c.low_confidence else ""),
                    _tail_mean(loss),
                    100 * _tail_mean(acc),
                    100 * (1 - _tail_mean([row["test_acc"] for row in r.rows])),
                ]
            )
            data.append(
                {
                    "lr": r.spec.labels["lr"],
                    "wd": r.spec.labels["wd"],
                    "elr": elr,
                    "regime": None if c is None else c.label,
                    "evidence": None if c is None else c.evidence,
                }
            )
        report.table(
            [
                "lr",
                "weight decay",
                "ELR (epoch 1)",
                "ELR (end)",
                "SI norm (end)",
                "fixed-ELR sweep at the end ELR",
                "regime of the run",
                "train loss (end)",
                "train acc % (end)",
                "test error % (end)",
            ],
            rows,
            "SGD (momentum 0) with weight decay, same model and head: the ELR = lr / |w|^2 of the "
            "SI weights drifts; the sweep column says which fixed-ELR regime that ELR falls in",
        )
        report.data["conventional"] = data

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        boundaries = find_boundaries(*zip(*sweep)) if sweep else []
        lows = [min(e for e, _ in sweep)] if sweep else []
        edges = lows + [math.sqrt(b.low_elr * b.high_elr) for b in boundaries]
        if sweep:
            edges.append(max(e for e, _ in sweep))
            labels_in_order = [sweep_label(sweep, lows[0])] + [b.high_label for b in boundaries]
            for lo, hi, label in zip(edges, edges[1:], labels_in_order):
                axes[0].axhspan(lo, hi, color=REGIME_COLORS[label], alpha=0.15, lw=0)
        for r in conventional:
            epochs = [row["epoch"] for row in r.rows]
            name = f"lr {fmt(r.spec.labels['lr'])}, wd {fmt(r.spec.labels['wd'])}"
            axes[0].plot(epochs, [row["elr"] for row in r.rows], lw=1.2, label=name)
            axes[1].plot(epochs, train_curves(r.rows)[0], lw=1.2, label=name)
        for ax, title in zip(axes, ("effective learning rate lr / |w|^2", "train loss")):
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        report.figure(
            fig,
            "conventional.png",
            "Conventional training: the ELR over time (shaded: the fixed-ELR sweep's regimes, "
            "blue 1, yellow 2, red 3, split at the geometric means of the boundary intervals) "
            "and the train loss",
        )


def sweep_label(sweep: list[tuple[float, str]], elr: float) -> str:
    """The label of ``elr`` in the sweep (the first run at that ELR)."""
    return next(label for e, label in sorted(sweep) if e == elr)
