"""The ``baseline`` study: the same MLP with and without batch normalization on the embedded data.

A smoke test of the whole pipeline and a reference point for the method studies: test accuracy
(mean ± std over 3 seeds) and the curves of each setting. ``scale=medium`` trains the same MLPs on
the first 10,000 MNIST training images (``data.root``) instead.
"""

from __future__ import annotations

from ..plots import plot_mean_std, plt
from ..report import pm
from .base import RunSpec, Study, group_by, require_root

SEEDS = (0, 1, 2)
DATASETS = {
    # dataset: (epochs quick, epochs paper, MLP width, lr)
    "digits": (15, 60, 128, 0.05),
    "mnist1d": (30, 200, 256, 0.05),
}
MEDIUM_DATASETS = {"mnist": (5, 5, 256, 0.05)}  # the first 10,000 training images
MEDIUM_TRAIN_LIMIT = 10000


class BaselineStudy(Study):
    name = "baseline"
    title = "Baseline: an MLP with and without batch normalization"
    description = (
        "A 3-layer ReLU MLP trained with SGD (momentum 0.9, weight decay 5e-4, batch 128) with "
        "`norm=none` and `norm=bn` on the embedded datasets, 3 seeds each."
    )

    def runs(self, scale: str, data_root: str | None = None) -> list[RunSpec]:
        specs = []
        datasets, data_options = DATASETS, {}
        if scale == "medium":
            root = require_root(data_root, "MNIST", self.name, scale)
            datasets = MEDIUM_DATASETS
            data_options = {"root": root, "train_limit": MEDIUM_TRAIN_LIMIT}
        for data, (quick, paper, width, lr) in datasets.items():
            for norm in ("none", "bn"):
                for seed in SEEDS:
                    specs.append(
                        RunSpec(
                            f"{data}-{norm}-s{seed}",
                            {
                                "data": {"name": data, **data_options},
                                "model": {"name": "mlp", "depth": 3, "width": width, "norm": norm},
                                "optim": {
                                    "name": "sgd",
                                    "lr": lr,
                                    "momentum": 0.9,
                                    "weight_decay": 5e-4,
                                },
                                "epochs": quick if scale == "quick" else paper,
                                "batch_size": 128,
                                "seed": seed,
                            },
                            {"data": data, "norm": norm, "seed": seed},
                        )
                    )
        return specs

    def analyze(self, results, report, scale):
        rows = []
        for (data, norm), runs in group_by(results, "data", "norm").items():
            rows.append(
                [
                    data,
                    norm,
                    len(runs),
                    pm([r.final("train_loss") for r in runs], digits=4),
                    pm([r.final("test_acc") for r in runs], 100.0),
                    pm([(r.summary or {}).get("best_test_acc") for r in runs], 100.0),
                ]
            )
        report.table(
            ["data", "norm", "seeds", "final train loss", "final test acc %", "best test acc %"],
            rows,
            "Final figures, mean ± std over seeds",
        )
        report.data["table"] = rows
        by_data = group_by(results, "data")
        fig, axes = plt.subplots(len(by_data), 2, figsize=(10, 3.4 * len(by_data)), squeeze=False)
        for i, ((data,), runs) in enumerate(by_data.items()):
            groups = {}
            for r in runs:
                groups.setdefault(f"norm={r.spec.labels['norm']}", []).append(r.rows)
            plot_mean_std(axes[i][0], groups, "train_loss", log_y=True)
            plot_mean_std(axes[i][1], groups, "test_acc")
            axes[i][0].set_title(f"{data}: training loss")
            axes[i][1].set_title(f"{data}: test accuracy")
            axes[i][0].legend(fontsize=8)
        fig.tight_layout()
        report.figure(fig, "curves.png", "mean ± std over seeds")
