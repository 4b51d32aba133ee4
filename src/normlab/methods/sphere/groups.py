"""Sphere parameter groups: the scale-invariant parameters by granularity, the rest Euclidean.

Kodryan et al. train the scale-invariant (SI) parameters of a network on a sphere at a fixed
effective learning rate; :func:`scale_invariant_param_groups` finds them with
:func:`normlab.scale_invariance.find_scale_invariant` and groups them per row, per tensor or on
one joint sphere (``granularity``), joint sets included.

References: Kodryan et al., "Training Scale-Invariant Neural Networks on the Sphere Can Happen in
Three Regimes", NeurIPS 2022, arXiv 2209.03695.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ...scale_invariance import ROW, TENSOR, ScaleInvarianceResult
from ...scale_invariance.find import probe_or_report

__all__ = ["scale_invariant_param_groups"]

_GRANULARITIES = ("row", "tensor", "global")
_JOINT_SETS = ("weights", "all", "none")


def _drop_empty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]


def scale_invariant_param_groups(
    model: nn.Module,
    batch: Any,
    granularity: str = "row",
    *,
    joint_sets: str = "weights",
    report: ScaleInvarianceResult | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    non_si: Mapping[str, Any] | None = None,
    **extra: Any,
) -> list[dict]:
    """Parameter groups for sphere optimizers, tagged with ``"granularity"``.

    Every scale-invariant group has ``"scale_invariant": True``, ``"geometry": "sphere"`` and a
    ``"granularity"``: ``"row"`` (each output row its own sphere), ``"tensor"`` (each tensor its
    own sphere) or ``"global"`` (one sphere over the concatenation of all tensors in the group).

    * ``granularity="row"``: row-invariant >= 2-D weights (rows on dim 0) -> group ``"si_row"``;
      other individually invariant tensors -> ``"si_tensor"``; each joint set (a disjoint
      selection, ``result.disjoint_joint_sets()``) -> its own ``"global"`` group
      ``"si_joint<k>"`` (only the set's total norm is free).
    * ``granularity="tensor"``: all individually invariant tensors -> ``"si_tensor"``; joint sets
      as above.
    * ``granularity="global"``: all of them in one ``"global"`` group ``"si_global"`` (the union of
      invariant tensors and joint sets is jointly invariant; Kodryan et al.'s joint sphere).

    Everything else goes to ``"non_si"`` (``"scale_invariant": False``, ``"geometry":
    "euclidean"``) with the keys of ``non_si`` (e.g. ``{"lr": 0.0}`` freezes it as in the paper).

    Args:
        joint_sets: which joint sets count as invariant: ``"weights"`` (default: sets with at least
            one >= 2-D tensor; sets made only of norm affine parameters are left to ``non_si``),
            ``"all"`` or ``"none"``.
        report, loss_fn: as in :func:`normlab.methods.riemannian_bn.groups.grassmann_param_groups`.
        **extra: keys copied into every scale-invariant group (e.g. ``elr=1e-3``).

    References: Kodryan et al., NeurIPS 2022, arXiv 2209.03695.
    """
    if granularity not in _GRANULARITIES:
        raise ValueError(f"Invalid granularity: {granularity!r} (expected {_GRANULARITIES})")
    if joint_sets not in _JOINT_SETS:
        raise ValueError(f"Invalid joint_sets: {joint_sets!r} (expected {_JOINT_SETS})")
    result = probe_or_report(model, batch, report, loss_fn, joint=joint_sets != "none")
    params = dict(model.named_parameters())
    selected_sets = []
    if joint_sets != "none":
        for members in result.disjoint_joint_sets():
            if joint_sets == "all" or any(params[n].ndim >= 2 for n in members):
                selected_sets.append(list(members))
    in_sets = {n for members in selected_sets for n in members}
    row, tensor, rest = [], [], []
    for name, param in params.items():
        if not param.requires_grad or name in in_sets:
            continue
        info = result[name]
        if info.kind == ROW and param.ndim >= 2 and info.row_dim == 0 and granularity == "row":
            row.append(param)
        elif info.kind in (ROW, TENSOR):
            tensor.append(param)
        else:
            rest.append(param)
    sphere = {"scale_invariant": True, "geometry": "sphere"}
    groups: list[dict] = []
    if granularity == "global":
        # Individually invariant tensors and the selected joint sets, in model order.
        chosen = {id(p) for p in tensor} | {id(params[n]) for n in in_sets}
        union = [p for p in params.values() if p.requires_grad and id(p) in chosen]
        groups.append(
            {**extra, "params": union, **sphere, "granularity": "global", "name": "si_global"}
        )
    else:
        groups.append({**extra, "params": row, **sphere, "granularity": "row", "name": "si_row"})
        groups.append(
            {**extra, "params": tensor, **sphere, "granularity": "tensor", "name": "si_tensor"}
        )
        for k, members in enumerate(selected_sets):
            group_params = [params[n] for n in members if params[n].requires_grad]
            groups.append(
                {**extra, "params": group_params, **sphere, "granularity": "global"}
                | {"name": f"si_joint{k}"}
            )
    groups.append(
        {
            **dict(non_si or {}),
            "params": rest,
            "scale_invariant": False,
            "geometry": "euclidean",
            "name": "non_si",
        }
    )
    return _drop_empty(groups)
