"""Regime classifier on synthetic curves of each regime, edge cases and boundary finding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normlab.regimes import (
    CHAOTIC_EQUILIBRIUM,
    CONVERGENCE,
    DIVERGENCE,
    RegimeBoundary,
    RegimeCriteria,
    classify_regime,
    find_boundaries,
    log_log_slope,
)

EPOCHS = 200


def _convergence(seed: int, epochs: int = EPOCHS, exponent: float = 0.9):
    """Power-law decaying loss with multiplicative noise; accuracy -> 1; angle and G_eff fall."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, epochs + 1)
    loss = 2.0 * t**-exponent * np.exp(0.1 * rng.standard_normal(epochs))
    acc = np.clip(1.0 - 0.5 * t**-0.7 + 0.005 * rng.standard_normal(epochs), 0, 1)
    angle = 0.02 * t**-0.6
    g_eff = 50.0 * t**-0.5
    return loss, acc, g_eff, angle


def _equilibrium(seed: int, epochs: int = EPOCHS):
    """Fast initial drop, then a stationary noisy plateau; angle and G_eff stationary."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, epochs + 1)
    loss = 0.5 + 2.0 * np.exp(-t / 5.0) + 0.08 * rng.standard_normal(epochs)
    acc = np.clip(0.85 - 0.5 * np.exp(-t / 5.0) + 0.02 * rng.standard_normal(epochs), 0, 1)
    angle = 0.07 * np.exp(0.1 * rng.standard_normal(epochs))
    g_eff = 25.0 * np.exp(0.1 * rng.standard_normal(epochs))
    return loss, acc, g_eff, angle


def _divergence(seed: int, epochs: int = EPOCHS):
    """Chance accuracy, loss at the divergent plateau of a norm-10 head, angle ~ pi/2."""
    rng = np.random.default_rng(seed)
    loss = 5.5 + 0.2 * rng.standard_normal(epochs)
    acc = 0.1 + 0.01 * rng.standard_normal(epochs)
    angle = 1.55 + 0.01 * rng.standard_normal(epochs)
    g_eff = np.full(epochs, 1e4) * np.exp(0.3 * rng.standard_normal(epochs))
    g_eff[0] = 600.0
    return loss, acc, g_eff, angle


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "make,label",
    [(_convergence, CONVERGENCE), (_equilibrium, CHAOTIC_EQUILIBRIUM), (_divergence, DIVERGENCE)],
)
def test_synthetic_curves_of_each_regime(make, label, seed):
    loss, acc, g_eff, angle = make(seed)
    result = classify_regime(loss, acc, 10, effective_grad_norm=g_eff, step_angle=angle)
    assert result.label == label, result.reasons
    assert not result.low_confidence, result.reasons
    # the curves alone (no angle, no G_eff) give the same label
    assert classify_regime(loss, acc, 10).label == label


def test_evidence_holds_the_numbers_used():
    loss, acc, g_eff, angle = _convergence(0, exponent=0.8)
    result = classify_regime(loss, acc, 10, g_eff, angle)
    ev = result.evidence
    assert ev["epochs"] == EPOCHS
    assert ev["chance_accuracy"] == pytest.approx(0.1)
    assert ev["accuracy_threshold"] == pytest.approx(0.2)
    assert ev["loss_slope"] == pytest.approx(-0.8, abs=0.1)
    assert ev["step_angle_slope"] == pytest.approx(-0.6, abs=1e-9)
    assert ev["train_loss_tail"] == pytest.approx(np.mean(loss[-20:]))
    loss, acc, g_eff, angle = _divergence(0)
    div = classify_regime(loss, acc, 10, g_eff, angle).evidence
    assert div["effective_grad_norm_growth"] > 10
    assert div["step_angle_tail"] == pytest.approx(1.55, abs=0.01)


def test_log_log_slope_is_exact_for_a_power_law():
    t = np.arange(11, 101)
    assert log_log_slope(2.5 * t**-0.7, start=10) == pytest.approx(-0.7, rel=1e-12)
    assert math.isnan(log_log_slope([1.0]))


def test_too_few_epochs_is_flagged():
    loss, acc, g_eff, angle = _convergence(0, epochs=10)
    result = classify_regime(loss, acc, 10, g_eff, angle)
    assert result.low_confidence
    assert any("epochs" in r for r in result.reasons)


def test_loss_below_the_floor_is_convergence_even_when_flat():
    loss = np.full(100, 1e-5)
    result = classify_regime(loss, np.ones(100), 10)
    assert result.label == CONVERGENCE and not result.low_confidence


def test_decay_that_stalls_late_is_flagged():
    """Power law for most of the run, then a plateau in the last quarter (the ELR 1e-3 trap)."""
    t = np.arange(1, 201)
    loss = np.where(t <= 160, 2.0 * t**-1.0, 2.0 / 160)
    result = classify_regime(loss, np.full(200, 0.99), 10)
    assert result.label == CONVERGENCE
    assert result.low_confidence
    assert any("slows down" in r for r in result.reasons)


def test_near_chance_accuracy_with_small_angle_is_low_confidence():
    loss, acc, _, _ = _divergence(0)
    result = classify_regime(loss, acc, 10, step_angle=np.full(EPOCHS, 0.3))
    assert result.label == DIVERGENCE and result.low_confidence


def test_accuracy_near_the_threshold_is_a_boundary():
    loss, _, _, _ = _equilibrium(0)
    result = classify_regime(loss, np.full(EPOCHS, 0.22), 10)
    assert result.label == CHAOTIC_EQUILIBRIUM and result.low_confidence


def test_rising_loss_is_not_stationary():
    t = np.arange(1, 101)
    result = classify_regime(0.1 * t**0.6, np.full(100, 0.6), 10)
    assert result.label == CHAOTIC_EQUILIBRIUM and result.low_confidence


def test_non_finite_loss_is_divergence():
    loss = np.full(50, 2.0)
    loss[-3:] = np.nan
    result = classify_regime(loss, np.full(50, 0.5), 10)
    assert result.label == DIVERGENCE and result.low_confidence


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(train_loss=[1.0, 0.5], train_accuracy=[0.5, 60.0], num_classes=10), "fractions"),
        (dict(train_loss=[1.0, 0.5], train_accuracy=[0.5], num_classes=10), "epochs"),
        (dict(train_loss=[1.0, 0.5], train_accuracy=[0.5, 0.6], num_classes=1), "num_classes"),
        (dict(train_loss=[1.0], train_accuracy=[0.5], num_classes=10), "at least 2"),
        (
            dict(train_loss=[1.0, 0.5], train_accuracy=[0.5, 0.6], num_classes=10, step_angle=[1]),
            "step_angle",
        ),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        classify_regime(**kwargs)


def test_bad_criteria_raise():
    with pytest.raises(ValueError, match="Invalid tail_fraction"):
        RegimeCriteria(tail_fraction=0.0)
    with pytest.raises(ValueError, match="Invalid min_epochs"):
        RegimeCriteria(min_epochs=1)
    with pytest.raises(ValueError, match="Invalid divergence_angle"):
        RegimeCriteria(divergence_angle=4.0)


def test_find_boundaries_of_a_sweep():
    elrs = [1e-1, 1e-5, 1e-3, 1e-4, 1.0, 1e-2]  # unsorted on purpose
    labels = [DIVERGENCE, CONVERGENCE, CHAOTIC_EQUILIBRIUM, CONVERGENCE, DIVERGENCE]
    labels.append(CHAOTIC_EQUILIBRIUM)
    assert find_boundaries(elrs, labels) == [
        RegimeBoundary(1e-4, 1e-3, CONVERGENCE, CHAOTIC_EQUILIBRIUM, True),
        RegimeBoundary(1e-2, 1e-1, CHAOTIC_EQUILIBRIUM, DIVERGENCE, True),
    ]


def test_find_boundaries_with_seeds_that_disagree():
    elrs = [1e-4, 1e-4, 1e-3, 1e-3, 1e-3, 1e-2]
    labels = [CONVERGENCE, CONVERGENCE, CONVERGENCE, CHAOTIC_EQUILIBRIUM]
    labels += [CHAOTIC_EQUILIBRIUM, CHAOTIC_EQUILIBRIUM]
    (boundary,) = find_boundaries(elrs, labels)
    assert (boundary.low_elr, boundary.high_elr) == (1e-4, 1e-3)
    assert boundary.high_label == CHAOTIC_EQUILIBRIUM and not boundary.unanimous
    assert find_boundaries([1e-3, 1e-2], [CONVERGENCE, CONVERGENCE]) == []


def test_find_boundaries_errors():
    with pytest.raises(ValueError, match="one label per ELR"):
        find_boundaries([1e-3], [])
    with pytest.raises(ValueError, match="Invalid label"):
        find_boundaries([1e-3], ["chaos"])
    with pytest.raises(ValueError, match="Invalid ELR"):
        find_boundaries([0.0], [CONVERGENCE])
