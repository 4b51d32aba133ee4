"""``find_scale_invariant``: the per-parameter decision, step by step.

1. :func:`_gather_evidence`: probe points and Euler statistics (the first point also records
   each norm layer's eps leak, for the warnings);
2. :func:`_classify`: per parameter, unused / inert / per row / per tensor, each claim confirmed
   by an actual rescale; what is left becomes a candidate for
3. :func:`normlab.scale_invariance.joint.search_joint_sets`;
4. frozen parameters are reported without probing, and the reports assembled in model order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import explain
from .joint import search_joint_sets
from .probe import EPS_SCALE, Evidence, Probe, default_tolerance
from .results import (
    _KIND_HELP,
    FROZEN,
    INERT,
    NONE,
    ROW,
    TENSOR,
    UNUSED,
    InvarianceReport,
    ScaleInvarianceResult,
)

__all__ = ["find_scale_invariant", "probe_or_report"]


def find_scale_invariant(
    model: nn.Module,
    batch: Any,
    *,
    tol: float | None = None,
    use_fx: bool = True,
    loss_fn: Callable[[Any], Tensor] | None = None,
    joint: bool = True,
    n_points: int = 3,
    eps_scale: float = EPS_SCALE,
    seed: int = 0,
) -> ScaleInvarianceResult:
    """Find which parameters the train-mode output is invariant to scaling, and how.

    Args:
        model: any ``nn.Module``. It is not modified: the probe runs on a float64 deep copy in
            train mode (dropout off), its mode, parameters, buffers and ``.grad`` stay as they were.
        batch: model inputs only (not targets): a tensor (``model(batch)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``); a few samples suffice (BatchNorm
            needs more than one value per channel).
        tol: tolerance for Euler cosines, relative output changes and joint-set residuals;
            default :func:`default_tolerance` (1e-5; 1e-3 with ``eps_scale=1`` and eps = 1e-5).
        use_fx: also trace the model with torch.fx to explain results (``fx_path``); silently
            skipped (``result.fx_error``) when tracing fails.
        loss_fn: ``loss_fn(output) -> scalar``; probed instead of a random linear readout of the
            output (close over targets: ``lambda out: F.cross_entropy(out, y)``). The rescale
            checks then compare the loss value instead of the output.
        joint: look for jointly invariant sets among the rest (costs about one forward/backward
            per remaining parameter; needs scipy).
        n_points: probe points for the per-parameter tests (the weights themselves plus
            ``n_points - 1`` random perturbations of them); at least 2.
        eps_scale: factor on every norm layer's eps in the probe copy; the default 1e-6 probes
            structural invariance, 1.0 the model exactly as it is (see the package docstring).
        seed: seed of the readouts, perturbations and rescale factors (the global RNG is untouched).

    Returns:
        A :class:`ScaleInvarianceResult`, a mapping ``name -> InvarianceReport`` in
        ``named_parameters()`` order, with ``joint_sets``, ``tol``, ``warnings``, ``fx_error``.

    Raises:
        ValueError: bad ``tol``/``n_points``, or a batch that does not fit the model (the message
            names the innermost failing layer and its input shape).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(64, 2))
        >>> result = find_scale_invariant(net, torch.randn(8, 3, 6, 6))
        >>> result["0.weight"].kind, result["4.weight"].kind
        ('row', 'none')
    """
    _check_arguments(model, tol, n_points, eps_scale)
    probe = Probe(model, batch, loss_fn, seed, eps_scale)
    tol = default_tolerance(model, eps_scale) if tol is None else float(tol)
    paths, fx_error = explain.fx_paths(probe.model) if use_fx else ({}, None)
    evidence, notes = _gather_evidence(probe, n_points)
    for message in dict.fromkeys(notes):
        warnings.warn(message, stacklevel=2)
    reports = {name: _classify(evidence, name, tol, paths.get(name)) for name in probe.base}
    candidates = [name for name, info in reports.items() if "kind" not in info]
    joint_sets: list[tuple[str, ...]] = []
    if joint and len(candidates) >= 2:
        joint_sets = search_joint_sets(evidence, candidates, tol, reports, notes)
    for name in probe.frozen:
        reports[name] = _frozen_report(probe, name, paths.get(name))
    for info in reports.values():
        info.setdefault("kind", NONE)
    order = [n for n, _ in model.named_parameters()]
    return ScaleInvarianceResult(
        reports={n: InvarianceReport(**reports[n]) for n in order if n in reports},
        tol=tol,
        joint_sets=joint_sets,
        warnings=list(dict.fromkeys(notes)),
        fx_error=fx_error,
        n_points=len(evidence.points),
    )


def _check_arguments(model: Any, tol: float | None, n_points: int, eps_scale: float) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if tol is not None and not 0.0 < tol < 1.0:
        raise ValueError(f"Invalid tol: {tol} (expected 0 < tol < 1)")
    if n_points < 2:
        raise ValueError(f"Invalid n_points: {n_points} (expected >= 2)")
    if not eps_scale > 0.0:
        raise ValueError(f"Invalid eps_scale: {eps_scale} (expected > 0)")


def _gather_evidence(probe: Probe, n_points: int) -> tuple[Evidence, list[str]]:
    """Statistics at the model's own weights (with the eps-leak hooks), then at ``n_points - 1``
    generic perturbations; the references of the confirming rescale; the leak warnings."""
    evidence = Evidence(probe, n_points, points=[dict(probe.base)])
    leaks, remove_hooks = explain.norm_input_leaks(probe.model, probe.model_eps)
    try:
        evidence.stats = probe.point_stats(evidence.points[0])
    finally:
        remove_hooks()
    notes = explain.leak_notes(leaks)
    while len(evidence.points) < n_points:
        evidence.add_point()
    evidence.references = [probe.value(evidence.points[k]) for k in (0, 1)]
    return evidence, notes


def _classify(evidence: Evidence, name: str, tol: float, fx_path: str | None) -> dict[str, Any]:
    """The report fields of one trainable parameter; no ``"kind"`` means "a joint candidate".

    In order: unused (no gradient), inert (zero gradient and neither a rescale nor a random
    change moves the output), per row, per tensor; a passed Euler test counts only once an
    actual rescale confirms it.
    """
    probe = evidence.probe
    w = probe.base[name]
    _, n_rows, row_dim = probe.rows[name]
    info: dict[str, Any] = {"name": name, "shape": tuple(w.shape), "row_dim": row_dim}
    info["fx_path"] = fx_path
    if name in evidence.stats[0].missing:
        info.update(kind=UNUSED, note="no gradient: the forward pass does not use it")
        return info
    info["row_cos"] = evidence.max_cos(name, per_row=True)
    info["tensor_cos"] = evidence.max_cos(name, per_row=False)
    first = evidence.stats[: evidence.n_points]
    if all(s.m[name] <= evidence.zero_floor(s) for s in first):
        return _classify_zero_gradient(evidence, info, n_rows, tol)
    if info["row_cos"] <= tol:
        change = evidence.confirm([name], probe.row_factors(n_rows))
        if change <= tol:
            info.update(kind=ROW, rescale_change=change)
            return info
        info["note"] = f"Euler test passed, but a per-row rescale moved the output by {change:.1e}"
    if info["tensor_cos"] <= tol:
        change = evidence.confirm([name])
        if change <= tol:
            info.update(kind=TENSOR, rescale_change=change)
            if not info.get("note"):
                info["note"] = f"rows alone are not invariant (row |cos| {info['row_cos']:.1e})"
            return info
        info["note"] = f"Euler test passed, but rescaling by 2.7 moved the output by {change:.1e}"
    if info["fx_path"] and not info.get("note"):
        info["note"] = "fx path reaches a norm, but the probe finds no invariance"
    return info


def _classify_zero_gradient(
    evidence: Evidence, info: dict[str, Any], n_rows: int, tol: float
) -> dict[str, Any]:
    """Zero gradient everywhere we looked: inert if neither rescaling nor a random change of the
    values moves the output (a flat region is not invariance), else a joint candidate."""
    name = info["name"]
    change = evidence.confirm([name], evidence.probe.row_factors(n_rows))
    moved = dict(evidence.points[0])
    moved[name] = evidence.points[1][name]  # an unrelated generic value of this parameter
    change = max(change, evidence.probe.relative_change(evidence.references[0], moved))
    if change <= tol:
        info.update(kind=INERT, rescale_change=change, note=_KIND_HELP[INERT])
    else:
        info["note"] = f"zero gradient, but changing it moves the output by {change:.1e}"
    return info


def _frozen_report(probe: Probe, name: str, fx_path: str | None) -> dict[str, Any]:
    w = dict(probe.model.named_parameters())[name]
    return {
        "name": name,
        "shape": tuple(w.shape),
        "kind": FROZEN,
        "note": _KIND_HELP[FROZEN],
        "fx_path": fx_path,
    }


def probe_or_report(
    model: nn.Module,
    batch: Any,
    report: ScaleInvarianceResult | None,
    loss_fn: Callable[[Any], Tensor] | None,
    joint: bool,
) -> ScaleInvarianceResult:
    """``report`` if given (it must cover every parameter of ``model``), else a fresh probe.

    The shared entry of the parameter-group builders (SGD-G's, the sphere's): they accept either
    a probe batch or a precomputed :class:`ScaleInvarianceResult`.
    """
    if report is not None:
        missing = [n for n, _ in model.named_parameters() if n not in report]
        if missing:
            raise ValueError(f"Invalid report: it does not cover parameter '{missing[0]}'")
        return report
    if batch is None:
        raise ValueError("Invalid batch: None (pass a probe batch or a precomputed report=)")
    return find_scale_invariant(model, batch, loss_fn=loss_fn, joint=joint)
