"""Which parameters is a network's training-mode output invariant to scaling, and how.

A function f is positively homogeneous of degree 0 in a tensor w if f(c*w) = f(w) for all c > 0.
Differentiating at c = 1 gives Euler's identity

    d/dc f(c*w) |_{c=1} = <grad_w f, w> = 0,

so a scale-invariant (SI) weight has a gradient orthogonal to itself. A weight whose output goes
into a normalization layer is SI in training mode (the layer divides by a batch statistic):

* per row: every output channel (row of w viewed as (out, -1)) can be scaled by its own c_r > 0,
  e.g. conv -> [ReLU | max/avg-pool | dropout]* -> BatchNorm (per-channel statistics absorb c_r);
* per tensor only: one c for the whole tensor, e.g. conv -> GroupNorm (a group mixes rows) or
  Linear -> LayerNorm (the statistics run over all features of a sample);
* jointly: only a set of tensors scaled together, e.g. the convs whose outputs are summed in a
  residual stream before the next norm, a conv and its bias before ReLU -> BN, or (gamma, beta)
  of a BN that feeds ReLU -> conv -> BN.

The probe (:func:`find_scale_invariant`) decides per parameter, on a float64 deep copy of the
model in train mode (batch statistics), with a random linear readout r of the output (or
``loss_fn``):

1. Euler test at a few points theta_k (the model's own weights and random multiplicative and
   additive perturbations of all of them, so that a zero-initialized bias or a coincidental
   orthogonality cannot pass): per row |cos(g_r, w_r)| = |<g_r, w_r>| / (||g_r|| ||w_r||) <= tol,
   per tensor |cos(g, w)| <= tol.
2. Confirmation by an actual rescale with ``torch.func.functional_call``: rows multiplied by
   random factors in [1/3, 3] (per-row claim) or the tensor by 2.7 (per-tensor claim); the
   relative change ||f(theta') - f(theta)|| / ||f(theta)|| of the output (or loss) must be <= tol.
3. Joint sets among the rest: with e_kj = <g_j, w_j> and m_kj = ||g_j|| ||w_j|| at K points
   (K > number of candidates), S is jointly SI iff |sum_{j in S} e_kj| <= tol sum_{j in S} m_kj
   at every k. Minimal sets are vertices of the linear program
       min sum_j cost_j x_j   s.t.  x_seed = 1,  0 <= x <= 1,  |E_k x| <= tol M_k x
   (scipy's HiGHS); weight matrices cost less than 1-D parameters so that sets are made of
   weights where possible. Each set is confirmed by rescaling it by 2.7. The sets are found
   greedily (model order, weights first) as a disjoint family; a parameter left out only because
   its set overlaps an earlier one then gets its own, overlapping set.

Tolerance and the eps floor. A norm layer computes (z - mu) / sqrt(sigma^2 + eps), which is not
exactly homogeneous: scaling z by c gives d/dc log(output)|_{c=1} = eps / (sigma^2 + eps) per
channel, so the Euler cosine of a BN-fed weight is ~eps / sigma^2 instead of 0 (~1e-5 for
eps = 1e-5 and unit pre-norm variance; measured up to 2e-4 at PyTorch's default init, and larger
for channels with small variance or after weight decay has shrunk the weights). Euler cosines of
non-invariant tensors are ~0.1 - 0.5 for small tensors but shrink like 1/sqrt(numel) for large
ones (AdamP's delta / sqrt(dim) rule). With the model's own eps the window between the two is
narrow, so by default the probe copy divides every norm layer's eps by 1e6 (``eps_scale``): the
floor drops to ~1e-11 / sigma^2 and tol = 1e-5 separates cleanly (it accepts channels with
sigma^2 >= 1e-6). With ``eps_scale=1`` the model is probed as is and the default tolerance is
the note's rule, 100 x the largest eps (1e-3 for eps = 1e-5), clipped to [1e-5, 5e-2]; i.e.
``tol = clip(100 * max(eps * eps_scale), 1e-5, 5e-2)``. Either way a warning reports norm layers
whose median eps / (sigma^2 + eps) with the model's own eps exceeds 1e-2: there invariance of
the real model is only approximate (tiny weights; cf. Kodryan et al. on the sphere radius).
Norm layers must read their ``eps`` attribute in ``forward`` (all torch norms do).

Optionally a torch.fx walk (Conv/Linear -> chain of positively homogeneous ops -> norm layer)
explains each result; it falls back silently (``result.fx_error``) when tracing fails.

Layout: ``results.py`` (the kinds, :class:`InvarianceReport`, :class:`ScaleInvarianceResult`),
``probe.py`` (the float64 copy, Euler statistics, actual rescales, :func:`default_tolerance`),
``explain.py`` (eps-leak warnings, the fx walk), ``joint.py`` (the linear program of joint sets),
``find.py`` (:func:`find_scale_invariant`, step by step). Norm layers and pass-through ops come
from the registry shared with ENorm, :mod:`normlab.nn.layer_registry`. The parameter groups
built on the probe live with their methods: SGD-G's in
:mod:`normlab.methods.riemannian_bn.groups`, the sphere's in :mod:`normlab.methods.sphere.groups`
(both still reachable here, imported on first use).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv
1709.09603); Kodryan et al., "Training Scale-Invariant Neural Networks on the Sphere Can Happen
in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); Heo et al., "AdamP", ICLR 2021
(arXiv 2006.08217).
"""

from __future__ import annotations

import importlib
from typing import Any

from .find import find_scale_invariant
from .probe import default_tolerance
from .results import (
    FROZEN,
    INERT,
    JOINT,
    KINDS,
    NONE,
    ROW,
    TENSOR,
    UNUSED,
    InvarianceReport,
    ScaleInvarianceResult,
)

__all__ = [
    "FROZEN",
    "INERT",
    "JOINT",
    "KINDS",
    "NONE",
    "ROW",
    "TENSOR",
    "UNUSED",
    "InvarianceReport",
    "ScaleInvarianceResult",
    "default_tolerance",
    "find_scale_invariant",
    "grassmann_param_groups",
    "scale_invariant_param_groups",
]

# Parameter-group builders that moved to their methods; importing this package must not import
# normlab.methods (its registration pulls in optimizers and studies), so they resolve lazily.
_MOVED = {
    "grassmann_param_groups": "normlab.methods.riemannian_bn.groups",
    "scale_invariant_param_groups": "normlab.methods.sphere.groups",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
