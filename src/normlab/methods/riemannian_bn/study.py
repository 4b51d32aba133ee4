"""The ``riemannian_bn`` study: SGD vs SGD-G vs Adam-G (Cho & Lee, NIPS 2017), our test error
beside the paper's table.

Every run uses the paper's hyper-parameters (notes/riemannian_bn.md section 2): batch 128, learning
rates x0.2 at 30 %, 60 % and 80 % of training (epochs 60/120/160 of 200), and

* SGD:    lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4 on every parameter (TF code);
* SGD-G:  lr 0.01 (Euclidean) / lrg 0.2 (G(1, n) rows), momentum 0.9, omega 0.1, grad_clip 0.1,
          weight decay 5e-4 off the manifold, 0 on BN parameters and biases;
* Adam-G: lr 0.01 / lrg 0.05, betas (0.9, 0.99), omega 0.1, grad_clip 0.1, same decay.

``scale=medium``: the paper's VGG-13 (two FC layers, BN without scale) at widths x 1/4 and WRN-16-1 on
the first 10,000 MNIST training images (``data.root``), 6 epochs, one seed.
``scale=quick``: VGG-13 (widths x 1/8) and WRN-10-1 with BN on mnist1d, 3 seeds, 12 epochs
(a couple of minutes on 2 CPU cores). ``scale=paper``: VGG-13/16/19 and WRN-28-10 (dropout 0.3) on
CIFAR-10 and CIFAR-100 files (``data.root``), 200 epochs, 4-pixel reflect-padded random crops and
horizontal flips, 5 seeds (the paper reports the median of five runs).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603);
results table from the authors' TensorFlow README / poster.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ...plots import plot_mean_std, plt
from ...report import mean_std, pm
from ...studies.base import RunSpec, Study, finite, group_by, require_root

# Optimizers in the order of the paper's table; each is an ``optim`` config section.
OPTIMIZERS: dict[str, dict] = {
    "SGD": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "SGD-G": {
        "name": "sgdg",
        "lr": 0.01,
        "lrg": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "norm_decay": 0.0,
        "omega": 0.1,
        "grad_clip": 0.1,
    },
    "Adam-G": {
        "name": "adamg",
        "lr": 0.01,
        "lrg": 0.05,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-8,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "norm_decay": 0.0,
        "omega": 0.1,
        "grad_clip": 0.1,
    },
}
SCHEDULE = {"name": "multistep", "milestones": [0.3, 0.6, 0.8], "gamma": 0.2}
BATCH_SIZE = 128


@dataclass
class Setting:
    """One scale of the study: datasets, models (label -> ``model`` section), epochs, seeds."""

    datasets: tuple[str, ...]
    models: dict[str, dict]
    epochs: int
    seeds: tuple[int, ...]
    data: dict = field(default_factory=dict)  # extra ``data`` options (augmentation, limits)
    schedule: dict = field(default_factory=lambda: dict(SCHEDULE))
    rates: dict[str, dict] = field(default_factory=dict)  # optimizer label -> lr / lrg overrides


QUICK = Setting(
    datasets=("mnist1d",),
    models={
        "VGG-13 x1/8": {"name": "vgg", "depth": 13, "width_multiplier": 0.125},
        "WRN-10-1": {"name": "wrn", "depth": 10, "widen": 1},
    },
    epochs=12,
    seeds=(0, 1, 2),
)
PAPER_VGG = {"fc_layers": 2, "fc_width": 512, "norm_scale": False}
MEDIUM = Setting(
    datasets=("mnist",),
    models={
        "VGG-13 x1/4 (paper's)": {
            "name": "vgg",
            "depth": 13,
            "width_multiplier": 0.25,
            **PAPER_VGG,
            "fc_width": 128,
        },
        "WRN-16-1": {"name": "wrn", "depth": 16, "widen": 1},
    },
    epochs=6,
    seeds=(0,),
    data={"train_limit": 10000},
)
PAPER = Setting(
    datasets=("cifar10", "cifar100"),
    models={
        # the paper's VGG: two FC-512-BN-ReLU layers before the classifier, BN without scale
        "VGG-13": {"name": "vgg", "depth": 13, **PAPER_VGG},
        "VGG-16": {"name": "vgg", "depth": 16, **PAPER_VGG},
        "VGG-19": {"name": "vgg", "depth": 19, **PAPER_VGG},
        "WRN-28-10": {"name": "wrn", "depth": 28, "widen": 10, "dropout": 0.3},
    },
    epochs=200,
    seeds=(0, 1, 2, 3, 4),
    data={"crop_padding": 4, "padding_mode": "reflect", "flip": 0.5},
)
# SVHN as the TF code trains it (notes section 2): train + extra, no augmentation, 160 epochs,
# x0.1 after epochs 60 and 120, WRN dropout 0.4, and ten times smaller learning rates.
PAPER_SVHN = Setting(
    datasets=("svhn",),
    models={
        "VGG-13": {"name": "vgg", "depth": 13, **PAPER_VGG},
        "VGG-19": {"name": "vgg", "depth": 19, **PAPER_VGG},
        "WRN-16-4": {"name": "wrn", "depth": 16, "widen": 4, "dropout": 0.4},
        "WRN-22-8": {"name": "wrn", "depth": 22, "widen": 8, "dropout": 0.4},
    },
    epochs=160,
    seeds=(0, 1, 2, 3, 4),
    data={"svhn_extra": True},
    schedule={"name": "multistep", "milestones": [60, 120], "gamma": 0.1},
    rates={
        "SGD": {"lr": 0.01},
        "SGD-G": {"lr": 0.001, "lrg": 0.02},
        "Adam-G": {"lr": 0.001, "lrg": 0.005},
    },
)

# The paper's Table (test error %, median of five runs), from the authors' TF README and poster.
PAPER_RESULTS: dict[str, dict[str, tuple[float, float, float]]] = {
    "cifar10": {
        "VGG-13": (5.88, 5.87, 6.05),
        "VGG-19": (6.49, 5.92, 6.02),
        "WRN-28-10": (3.89, 3.85, 3.78),
        "WRN-40-10": (3.72, 3.72, 3.80),
    },
    "cifar100": {
        "VGG-13": (26.17, 25.29, 24.89),
        "VGG-19": (27.62, 25.79, 25.59),
        "WRN-28-10": (18.66, 18.19, 18.30),
        "WRN-40-10": (18.39, 18.04, 17.85),
    },
    "svhn": {
        "VGG-13": (1.78, 1.74, 1.72),
        "VGG-19": (1.94, 1.81, 1.77),
        "WRN-16-4": (1.64, 1.67, 1.61),
        "WRN-22-8": (1.64, 1.63, 1.55),
    },
}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}


def settings(scale: str) -> list[Setting]:
    return {"quick": [QUICK], "medium": [MEDIUM], "paper": [PAPER, PAPER_SVHN]}[scale]


class RiemannianBNStudy(Study):
    name = "riemannian_bn"
    title = "Riemannian batch normalization: SGD vs SGD-G vs Adam-G (Cho & Lee 2017)"
    description = (
        "Weights that feed a BN channel are scale-invariant per output row; SGD-G and Adam-G "
        "optimize each row as a point of G(1,n) (unit sphere) with the exponential map, parallel "
        "transport of the momentum, per-row gradient clipping and an orthogonality penalty, and "
        "plain SGD + Nesterov elsewhere. Hyper-parameters are the paper's: SGD lr 0.1 (momentum "
        "0.9, Nesterov, weight decay 5e-4 on everything); SGD-G lr 0.01 / lrg 0.2; Adam-G "
        "lr 0.01 / lrg 0.05 (betas 0.9, 0.99); omega 0.1; grad_clip 0.1; weight decay 5e-4 off "
        "the manifold and 0 on BN/bias; batch 128; all learning rates x0.2 at 30 %, 60 %, 80 % "
        "of training. Groups are found by structure (`grassmann_param_groups`)."
    )

    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        if scale == "paper":
            require_root(data_root, "CIFAR-10/100 and SVHN", self.name)
        if scale == "medium":
            require_root(data_root, "MNIST", self.name, scale)
        specs = []
        for s in settings(scale):
            for data in s.datasets:
                data_section = {"name": data, **s.data}
                if scale != "quick":
                    data_section["root"] = data_root
                for model_label, model in s.models.items():
                    for opt_label in OPTIMIZERS:
                        for seed in s.seeds:
                            specs.append(
                                self._run(s, data_section, model_label, model, opt_label, seed)
                            )
        return specs

    @staticmethod
    def _run(s: Setting, data: dict, model_label: str, model: dict, opt_label: str, seed: int):
        optim = {**OPTIMIZERS[opt_label], **s.rates.get(opt_label, {})}
        slug = model_label.replace(" ", "").replace("/", "_")
        return RunSpec(
            f"{data['name']}-{slug}-{optim['name']}-s{seed}",
            {
                "data": dict(data),
                "model": {**model, "norm": "bn"},
                "optim": optim,
                "schedule": dict(s.schedule),
                "epochs": s.epochs,
                "batch_size": BATCH_SIZE,
                "seed": seed,
            },
            {"data": data["name"], "model": model_label, "optimizer": opt_label, "seed": seed},
        )

    def analyze(self, results, report, scale):
        optimizers = list(OPTIMIZERS)
        cells = group_by(results, "data", "model", "optimizer")
        datasets = list(dict.fromkeys(r.spec.labels["data"] for r in results))
        models = list(dict.fromkeys(r.spec.labels["model"] for r in results))

        def errors(runs) -> list[float]:
            return [100.0 * (1.0 - r.final("test_acc")) for r in runs if _ok(r, "test_acc")]

        def losses(runs) -> list[float]:
            return [r.final("train_loss") for r in runs if _ok(r, "train_loss")]

        # ---- our numbers, beside the paper's where the paper has the same dataset and model
        report.heading("Test error (%): ours beside the paper's")
        err_rows, loss_rows, data_out = [], [], {}
        for data in datasets:
            paper = PAPER_RESULTS.get(data, {})
            for model in models:
                row, lrow = [DATASET_LABELS.get(data, data), model], [data, model]
                for k, opt in enumerate(optimizers):
                    runs = cells.get((data, model, opt), [])
                    e, lo = errors(runs), losses(runs)
                    # the paper reports medians: show ours beside the mean at that scale
                    med = f"median {statistics.median(e):.2f}, " if e and scale == "paper" else ""
                    row.append(f"{pm(e)} ({med}n={len(e)})")
                    lrow.append(pm(lo, digits=4))
                    data_out[f"{data}/{model}/{opt}"] = {
                        "test_error": e,
                        "train_loss": lo,
                        "paper_test_error": paper[model][k] if model in paper else None,
                    }
                row += [paper[model][k] if model in paper else "-" for k in range(3)]
                err_rows.append(row)
                loss_rows.append(lrow)
        report.table(
            ["data", "model", *(f"{o} (ours)" for o in optimizers)]
            + [f"{o} (paper)" for o in optimizers],
            err_rows,
            "Final-epoch test error %, ours: mean ± std over seeds (n = finished runs; "
            "at scale=paper also the median). "
            "Paper: median of 5 runs, only where the paper has this dataset and model "
            "('-' otherwise).",
        )
        if scale == "quick":
            report.text(
                "At `scale=quick` the models and data (mnist1d, 12 epochs) are not the paper's, "
                "so the paper's columns are empty: compare the *ordering* of the optimizers with "
                "the paper's table below, not the numbers."
            )
        report.table(
            ["data", "model", *optimizers],
            loss_rows,
            "Final-epoch training loss (running mean over the last epoch), mean ± std over seeds",
        )
        report.table(
            ["data", "model", *(f"{o} − SGD" for o in optimizers[1:])],
            _differences(cells, datasets, models, optimizers, errors),
            "Test error difference to SGD (percentage points, means over seeds; negative = "
            "better than SGD). The paper's CIFAR differences are -0.6 to +0.2 (CIFAR-10) and "
            "-2.0 to -0.2 (CIFAR-100).",
        )
        report.data["ours"] = data_out

        # ---- the paper's table, clearly labelled
        report.heading("The paper's numbers (Cho & Lee 2017)")
        paper_rows = [
            [DATASET_LABELS[d], m, *vals]
            for d, table in PAPER_RESULTS.items()
            for m, vals in table.items()
        ]
        report.table(
            ["dataset", "model", *optimizers],
            paper_rows,
            "Paper's test error % (median of five runs; authors' TF README and poster). "
            "These apply only to the datasets and models listed, at 200 epochs (SVHN: 160).",
        )
        report.data["paper"] = PAPER_RESULTS

        # ---- curves
        self._curves(results, report, datasets, models, optimizers)

    def _curves(self, results, report, datasets, models, optimizers):
        panels = [(d, m) for d in datasets for m in models]
        if not panels:
            return
        colors = {"SGD": "tab:gray", "SGD-G": "tab:blue", "Adam-G": "tab:red"}
        fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.3 * len(panels)), squeeze=False)
        by_cell = group_by(results, "data", "model", "optimizer")
        for i, (data, model) in enumerate(panels):
            groups = {
                opt: [r.rows for r in by_cell.get((data, model, opt), []) if r.rows]
                for opt in optimizers
            }
            plot_mean_std(axes[i][0], groups, "train_loss", log_y=True, colors=colors)
            plot_mean_std(axes[i][1], groups, "test_error", colors=colors)
            label = f"{DATASET_LABELS.get(data, data)} {model}"
            axes[i][0].set_title(f"{label}: training loss")
            axes[i][1].set_title(f"{label}: test error")
            axes[i][0].legend(fontsize=8)
        fig.tight_layout()
        report.figure(
            fig,
            "curves.png",
            "Training loss and test error per epoch, mean ± std over seeds; all learning rates "
            "x0.2 at 30 %, 60 %, 80 % of training",
        )


def _ok(result, key: str) -> bool:
    return result.ok and finite(result.final(key))


def _differences(cells, datasets, models, optimizers, errors) -> list[list]:
    rows = []
    for data in datasets:
        for model in models:
            base, _ = mean_std(errors(cells.get((data, model, optimizers[0]), [])))
            row = [data, model]
            for opt in optimizers[1:]:
                mean, _ = mean_std(errors(cells.get((data, model, opt), [])))
                row.append(f"{mean - base:+.2f}" if finite(mean) and finite(base) else "n/a")
            rows.append(row)
    return rows
