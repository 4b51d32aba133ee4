"""Optimizer registry entries ``sgdg`` and ``adamg``: Cho & Lee's Riemannian BN in the one loop.

``optim=sgdg`` / ``optim=adamg`` build :class:`normlab.optim.SGDG` / :class:`normlab.optim.AdamG`
with the parameter groups of the paper, found by structure (:func:`grassmann_param_groups` on a few
samples of the run's probe batch) instead of by parameter name:

* ``grassmann``: weights whose rows feed a BN channel (and, by default, the weights that are only
  jointly invariant, as the paper's code does), rows on G(1, n):
  ``lr = lrg``, momentum, ``omega``, ``grad_clip``, no weight decay, no Nesterov;
* ``euclidean``: classifier, overcomplete convs (first conv on 1-channel inputs, 1x1 shortcuts):
  ``lr``, momentum, Nesterov, ``weight_decay``;
* ``no_decay``: BN scales/shifts and biases: as ``euclidean`` with ``norm_decay`` (paper: 0).

Defaults are the paper's CIFAR settings (notes/riemannian_bn.md section 2):

    SGD-G : lr 0.01 (Euclidean), lrg 0.2 (manifold), momentum 0.9, Nesterov (Euclidean groups),
            weight_decay 5e-4 (Euclidean groups only), omega 0.1, grad_clip 0.1
    Adam-G: lrg 0.05, beta1 0.9, beta2 0.99, eps 1e-8 (manifold); Euclidean groups as SGD-G

A schedule multiplies every group's ``lr``, so ``schedule=multistep`` decays ``lr`` and ``lrg``
together, as both original codes do; optimizer state is never reset at a milestone (the TF code's
behaviour, the one the paper's numbers come from).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017 (arXiv 1709.09603).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...optim import SGDG, AdamG
from ...train.optimizers import BuildContext, OptimizerSpec
from .groups import grassmann_param_groups

__all__ = [
    "ADAMG_DEFAULTS",
    "ADAMG_SPEC",
    "SGDG_DEFAULTS",
    "SGDG_SPEC",
    "build_adamg",
    "build_sgdg",
    "riemannian_groups",
]


def _defaults(lrg: float) -> dict:
    return {
        "lr": 0.01,  # Euclidean groups
        "lrg": lrg,  # manifold groups (G(1, n) rows)
        "momentum": 0.9,  # also the Euclidean momentum of Adam-G
        "nesterov": True,  # Euclidean groups only (the manifold update has no Nesterov)
        "weight_decay": 5e-4,  # Euclidean weights; never the manifold
        "norm_decay": 0.0,  # BN scales/shifts and biases (the paper's bnDecay)
        "grad_clip": 0.1,  # per-row clip of the tangent gradient; none or 0 disables
        "omega": 0.1,  # orthogonality regularization of the manifold groups
        "overcomplete": "euclidean",  # p > n weights: euclidean (paper) | grassmann
        "jointly_invariant": "grassmann",  # residual-branch convs: grassmann (paper) | euclidean
        "probe_samples": 16,  # samples of the probe batch used to find the groups
        "fused": False,  # True: one compiled graph per group step (torch.compile; opt-in)
    }


SGDG_DEFAULTS: dict = _defaults(lrg=0.2)
ADAMG_DEFAULTS: dict = {
    **_defaults(lrg=0.05),
    "beta1": 0.9,
    "beta2": 0.99,
    "eps": 1e-8,
    "euclidean": "sgd",  # method of the non-manifold groups: sgd (paper) | adam
}


def riemannian_groups(model: nn.Module, options: dict, probe_batch) -> list[dict]:
    """The paper's parameter groups for ``model`` (``grassmann``, ``euclidean``, ``no_decay``, and
    ``grassmann_overcomplete`` with ``overcomplete="grassmann"``), hyper-parameters from ``options``.

    ``probe_batch`` is ``(x, y)`` or ``x``; only its first ``probe_samples`` inputs are used (the
    scale-invariance probe costs a few forward/backward passes of a float64 copy of the model).
    """
    x = probe_batch[0] if isinstance(probe_batch, tuple | list) else probe_batch
    samples = int(options["probe_samples"])
    if samples < 2:
        raise ValueError(f"Invalid probe_samples: {samples} (BatchNorm needs at least 2)")
    grad_clip = options["grad_clip"]
    if grad_clip is not None and grad_clip <= 0:
        grad_clip = None
    groups = grassmann_param_groups(
        model,
        x[:samples],
        lr=options["lrg"],
        lr_euclidean=options["lr"],
        weight_decay=options["weight_decay"],
        overcomplete=options["overcomplete"],
        jointly_invariant=options["jointly_invariant"],
        momentum=options["momentum"],
        omega=options["omega"],
        grad_clip=grad_clip,
    )
    if not any(group["grassmann"] and group["params"] for group in groups):
        # Without manifold rows SGD-G / Adam-G would silently be Nesterov SGD: refuse instead.
        raise ValueError(
            f"found no weights that feed a normalization layer in {type(model).__name__}, so no "
            "rows to put on G(1,n); use a model with batch norm (e.g. model.norm=bn) or optim=sgd"
        )
    for group in groups:
        if group["grassmann"]:
            group["nesterov"] = False  # Algorithm 1: plain momentum on the manifold
        else:
            group["nesterov"] = options["nesterov"]
            if group["name"] == "no_decay":
                group["weight_decay"] = options["norm_decay"]
    return groups


def build_sgdg(model: nn.Module, options: dict, context: BuildContext) -> torch.optim.Optimizer:
    """``optim=sgdg``: SGD-G on the manifold groups, SGD (+ Nesterov) elsewhere."""
    return SGDG(
        riemannian_groups(model, options, context.probe_batch),
        lr=options["lr"],
        fused=options.get("fused") or None,
    )


def build_adamg(model: nn.Module, options: dict, context: BuildContext) -> torch.optim.Optimizer:
    """``optim=adamg``: Adam-G on the manifold groups, SGD (+ Nesterov) or Adam elsewhere."""
    return AdamG(
        riemannian_groups(model, options, context.probe_batch),
        lr=options["lr"],
        betas=(options["beta1"], options["beta2"]),
        eps=options["eps"],
        euclidean=options["euclidean"],
        fused=options.get("fused") or None,
    )


SGDG_SPEC = OptimizerSpec(
    "sgdg",
    build_sgdg,
    dict(SGDG_DEFAULTS),
    "SGD-G (Cho & Lee 2017): BN-fed weight rows on G(1,n) with lrg; SGD+Nesterov elsewhere",
)
ADAMG_SPEC = OptimizerSpec(
    "adamg",
    build_adamg,
    dict(ADAMG_DEFAULTS),
    "Adam-G (Cho & Lee 2017): per-row Adam on G(1,n) with lrg; SGD+Nesterov elsewhere",
)
