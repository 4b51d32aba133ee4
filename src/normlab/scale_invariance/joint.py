"""Jointly scale-invariant sets: parameters invariant only when scaled together.

With e_kj = <g_j, w_j> and m_kj = ||g_j|| ||w_j|| at K probe rows (point x readout, K > number
of candidates), a set S is jointly scale-invariant iff |sum_{j in S} e_kj| <= tol sum_{j in S}
m_kj at every k (Euler's identity for the common factor). Minimal sets are vertices of the
linear program

    min sum_j cost_j x_j   s.t.  x_seed = 1,  0 <= x <= 1,  |E_k x| <= tol M_k x

(scipy's HiGHS); weight matrices cost less than 1-D parameters so that sets are made of weights
where possible. Each set is confirmed by rescaling it by 2.7, then by a common per-row rescale
when its members share a channel count (``joint_granularity="row"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .probe import Evidence, PointStats, max_cos
from .results import JOINT, ROW, TENSOR

__all__ = ["find_joint_sets", "search_joint_sets"]

# Euler rows (point x readout) beyond the number of joint candidates: with more constraints than
# unknowns only true symmetries survive in the linear program.
_JOINT_MARGIN = 4
# Readouts per extra point of the joint search (one forward, several backward passes); rows from
# different points keep accidental null vectors of a single point's Jacobian out.
_READOUTS_PER_POINT = 4
# Linear-program costs: prefer sets of weight matrices over biases and norm affine parameters.
_COST_WEIGHT, _COST_VECTOR = 1.0, 4.0


def search_joint_sets(
    evidence: Evidence,
    candidates: list[str],
    tol: float,
    reports: dict[str, dict[str, Any]],
    notes: list[str],
) -> list[tuple[str, ...]]:
    """The joint sets among ``candidates``; their members' ``reports`` become ``"joint"``.

    Adds probe points until there are ``_JOINT_MARGIN`` more Euler rows than candidates, solves
    the linear programs, decides each set's granularity and fills the reports (a member of
    several sets reports the first). Without scipy a note says the search was skipped.
    """
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        notes.append("scipy is not installed: joint sets were not searched")
        return []
    while len(evidence.stats) < len(candidates) + _JOINT_MARGIN:
        evidence.add_point(_READOUTS_PER_POINT, candidates)
    ndims = {c: evidence.probe.base[c].ndim for c in candidates}
    joint_sets: list[tuple[str, ...]] = []
    for members, change in find_joint_sets(
        candidates, ndims, evidence.stats, tol, evidence.confirm
    ):
        index = len(joint_sets)
        joint_sets.append(tuple(members))
        granularity, change = _granularity(evidence, members, tol, change)
        for c in members:
            if reports[c].get("kind") == JOINT:
                continue  # already reported with an earlier (overlapping) set
            reports[c].update(
                kind=JOINT,
                joint_group=index,
                joint_members=tuple(members),
                joint_granularity=granularity,
                rescale_change=change,
                note="",
            )
    return joint_sets


def _granularity(
    evidence: Evidence, members: list[str], tol: float, change: float
) -> tuple[str, float]:
    """``"row"`` if the members, all with the same channel count, are invariant to a common
    per-row rescale (Euler test on the summed row statistics, then an actual rescale), else
    ``"tensor"``; with the confirming change of the claim."""
    probe = evidence.probe
    counts = {probe.rows[c][1] for c in members}
    if len(counts) != 1:
        return TENSOR, change
    row_ok = all(
        max_cos(
            sum(s.row_e[c] for c in members if c in s.row_e),
            sum(s.row_m[c] for c in members if c in s.row_m),
            evidence.zero_floor(s),
        )
        <= tol
        for s in evidence.stats
        if any(c in s.row_e for c in members)
    )
    if not row_ok:
        return TENSOR, change
    row_change = evidence.confirm(members, probe.row_factors(counts.pop()))
    if row_change > tol:
        return TENSOR, change
    return ROW, max(change, row_change)


def find_joint_sets(
    candidates: list[str],
    ndims: dict[str, int],
    stats: list[PointStats],
    tol: float,
    confirm: Callable[[list[str]], float],
) -> list[tuple[list[str], float]]:
    """Minimal jointly invariant sets (with their rescale change) from the module's LP.

    Phase 1 builds a disjoint family greedily. Phase 2 adds, for each parameter still left, its
    cheapest set even if it overlaps earlier ones (e.g. a LayerNorm-fed Linear whose bias is
    also needed by a residual-stream set).
    """
    import numpy as np
    from scipy.optimize import linprog

    n = len(candidates)
    e = np.array([[s.e.get(c, 0.0) for c in candidates] for s in stats])
    m = np.array([[s.m.get(c, 0.0) for c in candidates] for s in stats])
    scale = m.sum(axis=1, keepdims=True)
    scale[scale == 0] = 1.0  # rows are homogeneous constraints: normalizing them changes nothing
    e, m = e / scale, m / scale
    a_ub = np.vstack([e - tol * m, -e - tol * m])
    b_ub = np.zeros(a_ub.shape[0])
    cost = np.array([_COST_WEIGHT if ndims[c] >= 2 else _COST_VECTOR for c in candidates])
    order = sorted(range(n), key=lambda j: (ndims[candidates[j]] < 2, j))

    def solve(seed: int, excluded: set[int]) -> tuple[list[str], float] | None:
        bounds = [(0.0, 0.0) if j in excluded else (0.0, 1.0) for j in range(n)]
        bounds[seed] = (1.0, 1.0)
        result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        if result.status != 0:
            return None
        members = [j for j in range(n) if result.x[j] > 0.5]
        if len(members) < 2:
            return None
        # The LP vertex may sit on the tolerance boundary: re-check the rounded 0/1 set exactly.
        residual = np.abs(e[:, members].sum(axis=1)) - tol * m[:, members].sum(axis=1)
        if (residual > 0).any():
            return None
        names = [candidates[j] for j in members]
        change = confirm(names)
        return (names, change) if change <= tol else None

    # Phase 1: a disjoint family, seeds in model order, weight matrices first.
    assigned: set[int] = set()
    sets: list[tuple[list[str], float]] = []
    for seed in order:
        if seed not in assigned and (found := solve(seed, assigned)) is not None:
            sets.append(found)
            assigned.update(candidates.index(c) for c in found[0])
    # Phase 2: parameters left out only because their set overlaps an earlier one.
    for seed in order:
        if seed not in assigned and (found := solve(seed, set())) is not None:
            sets.append(found)
            assigned.update(candidates.index(c) for c in found[0])
    return sets
