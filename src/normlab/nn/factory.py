"""The norm factory: one place that turns a norm name into a layer.

Every model in :mod:`normlab.models` asks this factory for its normalization layers, so a new kind of
normalization (batch renormalization, a synced variant, ...) becomes available to every model by one
:func:`register_norm` call.

Names understood out of the box:

========  ===========================================================================
``none``  no normalization (an ``nn.Identity``)
``bn``    ``torch.nn.BatchNorm{1,2,3}d``
``gn``    ``torch.nn.GroupNorm`` with ``num_groups`` (default 32, capped at the channels)
          or ``channels_per_group``; ``on_indivisible="nearest"`` picks the closest divisor
``ln``    layer norm over (C, *spatial): ``GroupNorm(1, C)``, the usual conv-net choice
``brn``   batch renormalization, :class:`normlab.nn.BatchRenorm1d`/``2d``/``3d`` by the spatial
          dims, with its options (``r_max``, ``d_max``, ``schedule``, ``warmup_steps``, ...)
========  ===========================================================================

Options reach a layer through a model's ``norm_kwargs``, e.g. ``model.norm=brn
model.norm_kwargs.warmup_steps=500`` or ``model.norm=gn model.norm_kwargs.num_groups=2``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

NormBuilder = Callable[..., nn.Module]
_NORMS: dict[str, NormBuilder] = {}


def register_norm(name: str, builder: NormBuilder, *, overwrite: bool = False) -> None:
    """Make ``name`` a valid ``norm=`` choice of every model.

    ``builder(num_features, dim, affine, **options)`` must return an ``nn.Module`` that maps
    ``(N, C, *spatial)`` (``dim`` spatial dims; ``dim=0`` for ``(N, C)``) to the same shape.
    """
    if name in _NORMS and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    _NORMS[name] = builder


def norm_names() -> list[str]:
    """The registered norm names, in registration order."""
    return list(_NORMS)


def make_norm(
    name: str, num_features: int, dim: int = 2, affine: bool = True, **options
) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels.

    Args:
        name: a registered norm name (see :func:`norm_names`).
        num_features: the number of channels C.
        dim: the number of spatial dimensions of the input (0 for ``(N, C)``, 1 for ``(N, C, L)``,
            2 for images, 3 for volumes).
        affine: whether the layer has a learnable per-channel scale and shift.
        **options: options of that norm (``num_groups`` / ``channels_per_group`` for ``gn``).
    """
    try:
        builder = _NORMS[name]
    except KeyError:
        raise ValueError(
            f"unknown norm {name!r}; valid choices: {', '.join(norm_names())}"
        ) from None
    if dim not in (0, 1, 2, 3):
        raise ValueError(f"dim must be 0, 1, 2 or 3 spatial dimensions, got {dim}")
    return builder(num_features, dim, affine, **options)


def _identity(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    _reject_options("none", options)
    return nn.Identity()


def _batch_norm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    allowed = {"eps", "momentum", "track_running_stats"}
    _reject_options("bn", {k: v for k, v in options.items() if k not in allowed})
    return cls(num_features, affine=affine, **options)


def group_count(
    num_channels: int,
    num_groups: int | None = None,
    channels_per_group: int | None = None,
    on_indivisible: str = "error",
) -> int:
    """The number of GroupNorm groups for ``num_channels`` channels.

    Give ``num_groups`` (G fixed; Wu & He's default G = 32 when neither is given) or
    ``channels_per_group`` (C/G fixed, so G follows the layer width; the paper's Table 3 finds 16
    about as good as G = 32). ``num_groups`` above C is capped at C, one channel per group (G = 32
    would otherwise fail on narrow layers). When the channels do not divide:

    * ``on_indivisible="error"`` (default): ValueError listing the valid choices for this width;
    * ``on_indivisible="nearest"``: the divisor of C closest to the request (G, or C/G in the
      ``channels_per_group`` mode), ties to the larger; e.g. C = 48, G = 32 -> 24;
      C = 40, G = 32 -> 40.

    This is also :func:`normlab.nn.group_norm_groups` (the converters' name for it).

    References: Y. Wu and K. He, "Group Normalization", ECCV 2018, arXiv:1803.08494 (Sec. 3.1,
    Table 3).
    """
    if num_groups is not None and channels_per_group is not None:
        raise ValueError("give num_groups or channels_per_group, not both")
    if on_indivisible not in ("error", "nearest"):
        raise ValueError(
            f"Invalid on_indivisible: {on_indivisible!r} (expected 'error' or 'nearest')"
        )
    if num_channels < 1:
        raise ValueError(f"Invalid num_channels: {num_channels}")
    if channels_per_group is not None:
        if channels_per_group < 1:
            raise ValueError(f"Invalid channels_per_group: {channels_per_group}")
        if num_channels % channels_per_group == 0:
            return num_channels // channels_per_group
        if on_indivisible == "nearest":
            return num_channels // _nearest_divisor(num_channels, channels_per_group)
        raise ValueError(
            f"channels_per_group={channels_per_group} does not divide {num_channels} channels; "
            f"valid channels_per_group for {num_channels} channels: {_divisors(num_channels)} "
            "(or pass on_indivisible='nearest')"
        )
    groups = 32 if num_groups is None else num_groups
    if groups < 1:
        raise ValueError(f"Invalid num_groups: {groups}")
    groups = min(groups, num_channels)
    if num_channels % groups == 0:
        return groups
    if on_indivisible == "nearest":
        return _nearest_divisor(num_channels, groups)
    raise ValueError(
        f"num_groups={groups} does not divide {num_channels} channels into {groups} groups; "
        f"valid: {_divisors(num_channels)} (or pass on_indivisible='nearest')"
    )


def _group_norm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    allowed = {"num_groups", "channels_per_group", "on_indivisible", "eps"}
    _reject_options("gn", {k: v for k, v in options.items() if k not in allowed}, sorted(allowed))
    groups = group_count(
        num_features,
        options.get("num_groups"),
        options.get("channels_per_group"),
        options.get("on_indivisible", "error"),
    )
    return nn.GroupNorm(groups, num_features, eps=options.get("eps", 1e-5), affine=affine)


def _layer_norm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    extra = {k: v for k, v in options.items() if k != "eps"}
    _reject_options("ln", extra)
    # GroupNorm with one group normalizes over (C, *spatial) per sample: layer norm for conv nets,
    # and the plain LayerNorm over features for (N, C) inputs.
    return nn.GroupNorm(1, num_features, eps=options.get("eps", 1e-5), affine=affine)


# The BatchRenorm keywords a factory user may set (num_features and affine come from the model).
BATCH_RENORM_OPTIONS = (
    "eps",
    "momentum",
    "bias",
    "r_max",
    "d_max",
    "schedule",
    "warmup_steps",
    "r_max_ramp_steps",
    "d_max_ramp_steps",
    "running_stats",
)


def _batch_renorm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    cls = {0: BatchRenorm1d, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}[dim]
    extra = {k: v for k, v in options.items() if k not in BATCH_RENORM_OPTIONS}
    _reject_options("brn", extra, BATCH_RENORM_OPTIONS)
    return cls(num_features, affine=affine, **options)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_divisor(n: int, target: int) -> int:
    # Closest by absolute difference; a tie goes to the larger divisor (8 and 12 around 10 -> 12).
    return min(_divisors(n), key=lambda k: (abs(k - target), -k))


def _reject_options(name: str, options: dict, valid=()) -> None:
    if options:
        hint = f"; valid options: {', '.join(valid)}" if valid else ""
        raise ValueError(f"norm {name!r} takes no option(s) {sorted(options)}{hint}")


register_norm("none", _identity)
register_norm("bn", _batch_norm)
register_norm("gn", _group_norm)
register_norm("ln", _layer_norm)
register_norm("brn", _batch_renorm)
