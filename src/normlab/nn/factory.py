"""The norm factory: one place that turns a norm name into a layer.

Every model in :mod:`normlab.models` asks this factory for its normalization layers, so a new kind of
normalization (batch renormalization, a synced variant, ...) becomes available to every model by one
:func:`register_norm` call.

Names understood out of the box:

========  ===========================================================================
``none``  no normalization (an ``nn.Identity``)
``bn``    ``torch.nn.BatchNorm{1,2,3}d``
``gn``    ``torch.nn.GroupNorm`` with ``num_groups`` (default 32, capped at the channels)
          or ``channels_per_group``
``ln``    layer norm over (C, *spatial): ``GroupNorm(1, C)``, the usual conv-net choice
========  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

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
    num_channels: int, num_groups: int | None = None, channels_per_group: int | None = None
) -> int:
    """The number of groups for ``num_channels`` channels.

    Exactly one of ``num_groups`` and ``channels_per_group`` may be given (default: 32 groups).
    ``num_groups`` larger than the channel count is capped at one channel per group (Wu & He's
    recommended G=32 would otherwise fail on narrow layers). A count that does not divide the
    channels is an error that lists the valid choices.
    """
    if num_groups is not None and channels_per_group is not None:
        raise ValueError("give num_groups or channels_per_group, not both")
    if channels_per_group is not None:
        if channels_per_group < 1 or num_channels % channels_per_group:
            raise ValueError(
                f"channels_per_group={channels_per_group} does not divide {num_channels} channels; "
                f"valid: {_divisors(num_channels)}"
            )
        return num_channels // channels_per_group
    groups = min(32 if num_groups is None else num_groups, num_channels)
    if groups < 1 or num_channels % groups:
        raise ValueError(
            f"num_groups={groups} does not divide {num_channels} channels; "
            f"valid: {_divisors(num_channels)}"
        )
    return groups


def _group_norm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    extra = {
        k: v for k, v in options.items() if k not in {"num_groups", "channels_per_group", "eps"}
    }
    _reject_options("gn", extra)
    groups = group_count(num_features, options.get("num_groups"), options.get("channels_per_group"))
    return nn.GroupNorm(groups, num_features, eps=options.get("eps", 1e-5), affine=affine)


def _layer_norm(num_features: int, dim: int, affine: bool, **options) -> nn.Module:
    extra = {k: v for k, v in options.items() if k != "eps"}
    _reject_options("ln", extra)
    # GroupNorm with one group normalizes over (C, *spatial) per sample: layer norm for conv nets,
    # and the plain LayerNorm over features for (N, C) inputs.
    return nn.GroupNorm(1, num_features, eps=options.get("eps", 1e-5), affine=affine)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _reject_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"norm {name!r} takes no option(s) {sorted(options)}")


register_norm("none", _identity)
register_norm("bn", _batch_norm)
register_norm("gn", _group_norm)
register_norm("ln", _layer_norm)
