"""VGG-11/13/16/19, CIFAR variant (Simonyan & Zisserman 2015; the 32x32 version used by Cho & Lee).

Each 3x3 conv is followed by norm and ReLU; 'M' is a 2x2 max pool. The classifier is one Linear layer
on the 512 features, as in the common CIFAR implementations (``fc_layers=0``), or, as in Cho & Lee's
code (``vgg.py`` of MinhyungCho/riemannian-batch-normalization), ``fc_layers=2`` hidden
FC-``fc_width``-norm-ReLU layers before it; ``norm_scale=False`` drops the norms' scale (BN without
gamma, also as in that code). Inputs smaller than 32 pixels skip the pools that would shrink them
below 1 (so VGG also runs on 8x8 digits and 1-D mnist1d).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import NormChoice, adaptive_avg_pool, conv, max_pool, spatial_dims

VGG_LAYOUTS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 16,
        width_multiplier: float = 1.0,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        fc_layers: int = 0,
        fc_width: int = 512,
        norm_scale: bool = True,
    ):
        super().__init__()
        if depth not in VGG_LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}, got {depth}")
        if fc_layers < 0 or fc_width < 1:
            raise ValueError(
                f"VGG needs fc_layers >= 0 and fc_width >= 1, got {fc_layers}, {fc_width}"
            )
        dim = spatial_dims(in_shape)
        choice = NormChoice(norm, affine, norm_kwargs, scale=norm_scale)
        layers: list[nn.Module] = []
        channels, size = in_shape[0], min(in_shape[1:])
        for item in VGG_LAYOUTS[depth]:
            if item == "M":
                if size >= 2:
                    layers.append(max_pool(dim, 2))
                    size //= 2
                continue
            width = max(1, int(round(item * width_multiplier)))
            layers.append(conv(dim, channels, width, 3, padding=1, bias=not choice.enabled))
            if choice.enabled:
                layers.append(choice(width, dim))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = adaptive_avg_pool(dim, 1)
        hidden: list[nn.Module] = []
        for _ in range(fc_layers):
            hidden.append(nn.Linear(channels, fc_width, bias=not choice.enabled))
            if choice.enabled:
                hidden.append(choice(fc_width, 0))
            hidden.append(nn.ReLU(inplace=True))
            channels = fc_width
        self.fc = nn.Sequential(*hidden)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(torch.flatten(self.pool(self.features(x)), 1)))
