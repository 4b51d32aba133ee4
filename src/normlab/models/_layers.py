"""Small building blocks shared by the models: dimension-generic conv/pool and the norm choice."""

from __future__ import annotations

import torch.nn as nn

from ..nn.factory import make_norm, norm_names


def spatial_dims(in_shape: tuple[int, ...]) -> int:
    """The number of spatial dimensions of an input of shape ``(C, *spatial)``."""
    if len(in_shape) < 2:
        raise ValueError(
            f"a convolutional model needs an input of shape (C, L) or (C, H, W), got {in_shape}; "
            "1-D data such as mnist1d is stored as (1, 40)"
        )
    return len(in_shape) - 1


def conv(dim: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``/``Conv2d``/``Conv3d`` chosen by the number of spatial dims."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](*args, **kwargs)


def max_pool(dim: int, *args, **kwargs) -> nn.Module:
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dim](*args, **kwargs)


def adaptive_avg_pool(dim: int, size: int = 1) -> nn.Module:
    return {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dim](size)


def adaptive_max_pool(dim: int, size: int = 1) -> nn.Module:
    return {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[dim](size)


def dropout(dim: int, p: float) -> nn.Module:
    return nn.Dropout(p)


class NormChoice:
    """A model's normalization choice: name, affine flag and the norm's options.

    Models call ``norm_choice(channels, dim)`` for each norm layer, so that ``norm="gn"`` with
    ``norm_kwargs={"num_groups": 2}`` reaches every layer of the model in the same way.
    """

    def __init__(
        self,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        scale: bool = True,
    ):
        self.name = norm
        self.affine = affine
        self.scale = scale  # False: an affine norm keeps its shift but no scale (gamma)
        self.options = dict(norm_kwargs or {})
        # A bad name fails here; bad options fail when the model builds its first norm layer (at
        # its real width, so a channels_per_group that divides every width is accepted).
        if norm not in norm_names():
            raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(norm_names())}")

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def __call__(self, channels: int, dim: int) -> nn.Module:
        layer = make_norm(self.name, channels, dim, self.affine, **self.options)
        if self.affine and not self.scale and getattr(layer, "weight", None) is not None:
            # BN "without gamma" (Cho & Lee's VGG): the functional norms accept weight=None.
            del layer.weight
            layer.register_parameter("weight", None)
        return layer
