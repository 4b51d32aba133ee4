"""The Myrtle-style ConvNet of Kodryan et al. (2022), width ``c``.

conv3x3(c) -> norm -> ReLU, then three blocks conv3x3(2c, 4c, 8c) -> norm -> ReLU -> maxpool2,
a global max pool and a Linear head. With ``norm="bn"``, ``bias=False`` and ``affine=False`` this is
the scale-invariant body of their ConvNetSI; see :mod:`normlab.models.scale_invariant` for the
fixed-head variants.
"""

from __future__ import annotations

import torch.nn as nn

from ._layers import NormChoice, adaptive_max_pool, conv, max_pool, spatial_dims


class ConvNet(nn.Sequential):
    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        c: int = 32,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        bias: bool = False,
    ):
        dim = spatial_dims(in_shape)
        choice = NormChoice(norm, affine, norm_kwargs)
        layers: list[nn.Module] = []
        widths = [c, 2 * c, 4 * c, 8 * c]
        channels = in_shape[0]
        for i, width in enumerate(widths):
            layers.append(conv(dim, channels, width, 3, padding=1, bias=bias))
            if choice.enabled:
                layers.append(choice(width, dim))
            layers.append(nn.ReLU())
            if i > 0:
                layers.append(max_pool(dim, 2))
            channels = width
        layers += [adaptive_max_pool(dim, 1), nn.Flatten(), nn.Linear(channels, num_classes)]
        super().__init__(*layers)
