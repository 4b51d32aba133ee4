"""Fully connected ReLU network (the FC-15 of the ENorm paper is ``MLP(depth=15, width=500)``)."""

from __future__ import annotations

import math

import torch.nn as nn

from ._layers import NormChoice


class MLP(nn.Sequential):
    """``depth`` Linear layers: ``depth - 1`` hidden blocks ``Linear -> norm -> ReLU`` and a head.

    Args:
        in_shape: the shape of one input; it is flattened.
        num_classes: outputs of the head.
        depth: the number of Linear layers, head included (>= 1).
        width: the width of the hidden layers.
        norm, affine, norm_kwargs: the normalization after each hidden Linear (see
            :func:`normlab.nn.make_norm`).
        bias: whether the Linear layers have biases.
        dropout: dropout probability after each hidden block (0 = none).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 3,
        width: int = 128,
        norm: str = "none",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        if depth < 1 or width < 1:
            raise ValueError(
                f"MLP needs depth >= 1 and width >= 1, got depth={depth}, width={width}"
            )
        choice = NormChoice(norm, affine, norm_kwargs)
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(in_shape)
        for _ in range(depth - 1):
            layers.append(nn.Linear(features, width, bias=bias))
            if choice.enabled:
                layers.append(choice(width, 0))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes, bias=bias))
        super().__init__(*layers)
