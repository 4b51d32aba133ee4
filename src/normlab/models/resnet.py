"""Pre-activation residual networks: WRN-d-k (Zagoruyko & Komodakis 2016) and PreAct ResNet-18
(He et al. 2016, "Identity mappings in deep residual networks").

A pre-activation block computes ``norm -> ReLU -> conv -> norm -> ReLU -> [dropout] -> conv`` and adds
the shortcut (identity, or a 1x1 conv of the pre-activated input when the shape changes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import NormChoice, adaptive_avg_pool, conv, spatial_dims


class PreActBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        choice: NormChoice,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = choice(in_channels, dim)
        self.relu1 = nn.ReLU()
        self.conv1 = conv(dim, in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = choice(out_channels, dim)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(dim, out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv(dim, in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu2(self.norm2(out))))
        return out + residual


class _PreActNet(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        stem_channels: int,
        stages: list[tuple[int, int, int]],
        choice: NormChoice,
        dropout: float,
    ):
        super().__init__()
        dim = spatial_dims(in_shape)
        self.stem = conv(dim, in_shape[0], stem_channels, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = stem_channels
        for width, count, stride in stages:
            for i in range(count):
                blocks.append(
                    PreActBlock(dim, channels, width, stride if i == 0 else 1, choice, dropout)
                )
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = choice(channels, dim)
        self.relu = nn.ReLU()
        self.pool = adaptive_avg_pool(dim, 1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(torch.flatten(self.pool(out), 1))


class WideResNet(_PreActNet):
    """WRN-``depth``-``widen``: ``(depth - 4) / 6`` pre-activation blocks in each of three groups of
    widths 16k, 32k, 64k (strides 1, 2, 2)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 16,
        widen: int = 4,
        dropout: float = 0.0,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        stages = [(16 * widen, n, 1), (32 * widen, n, 2), (64 * widen, n, 2)]
        super().__init__(
            in_shape, num_classes, 16, stages, NormChoice(norm, affine, norm_kwargs), dropout
        )


class PreActResNet18(_PreActNet):
    """PreAct ResNet-18, CIFAR variant: a 3x3 stem and four stages of two blocks
    (widths 64, 128, 256, 512 times ``width_multiplier``; strides 1, 2, 2, 2)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width_multiplier: float = 1.0,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        dropout: float = 0.0,
    ):
        widths = [max(1, int(round(w * width_multiplier))) for w in (64, 128, 256, 512)]
        stages = [(w, 2, s) for w, s in zip(widths, (1, 2, 2, 2))]
        super().__init__(
            in_shape, num_classes, widths[0], stages, NormChoice(norm, affine, norm_kwargs), dropout
        )
