"""The ``riemannian_bn`` study: its grid, the paper's hyper-parameters, and a tiny end-to-end run."""

import json

import pytest

from normlab.config import resolve
from normlab.errors import UserError
from normlab.methods.riemannian_bn import study as rb
from normlab.studies import get_study, run_study

PAPER_OPTIM = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "sgdg": {
        "lr": 0.01,
        "lrg": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "norm_decay": 0.0,
        "omega": 0.1,
        "grad_clip": 0.1,
    },
    "adamg": {
        "lr": 0.01,
        "lrg": 0.05,
        "beta1": 0.9,
        "beta2": 0.99,
        "weight_decay": 5e-4,
        "norm_decay": 0.0,
        "omega": 0.1,
        "grad_clip": 0.1,
    },
}


def test_quick_grid_is_optimizers_x_models_x_seeds_with_the_papers_hyper_parameters():
    specs = get_study("riemannian_bn").runs("quick")
    assert len(specs) == 3 * 2 * 3
    assert len({s.name for s in specs}) == len(specs)
    cells = {(s.labels["model"], s.labels["optimizer"], s.labels["seed"]) for s in specs}
    assert len(cells) == len(specs)
    assert {s.labels["optimizer"] for s in specs} == {"SGD", "SGD-G", "Adam-G"}
    assert {s.labels["seed"] for s in specs} == {0, 1, 2}
    for spec in specs:
        cfg = resolve(spec.config)  # every key is valid
        assert cfg["data"]["name"] == "mnist1d" and cfg["data"]["root"] is None
        assert cfg["model"]["norm"] == "bn" and cfg["model"]["name"] in ("vgg", "wrn")
        assert cfg["batch_size"] == 128
        assert cfg["schedule"] == {"name": "multistep", "milestones": [0.3, 0.6, 0.8], "gamma": 0.2}
        optim = cfg["optim"]
        expected = PAPER_OPTIM[optim["name"]]
        assert {k: optim[k] for k in expected} == expected
        label = {"sgd": "SGD", "sgdg": "SGD-G", "adamg": "Adam-G"}[optim["name"]]
        assert spec.labels["optimizer"] == label
    # SGD decays everything, as the paper's TF baseline
    sgd = next(s for s in specs if s.labels["optimizer"] == "SGD")
    assert resolve(sgd.config)["optim"]["no_decay_norm_and_bias"] is False


def test_paper_grid_needs_the_files_and_uses_the_papers_setting():
    study = get_study("riemannian_bn")
    with pytest.raises(UserError, match="data.root"):
        study.runs("paper")
    specs = study.runs("paper", "/data/cifar")
    svhn = [s for s in specs if s.labels["data"] == "svhn"]
    specs = [s for s in specs if s.labels["data"] != "svhn"]
    assert len(specs) == 2 * 4 * 3 * 5
    models = {s.labels["model"] for s in specs}
    assert models == {"VGG-13", "VGG-16", "VGG-19", "WRN-28-10"}
    # the poster's SVHN grid, trained as the TF code does (train + extra, no augmentation)
    assert len(svhn) == 4 * 3 * 5
    assert {s.labels["model"] for s in svhn} == set(rb.PAPER_RESULTS["svhn"])
    for spec in svhn:
        cfg = resolve(spec.config)
        assert cfg["data"]["svhn_extra"] is True and cfg["data"]["flip"] == 0.0
        assert cfg["epochs"] == 160 and cfg["schedule"]["milestones"] == [60, 120]
        assert cfg["schedule"]["gamma"] == 0.1
        lrs = {"SGD": (0.01, None), "SGD-G": (0.001, 0.02), "Adam-G": (0.001, 0.005)}
        lr, lrg = lrs[spec.labels["optimizer"]]
        assert cfg["optim"]["lr"] == lr and cfg["optim"].get("lrg") == lrg
        if cfg["model"]["name"] == "wrn":
            assert cfg["model"]["dropout"] == 0.4
    for spec in specs:
        cfg = resolve(spec.config)
        d = cfg["data"]
        assert d["name"] in ("cifar10", "cifar100") and d["root"] == "/data/cifar"
        assert (d["crop_padding"], d["padding_mode"], d["flip"]) == (4, "reflect", 0.5)
        assert cfg["epochs"] == 200 and cfg["batch_size"] == 128
        m = cfg["model"]
        if m["name"] == "wrn":
            assert (m["depth"], m["widen"], m["dropout"]) == (28, 10, 0.3)
        else:
            assert m["depth"] in (13, 16, 19) and m["width_multiplier"] == 1.0
            assert m["fc_layers"] == 2 and m["norm_scale"] is False  # the paper's VGG
    # the paper's numbers line up with our labels for the models the paper reports
    assert rb.PAPER_RESULTS["cifar100"]["VGG-13"] == (26.17, 25.29, 24.89)
    assert rb.PAPER_RESULTS["cifar10"]["WRN-28-10"] == (3.89, 3.85, 3.78)


def test_tiny_study_writes_both_tables_and_the_curves(tmp_path, monkeypatch):
    tiny = rb.Setting(
        datasets=("digits",),
        models={"VGG-11 x1/8": {"name": "vgg", "depth": 11, "width_multiplier": 0.125}},
        epochs=2,
        seeds=(0, 1),
        data={"train_limit": 192, "test_limit": 64},
    )
    monkeypatch.setattr(rb, "QUICK", tiny)
    monkeypatch.setitem(rb.OPTIMIZERS["SGD-G"], "probe_samples", 8)
    monkeypatch.setitem(rb.OPTIMIZERS["Adam-G"], "probe_samples", 8)
    # one torch thread, as the other tests (the runner would give a single job every core)
    path = run_study(
        "riemannian_bn", "quick", jobs=1, out=tmp_path, progress=False, overrides={"threads": 1}
    )
    text = path.read_text()
    assert "Runs: 6 (6 ended, 0 failed)" in text
    assert "| digits | VGG-11 x1/8 |" in text  # our rows
    assert "SGD-G (ours)" in text and "Adam-G (paper)" in text
    assert "The paper's numbers (Cho & Lee 2017)" in text
    assert "| CIFAR-100 | VGG-13 | 26.17 | 25.29 | 24.89 |" in text
    assert "(n=2)" in text
    assert (tmp_path / "riemannian_bn" / "curves.png").stat().st_size > 1000
    results = json.loads((tmp_path / "riemannian_bn" / "results.json").read_text())
    cell = results["ours"]["digits/VGG-11 x1/8/SGD-G"]
    assert len(cell["test_error"]) == 2 and all(0 <= e <= 100 for e in cell["test_error"])
    assert results["paper"]["cifar10"]["VGG-19"] == [6.49, 5.92, 6.02]
    # the manifold runs logged their groups: lr of both groups decayed by the schedule
    runs = tmp_path / "riemannian_bn" / "runs"
    header = (runs / "digits-VGG-11x1_8-sgdg-s0" / "metrics.csv").read_text().splitlines()[0]
    assert "lr/grassmann" in header and "wnorm/grassmann" in header


def test_paper_scale_analysis_puts_the_papers_numbers_beside_ours(tmp_path):
    from normlab.report import Report
    from normlab.studies import RunResult, RunSpec

    study = get_study("riemannian_bn")
    results = []
    for opt, errors in (
        ("SGD", (6.0, 7.0, 9.0)),
        ("SGD-G", (5.0, 6.0, 6.5)),
        ("Adam-G", (6, 6, 6)),
    ):
        for seed, err in enumerate(errors):
            rows = [
                {"epoch": e, "train_loss": 1.0 / e, "test_acc": 1.0 - err / 100.0} for e in (1, 2)
            ]
            labels = {"data": "cifar10", "model": "VGG-13", "optimizer": opt, "seed": seed}
            spec = RunSpec(f"{opt}-{seed}", {}, labels)
            results.append(RunResult(spec, tmp_path, "finished", {}, rows))
    report = Report(tmp_path, "t")
    study.analyze(results, report, "paper")
    text = report.write().read_text()
    # ours (mean ± std, median) beside the paper's CIFAR-10 VGG-13 medians
    assert (
        "| CIFAR-10 | VGG-13 | 7.33 ± 1.53 (median 7.00, n=3) | 5.83 ± 0.76 (median 6.00, n=3) "
        "| 6.00 ± 0.00 (median 6.00, n=3) | 5.88 | 5.87 | 6.05 |"
    ) in text
    assert "| cifar10 | VGG-13 | -1.50 | -1.33 |" in text  # differences to SGD
