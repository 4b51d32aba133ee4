"""The sphere_regimes study: its grid, its analysis on synthetic curves, and a tiny real run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab.config import resolve
from normlab.errors import UserError
from normlab.methods.sphere import study as sr
from normlab.regimes import CHAOTIC_EQUILIBRIUM, CONVERGENCE, DIVERGENCE
from normlab.report import Report
from normlab.studies import RunResult, RunSpec, get_study, run_study


def test_quick_grid_is_log_spaced_over_all_three_regimes():
    specs = get_study("sphere_regimes").runs("quick")
    fixed = [s for s in specs if s.labels["kind"] == "fixed_elr"]
    elrs = [s.labels["elr"] for s in fixed]
    assert elrs == sorted(elrs) and len(elrs) >= 7
    ratios = np.diff(np.log10(elrs))
    assert np.allclose(ratios, ratios[0], atol=1e-4)  # log-spaced
    # the notes' SI-MLP/mnist1d boundaries (~1e-3 and ~1e-1) lie inside the grid, with room
    assert elrs[0] <= 1e-4 and elrs[-1] >= 1.0
    for spec in specs:
        cfg = resolve(spec.config)  # every run config is valid
        assert cfg["model"]["name"] == "mlp_si" and cfg["data"]["name"] == "mnist1d"
        assert cfg["sphere_metrics"]["every"] == 1 and cfg["batch_size"] == 128
        if spec.labels["kind"] == "fixed_elr":
            assert cfg["optim"]["name"] == "sphere" and cfg["optim"]["momentum"] == 0.0
            assert cfg["optim"]["elr"] == spec.labels["elr"] and cfg["optim"]["lr_other"] == 0.0
        else:
            assert cfg["optim"]["name"] == "sgd" and cfg["optim"]["weight_decay"] > 0
    assert len({s.name for s in specs}) == len(specs)
    assert sum(s.labels["kind"] == "fix_lr" for s in specs) >= 2


def test_paper_grid_is_the_papers_setting():
    study = get_study("sphere_regimes")
    with pytest.raises(UserError, match="data.root"):
        study.runs("paper")
    specs = study.runs("paper", "/data/cifar")
    fixed = [s for s in specs if s.labels["kind"] == "fixed_elr"]
    assert [s.labels["elr"] for s in fixed] == [1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 5e-2, 1e-1]
    for spec in specs:
        cfg = resolve(spec.config)
        assert cfg["data"]["name"] == "cifar10" and cfg["data"]["root"] == "/data/cifar"
        assert cfg["data"]["crop_padding"] == 0 and cfg["data"]["flip"] == 0.0  # no augmentation
        assert cfg["model"] == {**cfg["model"], "name": "convnet_si", "c": 32}
        assert cfg["epochs"] == 1000 and cfg["batch_size"] == 128 and cfg["checkpoint"]


@pytest.mark.parametrize(
    "labels,expected",
    [
        ([CONVERGENCE, CONVERGENCE, CHAOTIC_EQUILIBRIUM, DIVERGENCE], True),
        ([CONVERGENCE, DIVERGENCE, DIVERGENCE, DIVERGENCE], True),
        ([CONVERGENCE, CHAOTIC_EQUILIBRIUM, CONVERGENCE, DIVERGENCE], False),
        ([DIVERGENCE, CHAOTIC_EQUILIBRIUM, CONVERGENCE, CONVERGENCE], False),
    ],
)
def test_regime_order_check_on_synthetic_labels(labels, expected):
    elrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert sr.regimes_in_order(elrs, labels) is expected
    # the check sorts by ELR: the input order does not matter
    order = [2, 0, 3, 1]
    assert sr.regimes_in_order([elrs[i] for i in order], [labels[i] for i in order]) is expected


def test_regime_order_check_rejects_mismatched_input():
    with pytest.raises(ValueError, match="one label per ELR"):
        sr.regimes_in_order([1e-3, 1e-2], [CONVERGENCE])


def test_predicted_regime_reads_the_sweep():
    sweep = [(1e-3, CONVERGENCE), (1e-2, CHAOTIC_EQUILIBRIUM), (1e-1, DIVERGENCE)]
    assert sr.predicted_regime(1e-2, sweep) == "2"
    assert sr.predicted_regime(3e-3, sweep) == "1-2 boundary"
    assert sr.predicted_regime(1e-4, sweep) == "1 (below grid)"
    assert sr.predicted_regime(5.0, sweep) == "3 (above grid)"
    assert sr.predicted_regime(math.nan, sweep) == "-"


def _synthetic_rows(regime: str, epochs: int = 60, seed: int = 0) -> list[dict]:
    """Per-epoch metrics rows with the signature of one regime (see normlab.regimes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(1, epochs + 1):
        if regime == CONVERGENCE:
            loss, acc, grad, angle = 2.0 * t**-1.0, min(1.0, 0.5 + t / epochs), 50 / t, 1e-3 / t
        elif regime == CHAOTIC_EQUILIBRIUM:
            loss = 0.8 * math.exp(0.2 * rng.standard_normal())
            acc, grad, angle = 0.7 + 0.02 * rng.standard_normal(), 20.0, 0.15
        else:
            loss, acc, grad, angle = 5.5 + 0.2 * rng.standard_normal(), 0.1, 1e4, 1.57
        rows.append(
            {
                "epoch": t,
                "train_loss": loss,
                "train_acc": acc,
                "full_train_loss": loss,
                "full_train_acc": acc,
                "test_acc": acc * 0.8,
                "effective_grad_norm": grad,
                "step_angle": angle,
                "elr": 1e-3,
                "si_norm": 10.0,
            }
        )
    return rows


def _result(name: str, labels: dict, rows: list[dict], tmp_path) -> RunResult:
    return RunResult(RunSpec(name, {}, labels), tmp_path / name, "finished", {}, rows)


def test_analysis_of_synthetic_runs_finds_the_boundaries(tmp_path):
    truth = {
        1e-4: CONVERGENCE,
        1e-3: CONVERGENCE,
        1e-2: CHAOTIC_EQUILIBRIUM,
        1e-1: DIVERGENCE,
        1.0: DIVERGENCE,
    }
    results = [
        _result(f"elr={e:g}", {"kind": "fixed_elr", "elr": e}, _synthetic_rows(r, seed=i), tmp_path)
        for i, (e, r) in enumerate(truth.items())
    ]
    conventional_rows = _synthetic_rows(CHAOTIC_EQUILIBRIUM, seed=9)
    for i, row in enumerate(conventional_rows):
        row["elr"] = 4e-3 + 1e-4 * i  # drifting up to 9.9e-3
    results.append(
        _result("sgd", {"kind": "fix_lr", "lr": 1.0, "wd": 0.01}, conventional_rows, tmp_path)
    )
    report = Report(tmp_path / "out", "synthetic")
    get_study("sphere_regimes").analyze(results, report, "quick")
    text = report.write().read_text()
    found = {d["elr"]: d["regime"] for d in report.data["regimes"]}
    assert found == truth
    assert report.data["boundaries"]["found"]["1->2"] == (1e-3, 1e-2)
    assert report.data["boundaries"]["found"]["2->3"] == (1e-2, 1e-1)
    assert report.data["boundaries"]["in_order"] and report.data["boundaries"]["all_three_found"]
    assert "| 0.001 | 0.01 |" not in text  # intervals are written as (lo, hi)
    assert "(0.001, 0.01)" in text and "(0.01, 0.1)" in text and "(5.00e-04, 0.001)" in text
    assert "in the expected ELR order: yes" in text
    assert "| 1 | 0.01 |" in text and "1-2 boundary" in text  # the conventional run's row
    for png in ("curves.png", "diagram.png", "final.png", "conventional.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_tiny_study_writes_the_regime_table_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "QUICK_ELRS", [1e-3, 3e-2, 1.0])
    monkeypatch.setattr(sr, "QUICK_EPOCHS", 20)
    monkeypatch.setattr(sr, "QUICK_TRAIN_LIMIT", 256)
    monkeypatch.setattr(sr, "QUICK_CONVENTIONAL", [(1.0, 0.1)])
    path = run_study("sphere_regimes", "quick", jobs=1, out=tmp_path, progress=False)
    text = path.read_text()
    assert "## Regime of each ELR" in text and "| ELR | regime |" in text
    assert "1 -> 2 (convergence -> equilibrium)" in text
    assert "Runs: 4 (4 ended, 0 failed)" in text
    folder = tmp_path / "sphere_regimes"
    for png in ("curves.png", "diagram.png", "final.png", "conventional.png"):
        assert (folder / png).stat().st_size > 1000
    data = json.loads((folder / "results.json").read_text())
    labels = {d["elr"]: d["regime"] for d in data["regimes"]}
    assert labels[1e-3] == CONVERGENCE and labels[1.0] == DIVERGENCE
    conventional = data["conventional"][0]
    assert len(conventional["elr"]) == 20 and conventional["elr"][-1] > conventional["elr"][0]
