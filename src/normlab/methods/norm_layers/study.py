r"""The ``batch_size`` study: no normalization, BN, batch renorm and GN across batch sizes 256 ... 1.

The mcnGroupNorm experiment (albanie/mcnGroupNorm, MatConvNet, 2018): MatConvNet's MNIST LeNet
(conv5-20, pool, conv5-50, pool, conv4-500, ReLU, conv1-10; one norm layer after each of the first
three convs) trained with

* no normalization (lr 0.001), BatchNorm, batch renormalization and GroupNorm with G = 2 groups
  (lr 0.01; what the committed runner passed), constant learning rate at every batch size;
* SGD, momentum 0.9, weight decay 5e-4 on the conv filters (biases and norm scales/shifts undecayed),
  filters N(0, 0.01^2), norm eps 1e-4, one seed;
* batch sizes 256, 128, 64, 32, 16, 4, 2, 1.

The question is which methods train at each batch size. At batch 1 the third norm layer sees one
value per channel (its input is 1x1): BN and batch renorm cannot normalize it (torch raises
"Expected more than 1 value per channel"); that run is recorded as "cannot train".

Scales:

* ``paper``: MNIST files (``data.root``), 30 epochs (10 at batch 1), batch renorm with the
  paper's alpha = 0.01 and the original's per-epoch schedule made continuous: r_max = 1, d_max = 0
  for 5 epochs, then linear ramps reaching r_max = 3, d_max = 5 five epochs later.
* ``medium``: the MNIST files (``data.root``), the first 10,000 training images and the whole
  test set, the paper's batch sizes; each run gets the fewest epochs that give at least
  ``MEDIUM_MIN_STEPS`` optimizer steps (two epochs at least down to batch 4, one at batches 2
  and 1), batch renorm's schedule scaled to the run as at quick scale. About 20 minutes on 2
  CPU cores with ``jobs=2``: the paper's pattern on real data without a GPU.
* ``quick``: scikit-learn's digits resized to 28x28 (1437 training / 360 test images), the same
  LeNet, a few epochs. On a CPU a small batch costs several ms per optimizer step and a large one
  about 1 ms per image, so a fixed number of epochs either starves batch 256 of steps (6 per
  epoch) or makes batch 1 unaffordable. Each run instead gets the fewest epochs that give at least ``QUICK_MIN_STEPS``
  optimizer steps (BN reaches about 3 % test error in 60 steps at batch 256), and at least two
  epochs down to batch 4 so that curves have two points; batches 2 and 1 get one epoch (718 and
  1437 steps). The batch renorm schedule is shortened in proportion (warm-up = 1/6 of the run's
  steps, then ramps over another 1/6: the original's 5 + 5 of 30 epochs) and its moving-average
  rate is raised to ``clip(30 / steps, 0.01, 0.1)`` so the running statistics, which evaluation
  uses, settle within the run (alpha = 0.01 needs about 460 steps, more than a 60-step run).

References: albanie/mcnGroupNorm (README, example/mnist_feat_norm*.m, fig/bs-*.jpg); Y. Wu and
K. He, "Group Normalization", ECCV 2018, arXiv:1803.08494; S. Ioffe, "Batch Renormalization",
NIPS 2017, arXiv:1702.03275.
"""

from __future__ import annotations

import math

from ...plots import column, plt
from ...studies.base import RunResult, RunSpec, Study, group_by, require_root

METHODS = ("none", "bn", "brn", "gn")
BATCH_SIZES = (256, 128, 64, 32, 16, 4, 2, 1)
METHOD_LABELS = {"none": "no norm", "bn": "BN", "brn": "BRN", "gn": "GN (G=2)"}
METHOD_COLORS = {"none": "tab:gray", "bn": "tab:blue", "brn": "tab:green", "gn": "tab:red"}
LEARNING_RATES = {"none": 0.001, "bn": 0.01, "brn": 0.01, "gn": 0.01}
GN_GROUPS = 2  # the committed runner's numGroups (its default 32 does not divide 20 and 50)
NORM_EPS = 1e-4  # MatConvNet's epsilon for all three norm layers

# quick scale
QUICK_DATA = {"name": "digits", "resize": 28}
QUICK_MIN_STEPS = 60
QUICK_MIN_EPOCHS = 2  # for batch sizes >= QUICK_TWO_EPOCHS_FROM
QUICK_TWO_EPOCHS_FROM = 4
# medium scale
MEDIUM_TRAIN_LIMIT = 10000
MEDIUM_MIN_STEPS = 600
# paper scale
PAPER_EPOCHS = 30
PAPER_EPOCHS_BATCH_1 = 10
PAPER_BRN_MOMENTUM = 0.01
PAPER_BRN_WARMUP_EPOCHS = 5
PAPER_BRN_RAMP_EPOCHS = 5
BRN_R_MAX, BRN_D_MAX = 3.0, 5.0

TRAIN_SIZES = {"digits": 1437, "mnist": 60000}  # training images before data.train_limit
CANNOT_TRAIN = "Expected more than 1 value per channel"

# The published curves of mcnGroupNorm (fig/bs-*.jpg, final validation top-1 error in %, read off
# the plots to about +-0.05 points; see notes/norm_layers.md, section 1.4).
ORIGINAL = {
    256: {"none": "1.07", "bn": "0.93", "brn": "0.97", "gn": "0.95"},
    128: {"none": "0.98", "bn": "0.87", "brn": "0.83", "gn": "0.87"},
    64: {"none": "0.93", "bn": "0.82", "brn": "0.78", "gn": "0.80"},
    32: {"none": "0.78", "bn": "0.75", "brn": "0.73", "gn": "0.87"},
    16: {"none": "diverged (epoch 4)", "bn": "0.75", "brn": "0.73", "gn": "0.88"},
    4: {"none": "not shown", "bn": "unstable (3-10)", "brn": "0.6-0.7", "gn": "1.4"},
    2: {"none": "-", "bn": "exploded", "brn": "exploded", "gn": "1.15"},
    1: {"none": "-", "bn": "exploded", "brn": "exploded", "gn": "1.6"},
}


# ---------------------------------------------------------------------------------------- grid
def train_size(data: dict) -> int:
    """Training images a run sees per epoch (``train_limit`` applied)."""
    full = TRAIN_SIZES[data["name"]]
    limit = data.get("train_limit")
    return min(full, limit) if limit else full


def drops_last(num_train: int, batch_size: int) -> bool:
    """Drop the last batch of an epoch when it would hold a single image.

    BN and batch renorm cannot normalize a batch of one image (the 1x1 output of the third conv
    gives one value per channel): such a batch would stop a BN run with an error. The original's
    60000 MNIST images never leave a lone image at batch > 1; digits' 1437 do at batch 2 and 4.
    """
    return batch_size > 1 and num_train % batch_size == 1


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    if drops_last(num_train, batch_size):
        return num_train // batch_size
    return math.ceil(num_train / batch_size)


def quick_epochs(batch_size: int, num_train: int, min_steps: int | None = None) -> int:
    """Epochs of a quick (or medium) run: >= ``min_steps`` steps (``QUICK_MIN_STEPS`` by
    default), >= 2 epochs down to batch 4, >= 1."""
    min_steps = QUICK_MIN_STEPS if min_steps is None else min_steps
    epochs = math.ceil(min_steps / steps_per_epoch(num_train, batch_size))
    floor = QUICK_MIN_EPOCHS if batch_size >= QUICK_TWO_EPOCHS_FROM else 1
    return max(epochs, floor)


def brn_options(scale: str, total_steps: int, spe: int) -> dict:
    """Batch renorm keywords: the schedule (in optimizer steps) and the moving-average rate."""
    if scale == "paper":
        warmup = PAPER_BRN_WARMUP_EPOCHS * spe
        ramp = PAPER_BRN_RAMP_EPOCHS * spe
        momentum = PAPER_BRN_MOMENTUM
    else:
        warmup = ramp = max(1, round(total_steps / 6))
        momentum = float(f"{min(0.1, max(0.01, 30.0 / total_steps)):.2g}")
    return {
        "r_max": BRN_R_MAX,
        "d_max": BRN_D_MAX,
        "schedule": "paper",
        "warmup_steps": warmup,
        "r_max_ramp_steps": ramp,
        "d_max_ramp_steps": ramp,
        "momentum": momentum,
    }


def norm_options(method: str, scale: str, total_steps: int, spe: int) -> dict:
    if method == "none":
        return {}
    if method == "gn":
        return {"num_groups": GN_GROUPS, "eps": NORM_EPS}
    if method == "brn":
        return {"eps": NORM_EPS, **brn_options(scale, total_steps, spe)}
    return {"eps": NORM_EPS}


class BatchSizeStudy(Study):
    name = "batch_size"
    title = "Normalization across batch sizes: none vs BN vs batch renorm vs GN (mcnGroupNorm)"
    description = (
        "MatConvNet's MNIST LeNet with no normalization (lr 0.001), BatchNorm, batch "
        "renormalization and GroupNorm with 2 groups (lr 0.01), SGD momentum 0.9, weight decay "
        "5e-4, constant learning rate, batch sizes 256 down to 1 (the albanie/mcnGroupNorm "
        "experiment). Which methods train at each batch size?"
    )

    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        if scale == "paper":
            data = {"name": "mnist", "root": require_root(data_root, "MNIST", self.name)}
        elif scale == "medium":
            root = require_root(data_root, "MNIST", self.name, scale)
            data = {"name": "mnist", "root": root, "train_limit": MEDIUM_TRAIN_LIMIT}
        else:
            data = dict(QUICK_DATA)
        num_train = train_size(data)
        specs = []
        # Smallest batches first: their runs are the longest, so two workers end close together.
        for batch_size in sorted(BATCH_SIZES):
            spe = steps_per_epoch(num_train, batch_size)
            if scale == "paper":
                epochs = PAPER_EPOCHS_BATCH_1 if batch_size == 1 else PAPER_EPOCHS
            elif scale == "medium":
                epochs = quick_epochs(batch_size, num_train, MEDIUM_MIN_STEPS)
            else:
                epochs = quick_epochs(batch_size, num_train)
            for method in METHODS:
                config = {
                    "data": {**data, "drop_last": drops_last(num_train, batch_size)},
                    "model": {
                        "name": "lenet",
                        "norm": method,
                        "norm_kwargs": norm_options(method, scale, epochs * spe, spe),
                        "init_std": 0.01,
                    },
                    "optim": {
                        "name": "sgd",
                        "lr": LEARNING_RATES[method],
                        "momentum": 0.9,
                        "weight_decay": 5e-4,
                        # MatConvNet decays conv filters only (GN's scales were decayed too there).
                        "no_decay_norm_and_bias": True,
                    },
                    "schedule": {"name": "constant"},
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "seed": 0,
                }
                labels = {
                    "method": method,
                    "batch_size": batch_size,
                    "epochs": epochs,
                    "steps": epochs * spe,
                }
                specs.append(RunSpec(f"{method}-bs{batch_size}", config, labels))
        return specs

    def analyze(self, results, report, scale):
        cells = {
            key: outcome(runs[0]) for key, runs in group_by(results, "method", "batch_size").items()
        }
        methods = [m for m in METHODS if any((m, b) in cells for b in BATCH_SIZES)]
        sizes = [b for b in BATCH_SIZES if any((m, b) in cells for m in METHODS)]

        report.heading("Setup")
        report.text(_setup_text(scale))
        setup_rows = []
        for b in sizes:
            runs = [r for r in results if r.spec.labels["batch_size"] == b]
            brn = next(
                (
                    r.spec.config["model"]["norm_kwargs"]
                    for r in runs
                    if r.spec.labels["method"] == "brn"
                ),
                None,
            )
            setup_rows.append(
                [
                    b,
                    runs[0].spec.labels["epochs"],
                    runs[0].spec.labels["steps"],
                    f"{brn['warmup_steps']} + {brn['r_max_ramp_steps']}" if brn else "-",
                    f"{brn['momentum']:.3g}" if brn else "-",
                ]
            )
        report.table(
            ["batch", "epochs", "optimizer steps", "BRN warm-up + ramp steps", "BRN momentum"],
            setup_rows,
            "Training length per batch size (every method alike)",
        )

        report.heading("Final test error")
        report.table(
            ["method", *[f"batch {b}" for b in sizes]],
            [
                [
                    METHOD_LABELS[m],
                    *[cells[(m, b)]["text"] if (m, b) in cells else "-" for b in sizes],
                ]
                for m in methods
            ],
            f"This run ({scale}): final test error (%) after the last epoch",
        )
        report.table(
            ["method", *[f"batch {b}" for b in sizes]],
            [[METHOD_LABELS[m], *[ORIGINAL[b][m] for b in sizes]] for m in METHODS],
            "Original MatConvNet results (albanie/mcnGroupNorm, MNIST, 30 epochs, 10 at batch 1): "
            "final validation error (%) read off the published figures (+-0.05 points)",
        )
        report.text(_which_train(cells, methods, sizes))
        report.text(_comparison(cells, methods, sizes, scale))

        fig = _curves_figure(results, sizes)
        report.figure(fig, "curves.png", "Test error (%) against epoch, one panel per batch size")
        fig = _final_figure(cells, methods, sizes)
        report.figure(fig, "final_error.png", "Final test error (%) against batch size")

        report.data["final_test_error"] = {
            m: {str(b): cells[(m, b)]["error"] for b in sizes if (m, b) in cells} for m in methods
        }
        report.data["verdicts"] = {
            str(b): {
                v: [m for m, _ in entries] for v, entries in verdicts(cells, b, methods).items()
            }
            for b in sizes
        }
        report.data["original"] = {str(b): ORIGINAL[b] for b in sizes}
        report.data["setup"] = {
            str(row[0]): {"epochs": row[1], "steps": row[2]} for row in setup_rows
        }


# ------------------------------------------------------------------------------------ analysis
UNTRAINED_FROM = 50.0  # final test error (%) from which a run has not learned (chance is 90 %)
DEGRADED_FACTOR = 2.0  # final error above this multiple of the best at that batch size: degraded
VERDICTS = ("trains", "degraded", "untrained", "diverged", "cannot train", "failed", "missing")


def outcome(result: RunResult) -> dict:
    """What one run came to: ``kind`` (finished, diverged, cannot train, failed, interrupted,
    missing), the final test error in % (None without one) and the text for the table."""
    if result.status == "diverged":
        epoch = result.final("epoch")
        return {"kind": "diverged", "error": None, "text": f"diverged (epoch {epoch})"}
    if result.status == "failed" and CANNOT_TRAIN in (result.error or ""):
        return {"kind": "cannot train", "error": None, "text": "cannot train"}
    acc = result.final("test_acc") if result.status == "finished" else None
    if not (isinstance(acc, int | float) and math.isfinite(acc)):
        return {"kind": result.status, "error": None, "text": result.status}
    error = 100.0 * (1.0 - acc)
    return {"kind": "finished", "error": error, "text": f"{error:.2f}"}


def verdicts(cells: dict, batch_size: int, methods) -> dict[str, list[tuple[str, float | None]]]:
    """The methods at one batch size sorted into VERDICTS, each with its final error.

    trains: final error below UNTRAINED_FROM and at most DEGRADED_FACTOR x the best final error
    at this batch size; degraded: below UNTRAINED_FROM but worse than that; untrained: at or above
    UNTRAINED_FROM; otherwise the run's outcome (diverged, cannot train, failed, ...).
    """
    errors = [
        cells[(m, batch_size)]["error"]
        for m in methods
        if (m, batch_size) in cells and cells[(m, batch_size)]["error"] is not None
    ]
    best = min(errors) if errors else None
    out: dict[str, list] = {}
    for m in methods:
        cell = cells.get((m, batch_size))
        if cell is None:
            continue
        error = cell["error"]
        if error is None:
            verdict = cell["kind"] if cell["kind"] in VERDICTS else "failed"
        elif error >= UNTRAINED_FROM:
            verdict = "untrained"
        elif error > DEGRADED_FACTOR * max(best, 1e-9):
            verdict = "degraded"
        else:
            verdict = "trains"
        out.setdefault(verdict, []).append((m, error))
    return {v: out[v] for v in VERDICTS if v in out}


def _verdict_phrase(groups: dict) -> str:
    parts = []
    for verdict, entries in groups.items():
        names = [
            f"{METHOD_LABELS[m]} ({e:.1f} %)" if e is not None else METHOD_LABELS[m]
            for m, e in entries
        ]
        parts.append(f"{verdict}: {', '.join(names)}")
    return "; ".join(parts)


def _which_train(cells: dict, methods: list[str], sizes: list[int]) -> str:
    lines = [
        f"**Which methods train.** *trains*: final test error below {UNTRAINED_FROM:.0f} % and "
        f"within {DEGRADED_FACTOR:g}x the best method at that batch size; *degraded*: below "
        f"{UNTRAINED_FROM:.0f} % but worse; *untrained*: {UNTRAINED_FROM:.0f} % or more (chance "
        "is 90 %); *cannot train*: BN/BRN with one value per channel (batch 1, 1x1 third layer).",
        "",
    ]
    for b in sizes:
        lines.append(f"- batch {b}: {_verdict_phrase(verdicts(cells, b, methods))}")
    return "\n".join(lines)


ORIGINAL_SMALL_BATCH = {
    4: "BN unstable from epoch ~7 (3-10 %), BRN best (0.6-0.7 %), GN stable (1.4 %)",
    2: "only GN trains (1.15 %); BN and BRN explode in epoch 1",
    1: "only GN trains (1.6 %); BN and BRN explode",
}


def _comparison(cells: dict, methods: list[str], sizes: list[int], scale: str) -> str:
    lines = ["**Against the original** (MatConvNet, MNIST):", ""]
    for b in [b for b in sizes if b in ORIGINAL_SMALL_BATCH]:
        here = _verdict_phrase(verdicts(cells, b, methods))
        lines.append(f"- batch {b}: original: {ORIGINAL_SMALL_BATCH[b]}; here: {here}.")
    spreads = []
    for b in [b for b in sizes if b >= 32]:
        errs = [cells.get((m, b), {}).get("error") for m in ("bn", "brn", "gn")]
        errs = [e for e in errs if e is not None]
        if len(errs) > 1:
            spreads.append(max(errs) - min(errs))
    if spreads:
        lines.append(
            "- batch 32-256: original: BN, BRN and GN end within 0.2 points of each other "
            f"(0.73-0.97 %); here: within {max(spreads):.1f} points."
        )
    if scale == "quick":
        lines += [
            "",
            "Quick runs last 60-1437 optimizer steps instead of the original's 7k-900k, on 1437 "
            "digits instead of 60000 MNIST images: errors are higher throughout, the baseline "
            "(lr 0.001, filters N(0, 0.01^2)) has barely left its initial plateau except at the "
            "smallest batches (most steps), and instabilities that took the original thousands "
            "of steps (BN at batch 4, the baseline at batch 16) have no time to appear.",
        ]
    return "\n".join(lines)


def _setup_text(scale: str) -> str:
    if scale == "paper":
        data = "MNIST (60000 training / 10000 test images), standardized"
        length = f"{PAPER_EPOCHS} epochs ({PAPER_EPOCHS_BATCH_1} at batch 1)"
        brn = (
            f"BRN: alpha = {PAPER_BRN_MOMENTUM}, r_max = 1 and d_max = 0 for "
            f"{PAPER_BRN_WARMUP_EPOCHS} epochs, then linear ramps to r_max = 3, d_max = 5 over "
            f"{PAPER_BRN_RAMP_EPOCHS} epochs (the original's per-epoch table, made continuous)."
        )
    else:
        if scale == "medium":
            data = f"MNIST files, the first {MEDIUM_TRAIN_LIMIT} training images / the test set"
        else:
            data = "scikit-learn digits resized to 28x28 (1437 training / 360 test images)"
        min_steps = MEDIUM_MIN_STEPS if scale == "medium" else QUICK_MIN_STEPS
        length = (
            f"the fewest epochs giving >= {min_steps} optimizer steps, at least "
            f"{QUICK_MIN_EPOCHS} down to batch {QUICK_TWO_EPOCHS_FROM}, 1 below (small batches "
            "cost several ms per step on a CPU)"
        )
        brn = (
            "BRN schedule shortened to the run: r_max = 1, d_max = 0 for the first 1/6 of the "
            "steps, then linear ramps to r_max = 3, d_max = 5 over the next 1/6 (the original: "
            "5 + 5 of 30 epochs; the paper: 5k + 20k/35k steps); moving-average rate "
            "clip(30 / steps, 0.01, 0.1) instead of 0.01 so that the running statistics used at "
            "test time settle within a short run."
        )
    return (
        f"Data: {data}. LeNet as MatConvNet's (filters N(0, 0.01^2), one ReLU), norm eps 1e-4; "
        f"SGD momentum 0.9, weight decay 5e-4 (not on biases and norm parameters), constant lr "
        f"0.001 without normalization and 0.01 with; GN with {GN_GROUPS} groups. Length: "
        f"{length}. {brn} A last batch of a single image is dropped (BN cannot normalize it). "
        "Not reproduced: MatConvNet's learning-rate multiplier 2 on BN/BRN scales, weight decay "
        "on GN's scales, mean-image subtraction (here per-channel standardization)."
    )


def _curves_figure(results: list[RunResult], sizes: list[int]):
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(sizes))
    rows = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    by_size = group_by(results, "batch_size")
    for i, b in enumerate(sizes):
        ax = axes[i // cols][i % cols]
        notes = []
        last_epoch = 1
        for r in sorted(
            by_size.get((b,), []), key=lambda r: METHODS.index(r.spec.labels["method"])
        ):
            method = r.spec.labels["method"]
            label = METHOD_LABELS[method]
            last_epoch = max(last_epoch, r.spec.labels.get("epochs", 1))
            cell = outcome(r)
            if cell["error"] is None:
                notes.append(f"{label}: {cell['text']}")
            xs, ys = column(r.rows, "test_error")
            points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
            if points:
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o",
                    ms=4,
                    lw=1.4,
                    color=METHOD_COLORS[method],
                    label=label,
                )
        ax.axhline(90.0, color="black", lw=0.8, ls=":", label="chance")
        ax.set_yscale("log")
        ax.set_ylim(1.0, 100.0)
        ax.set_xlim(0.5, last_epoch + 0.5)
        if last_epoch <= 10:
            ax.set_xticks(range(1, last_epoch + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
        if notes:
            ax.text(0.03, 0.03, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")
    for j in range(len(sizes), rows * cols):
        axes[j // cols][j % cols].axis("off")
    # One legend for the grid: every method and the chance line, whichever panels they appear in.
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=9)
    return fig


def _final_figure(cells: dict, methods: list[str], sizes: list[int]):
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for k, m in enumerate(methods):
        xs = [b for b in sizes if cells.get((m, b), {}).get("error") is not None]
        ys = [cells[(m, b)]["error"] for b in xs]
        ax.plot(xs, ys, marker="o", lw=1.5, color=METHOD_COLORS[m], label=METHOD_LABELS[m])
        bad = [b for b in sizes if (m, b) in cells and cells[(m, b)]["error"] is None]
        if bad:
            # Side by side, not on top of each other, when several methods fail at one batch size.
            shift = 1.08 ** (k - (len(methods) - 1) / 2)
            ax.scatter(
                [b * shift for b in bad],
                [100.0] * len(bad),
                marker="x",
                s=45,
                color=METHOD_COLORS[m],
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("final test error (%)")
    ax.set_title("x at 100 %: cannot train, diverged or failed", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
