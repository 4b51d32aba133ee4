"""SGD-G / Adam-G parameter groups, chosen by the scale-invariance probe instead of by name.

Cho & Lee put every weight whose output feeds a batch norm on the Grassmann manifold G(1, n)
row by row; :func:`grassmann_param_groups` finds those weights with
:func:`normlab.scale_invariance.find_scale_invariant` (per-row invariant, rows on dim 0) and
applies the paper's policies for the rest (norm parameters and biases without weight decay,
overcomplete and jointly invariant weights Euclidean by default).

References: Cho & Lee, "Riemannian approach to batch normalization", NIPS 2017, arXiv 1709.09603.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...scale_invariance import JOINT, ROW, ScaleInvarianceResult
from ...scale_invariance.find import probe_or_report
from ...scale_invariance.probe import is_norm_layer, owner

__all__ = ["grassmann_param_groups"]

_OVERCOMPLETE = ("euclidean", "grassmann")
_JOINTLY = ("euclidean", "grassmann")


def _is_norm_or_bias(model: nn.Module, name: str, param: Tensor) -> bool:
    """BN-like affine parameters and biases (every <= 1-D parameter): no weight decay."""
    return param.ndim <= 1 or is_norm_layer(owner(model, name)[0])


def _is_overcomplete(model: nn.Module, name: str, param: Tensor) -> bool:
    """More rows than the row length within a group: p/groups > n, so Y Y^T = I is infeasible."""
    module, _ = owner(model, name)
    groups = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1
    rows = param.shape[0]
    return rows // groups > param[0].numel()


def _drop_empty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]


def grassmann_param_groups(
    model: nn.Module,
    batch: Any,
    *,
    lr: float = 0.01,
    lr_euclidean: float = 0.1,
    weight_decay: float = 5e-4,
    overcomplete: str = "euclidean",
    jointly_invariant: str = "euclidean",
    report: ScaleInvarianceResult | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    **extra: Any,
) -> list[dict]:
    """Parameter groups of Cho & Lee's SGD-G / Adam-G, chosen by structure instead of by name.

    Groups (empty ones are dropped; every trainable parameter appears exactly once):

    * ``"grassmann"``: >= 2-D weights that are scale-invariant per output row (row dim 0), i.e.
      each row is a point of G(1, n): ``{"grassmann": True, "lr": lr, "weight_decay": 0}``.
    * ``"grassmann_overcomplete"`` (only with ``overcomplete="grassmann"``): row-invariant weights
      with more rows than the row length per conv group (p/groups > n). On G(1, n) every row is its
      own sphere, so this is harmless for the update; only the orthogonality regularizer
      (omega/2)||Y Y^T - I||^2 is infeasible, hence ``"omega": 0.0`` in this group.
    * ``"no_decay"``: norm-layer parameters and all <= 1-D parameters (biases), Euclidean,
      ``weight_decay=0`` (the paper's ``bnDecay = 0``).
    * ``"euclidean"``: everything else (head, non-invariant weights), ``lr_euclidean`` and
      ``weight_decay``.

    Policies:
        overcomplete: ``"euclidean"`` (default; the paper's PyTorch code keeps p > n weights, e.g.
            1x1 shortcut convs, Euclidean with weight decay) or ``"grassmann"`` (see above).
            Depthwise/grouped convs are judged per group: a depthwise 3x3 conv (1 row of length 9
            per group) is not overcomplete.
        jointly_invariant: weights invariant only jointly with others (the second conv of a
            pre-activation residual block, summed with the shortcut before the next BN) have an
            individual norm that matters (it balances the branches). ``"euclidean"`` (default)
            keeps them Euclidean with weight decay; ``"grassmann"`` puts them on G(1, n) as the
            paper's code does, which constrains the model (a hard per-row norm) rather than
            exploiting a symmetry.

    Weights ``find_scale_invariant`` marks row-invariant with rows on dim 1 (ConvTranspose) go to
    ``"euclidean"``: SGD-G's rows are dim 0. The optimizer (or the user) should normalize the
    Grassmann rows to unit norm before training (Cho & Lee section 1.1).

    Args:
        batch: probe batch for :func:`find_scale_invariant` (may be None when ``report`` is given).
        report: a precomputed :class:`ScaleInvarianceResult` for this model.
        loss_fn: forwarded to :func:`find_scale_invariant`.
        **extra: further keys (``momentum``, ``grad_clip``, ``omega``, ...) copied into every group;
            the policy keys above take precedence.

    Returns:
        A list of plain dicts for ``normlab.optim.SGDG`` / ``AdamG`` (any torch optimizer accepts
        them; the ``grassmann`` and ``name`` keys are carried along).

    References: Cho & Lee, NIPS 2017, arXiv 1709.09603 (PT code: ``main.py`` parameter groups).
    """
    if overcomplete not in _OVERCOMPLETE:
        raise ValueError(
            f"Invalid overcomplete policy: {overcomplete!r} (expected {_OVERCOMPLETE})"
        )
    if jointly_invariant not in _JOINTLY:
        raise ValueError(
            f"Invalid jointly_invariant policy: {jointly_invariant!r} (expected {_JOINTLY})"
        )
    for key, value in (("lr", lr), ("lr_euclidean", lr_euclidean)):
        if not value >= 0.0:
            raise ValueError(f"Invalid learning rate {key}: {value}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    # Joint sets only matter when they go on the sphere (the search costs the most).
    result = probe_or_report(model, batch, report, loss_fn, joint=jointly_invariant == "grassmann")
    buckets: dict[str, list[Tensor]] = {
        "grassmann": [],
        "grassmann_overcomplete": [],
        "euclidean": [],
        "no_decay": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        info = result[name]
        on_sphere = info.kind == ROW or (info.kind == JOINT and jointly_invariant == "grassmann")
        if _is_norm_or_bias(model, name, param):
            bucket = "no_decay"
        elif on_sphere and info.row_dim == 0:
            bucket = "grassmann"
            if _is_overcomplete(model, name, param):
                bucket = "grassmann_overcomplete" if overcomplete == "grassmann" else "euclidean"
        else:
            bucket = "euclidean"
        buckets[bucket].append(param)
    sphere = {"grassmann": True, "lr": lr, "weight_decay": 0.0}
    plain = {"grassmann": False, "lr": lr_euclidean}
    return _drop_empty(
        [
            {**extra, "params": buckets["grassmann"], **sphere, "name": "grassmann"},
            {
                **extra,
                "params": buckets["grassmann_overcomplete"],
                **sphere,
                "omega": 0.0,
                "name": "grassmann_overcomplete",
            },
            {
                **extra,
                "params": buckets["euclidean"],
                **plain,
                "weight_decay": weight_decay,
                "name": "euclidean",
            },
            {
                **extra,
                "params": buckets["no_decay"],
                **plain,
                "weight_decay": 0.0,
                "name": "no_decay",
            },
        ]
    )
