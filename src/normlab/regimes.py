"""Which of the three regimes of fixed-ELR sphere training a run is in, from its per-epoch curves.

Kodryan et al. (2022) find that training a scale-invariant network on the sphere with a fixed
effective learning rate (ELR) ends in one of three regimes:

1. ``"convergence"`` (small ELR): the train loss keeps falling, roughly as a power law of the epoch;
   the effective gradient norm and the per-step angle fall with it.
2. ``"chaotic_equilibrium"`` (medium ELR): the train loss settles on a noisy plateau whose level
   rises with the ELR; effective gradient norm and step angle are stationary.
3. ``"divergence"`` (large ELR): train accuracy at chance level, the loss at the plateau set by the
   fixed head's logit scale (well above ``ln C`` with a norm-10 head); the effective gradient norm
   jumps by orders of magnitude and successive iterates are nearly orthogonal (angle ~ pi/2).

The rule (thresholds in :class:`RegimeCriteria`; defaults from the normlab reproduction notes, where
they separated every MLP/MNIST-1D and digits run of an ELR grid 1e-5 ... 10):

* divergence  if the mean train accuracy over the last ``tail_fraction`` of the epochs is below
  ``chance + chance_margin`` (chance = 1 / num_classes), or the loss is not finite;
* convergence if the least-squares slope of ``log(loss)`` against ``log(epoch)`` over the last
  ``fit_fraction`` of the epochs is below ``convergence_slope`` (-0.25), or the tail loss is below
  ``loss_floor`` (1e-3);
* chaotic equilibrium otherwise (a loss that is neither at chance nor decaying: stationary).

The angle and the effective gradient norm are not needed for the label; when given they are checked
for consistency (angle near pi/2 iff divergence, angle not still shrinking in equilibrium) and any
disagreement marks the result ``low_confidence``. So do: too few epochs, values within a margin of a
threshold, and a loss whose decay slows down in the last quarter (a regime-1 call on a short
horizon near the 1/2 boundary can turn into a plateau later: the notes saw this at ELR 1e-3).

Regime boundaries depend on the architecture and the parameter count; nothing here hard-codes ELR
values.

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

CONVERGENCE = "convergence"
CHAOTIC_EQUILIBRIUM = "chaotic_equilibrium"
DIVERGENCE = "divergence"
REGIMES = (CONVERGENCE, CHAOTIC_EQUILIBRIUM, DIVERGENCE)

__all__ = [
    "CONVERGENCE",
    "CHAOTIC_EQUILIBRIUM",
    "DIVERGENCE",
    "REGIMES",
    "RegimeCriteria",
    "RegimeClassification",
    "RegimeBoundary",
    "classify_regime",
    "find_boundaries",
    "log_log_slope",
]


@dataclass(frozen=True)
class RegimeCriteria:
    """Thresholds of :func:`classify_regime` (fractions refer to the number of epochs)."""

    tail_fraction: float = 0.1  # window of the "end" values (mean over the last 10 % of epochs)
    fit_fraction: float = 0.5  # window of the log-log loss slope (the second half)
    chance_margin: float = 0.1  # divergence: tail train accuracy < 1/num_classes + this
    convergence_slope: float = -0.25  # convergence: log-log loss slope below this
    loss_floor: float = 1e-3  # convergence: tail loss below this
    divergence_angle: float = 1.2  # radians; steps of a diverged run are ~pi/2 = 1.571
    min_epochs: int = 20  # fewer epochs -> low confidence
    slope_margin: float = 0.1  # |slope - convergence_slope| below this -> boundary
    accuracy_margin: float = 0.05  # |acc - (chance + chance_margin)| below this -> boundary

    def __post_init__(self):
        for name in ("tail_fraction", "fit_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Invalid {name}: {value} (must be in (0, 1])")
        for name in ("chance_margin", "loss_floor", "slope_margin", "accuracy_margin"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
        if not 0.0 < self.divergence_angle <= math.pi:
            raise ValueError(f"Invalid divergence_angle: {self.divergence_angle}")
        if self.min_epochs < 3:
            raise ValueError(f"Invalid min_epochs: {self.min_epochs} (must be >= 3)")


@dataclass
class RegimeClassification:
    """A regime label with the numbers behind it.

    ``evidence`` holds the tail means, slopes and thresholds used (NaN where a curve was not given);
    ``low_confidence`` is set when the run sits near a boundary or the evidence disagrees, and
    ``reasons`` says why.
    """

    label: str
    evidence: dict[str, float]
    low_confidence: bool = False
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RegimeBoundary:
    """A change of regime between two neighbouring ELRs of a sweep.

    ``unanimous`` is False when the runs (seeds) at either ELR did not all get the same label; the
    label of an ELR is then its most common one.
    """

    low_elr: float
    high_elr: float
    low_label: str
    high_label: str
    unanimous: bool = True


def _curve(name: str, values, epochs: int | None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if epochs is not None and array.size != epochs:
        raise ValueError(f"{name} has {array.size} epochs, train_loss has {epochs}")
    return array


def _window(size: int, fraction: float, minimum: int) -> slice:
    count = max(minimum, int(math.ceil(fraction * size)))
    return slice(max(0, size - count), size)


def log_log_slope(values: Sequence[float], start: int = 0) -> float:
    """Least-squares slope of ``log(values[i])`` against ``log(start + i + 1)`` (epoch numbers).

    Non-positive values are clipped to 1e-300 (a loss of exactly 0 counts as tiny). NaN when fewer
    than 2 points.
    """
    y = np.log(np.clip(np.asarray(values, dtype=np.float64), 1e-300, None))
    if y.size < 2:
        return math.nan
    x = np.log(np.arange(start + 1, start + 1 + y.size, dtype=np.float64))
    x -= x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def classify_regime(
    train_loss: Sequence[float],
    train_accuracy: Sequence[float],
    num_classes: int,
    effective_grad_norm: Sequence[float] | None = None,
    step_angle: Sequence[float] | None = None,
    criteria: RegimeCriteria | None = None,
) -> RegimeClassification:
    """Label one run ``"convergence"``, ``"chaotic_equilibrium"`` or ``"divergence"``.

    Args:
        train_loss: per-epoch train loss (epoch 1 first).
        train_accuracy: per-epoch train accuracy as a fraction in [0, 1].
        num_classes: the number of classes (chance accuracy is ``1 / num_classes``).
        effective_grad_norm: optional per-epoch mean of ``|g| |w|``.
        step_angle: optional per-epoch mean angle (radians) between consecutive iterates.
        criteria: thresholds; the defaults are documented in :class:`RegimeCriteria`.

    Returns:
        a :class:`RegimeClassification`; see the module docstring for the rule.
    """
    criteria = criteria or RegimeCriteria()
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes} (must be an integer >= 2)")
    loss = _curve("train_loss", train_loss, None)
    epochs = loss.size
    if epochs < 2:
        raise ValueError(f"need at least 2 epochs of curves, got {epochs}")
    accuracy = _curve("train_accuracy", train_accuracy, epochs)
    finite_acc = accuracy[np.isfinite(accuracy)]
    if finite_acc.size and (finite_acc.min() < 0.0 or finite_acc.max() > 1.0):
        raise ValueError("train_accuracy must be fractions in [0, 1] (not percentages)")
    grad = (
        None
        if effective_grad_norm is None
        else _curve("effective_grad_norm", effective_grad_norm, epochs)
    )
    angle = None if step_angle is None else _curve("step_angle", step_angle, epochs)

    tail = _window(epochs, criteria.tail_fraction, 1)
    fit = _window(epochs, criteria.fit_fraction, 2)
    late = _window(epochs, criteria.fit_fraction / 2, 2)
    chance = 1.0 / num_classes
    accuracy_threshold = chance + criteria.chance_margin

    evidence: dict[str, float] = {
        "epochs": float(epochs),
        "chance_accuracy": chance,
        "accuracy_threshold": accuracy_threshold,
        "train_accuracy_tail": float(np.mean(accuracy[tail])),
        "train_loss_tail": float(np.mean(loss[tail])),
        "loss_slope": log_log_slope(loss[fit], fit.start),
        "loss_slope_late": log_log_slope(loss[late], late.start),
        "convergence_slope": criteria.convergence_slope,
        "loss_floor": criteria.loss_floor,
        # relative spread of the loss around its log-log trend in the fit window: the "noise"
        "loss_noise": math.nan,
        "step_angle_tail": math.nan,
        "step_angle_slope": math.nan,
        "effective_grad_norm_tail": math.nan,
        "effective_grad_norm_growth": math.nan,
    }
    fit_loss = loss[fit]
    if np.all(np.isfinite(fit_loss)) and np.all(fit_loss > 0):
        y = np.log(fit_loss)
        x = np.log(np.arange(fit.start + 1, epochs + 1, dtype=np.float64))
        residual = y - np.polyval(np.polyfit(x, y, 1), x)
        evidence["loss_noise"] = float(np.std(residual))
    if angle is not None:
        evidence["step_angle_tail"] = float(np.mean(angle[tail]))
        evidence["step_angle_slope"] = log_log_slope(angle[fit], fit.start)
    if grad is not None:
        evidence["effective_grad_norm_tail"] = float(np.mean(grad[tail]))
        if grad[0] > 0:
            evidence["effective_grad_norm_growth"] = evidence["effective_grad_norm_tail"] / grad[0]

    reasons: list[str] = []
    low = False
    if epochs < criteria.min_epochs:
        low = True
        reasons.append(f"only {epochs} epochs (< {criteria.min_epochs}): too short to tell")

    acc_tail = evidence["train_accuracy_tail"]
    loss_tail = evidence["train_loss_tail"]
    slope = evidence["loss_slope"]
    late_slope = evidence["loss_slope_late"]
    angle_tail = evidence["step_angle_tail"]

    if not np.all(np.isfinite(loss[tail])):
        return RegimeClassification(DIVERGENCE, evidence, True, reasons + ["non-finite train loss"])

    if acc_tail < accuracy_threshold:
        label = DIVERGENCE
        reasons.append(f"train accuracy {acc_tail:.3f} < chance + margin {accuracy_threshold:.3f}")
        if not math.isnan(angle_tail) and angle_tail < criteria.divergence_angle:
            low = True
            reasons.append(
                f"but the step angle {angle_tail:.3f} rad is not near pi/2 "
                f"(< {criteria.divergence_angle})"
            )
    elif slope < criteria.convergence_slope or loss_tail < criteria.loss_floor:
        label = CONVERGENCE
        if loss_tail < criteria.loss_floor:
            reasons.append(f"train loss {loss_tail:.2e} < floor {criteria.loss_floor:.0e}")
        else:
            reasons.append(f"log-log loss slope {slope:.3f} < {criteria.convergence_slope}")
            if late_slope >= criteria.convergence_slope:
                low = True
                reasons.append(
                    f"but the decay slows down: slope over the last quarter {late_slope:.3f}"
                )
    else:
        label = CHAOTIC_EQUILIBRIUM
        reasons.append(
            f"accuracy above chance and loss not decaying (log-log slope {slope:.3f} >= "
            f"{criteria.convergence_slope})"
        )
        if slope > -criteria.convergence_slope:
            low = True
            reasons.append(f"but the loss is rising (slope {slope:.3f}): not stationary")
        angle_slope = evidence["step_angle_slope"]
        if not math.isnan(angle_slope) and angle_slope < criteria.convergence_slope:
            low = True
            reasons.append(f"but the step angle is still shrinking (slope {angle_slope:.3f})")

    if (
        label != DIVERGENCE
        and not math.isnan(angle_tail)
        and angle_tail >= criteria.divergence_angle
    ):
        low = True
        reasons.append(f"step angle {angle_tail:.3f} rad is near pi/2, as in divergence")
    if abs(acc_tail - accuracy_threshold) < criteria.accuracy_margin:
        low = True
        reasons.append("train accuracy within the boundary margin of the divergence threshold")
    if (
        label != DIVERGENCE
        and loss_tail >= criteria.loss_floor
        and abs(slope - criteria.convergence_slope) < criteria.slope_margin
    ):
        low = True
        reasons.append("loss slope within the boundary margin of the convergence threshold")
    return RegimeClassification(label, evidence, low, reasons)


def find_boundaries(elrs: Sequence[float], labels: Sequence[str]) -> list[RegimeBoundary]:
    """The ELR intervals of a sweep where the regime changes.

    Runs are grouped by ELR (several seeds may share one); each ELR takes its most common label
    (ties go to the lower regime in the order convergence < equilibrium < divergence), and every
    pair of neighbouring ELRs with different labels gives one :class:`RegimeBoundary`. A
    non-monotone sweep gives more than two boundaries; they are all reported.
    """
    if len(elrs) != len(labels):
        raise ValueError(f"need one label per ELR, got {len(elrs)} ELRs and {len(labels)} labels")
    by_elr: dict[float, list[str]] = {}
    for elr, label in zip(elrs, labels):
        elr = float(elr)
        if not elr > 0 or not math.isfinite(elr):
            raise ValueError(f"Invalid ELR: {elr} (must be finite and > 0)")
        if label not in REGIMES:
            raise ValueError(f"Invalid label: {label!r} (valid: {', '.join(REGIMES)})")
        by_elr.setdefault(elr, []).append(label)
    order = sorted(by_elr)
    summary = []
    for elr in order:
        counts = Counter(by_elr[elr])
        best = max(counts.values())
        label = next(r for r in REGIMES if counts.get(r, 0) == best)
        summary.append((elr, label, len(counts) == 1))
    boundaries = []
    for (lo, lo_label, lo_one), (hi, hi_label, hi_one) in zip(summary, summary[1:]):
        if lo_label != hi_label:
            boundaries.append(RegimeBoundary(lo, hi, lo_label, hi_label, lo_one and hi_one))
    return boundaries
