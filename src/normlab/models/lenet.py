"""LeNet as in the mcnGroupNorm batch-size experiment (MatConvNet's MNIST LeNet).

conv5 (20) -> norm -> maxpool2 -> conv5 (50) -> norm -> maxpool2 -> conv4 (500) -> norm -> ReLU
-> conv1 (classes). The only ReLU sits after the third conv, as in the original. On 28x28 inputs the
third conv acts as a fully connected layer (output 1x1); on other sizes (1-D mnist1d, 40 samples) a
global average pool before the head keeps the output (N, classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import NormChoice, adaptive_avg_pool, conv, max_pool, spatial_dims


class LeNet(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        init_std: float | None = 0.01,
    ):
        super().__init__()
        dim = spatial_dims(in_shape)
        smallest = min(in_shape[1:])
        if smallest < 28 and dim == 2:
            raise ValueError(
                f"LeNet needs images of at least 28x28, got {tuple(in_shape[1:])}; "
                "use data.resize=28 (for example with data=digits)"
            )
        choice = NormChoice(norm, affine, norm_kwargs)

        def maybe_norm(channels: int) -> nn.Module:
            return choice(channels, dim) if choice.enabled else nn.Identity()

        c = in_shape[0]
        self.features = nn.Sequential(
            conv(dim, c, 20, 5),
            maybe_norm(20),
            max_pool(dim, 2),
            conv(dim, 20, 50, 5),
            maybe_norm(50),
            max_pool(dim, 2),
            conv(dim, 50, 500, 4),
            maybe_norm(500),
            nn.ReLU(),
        )
        self.pool = adaptive_avg_pool(dim, 1)
        self.head = conv(dim, 500, num_classes, 1)
        if init_std is not None:
            # The original draws filters from N(0, 0.01^2) with zero biases.
            for m in self.modules():
                if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.head(self.pool(self.features(x))), 1)
