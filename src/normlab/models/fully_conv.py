"""The two networks of the ENorm paper's CIFAR-10 experiments: FC-15 and the fully convolutional.

:func:`fully_connected` (model ``fully_connected``) is normlab's :class:`~normlab.models.MLP` with
the original's initialisation: bias-free Linear layers with Kaiming-normal weights (fan-in, ReLU
gain), so a 15-layer stack without normalization keeps its signal scale. (torch's default Linear
init shrinks the second moment about 6x per ReLU layer, so ``mlp depth=15 norm=none`` outputs
~1e-11 and never trains.) ``fully_connected(depth=15, width=500)`` is the paper's FC-15: 15
Linear layers, 14 hidden layers of width 500; the original always puts a BatchNorm after every
hidden Linear (``norm="bn"``), here the default is ``norm="none"``.

:class:`FullyConv` (model ``fully_conv``):

Nine bias-free convolutions with ReLU, a norm after the 3rd and the 6th, two max pools, a 1x1 conv
classifier and average pooling (no Linear layer)::

    conv3x3(w) x3 -> [norm] -> maxpool(3, 2, 1)            (ReLU after every conv)
    conv3x3(2w) x3 -> [norm] -> maxpool(3, 2, 1)
    conv3x3(2.5w) -> conv1x1(2.5w) -> conv1x1(classes) -> global average pool

``width=128`` gives the original's 128 / 256 / 320 channels (2,616,576 parameters with 3 input
channels, the two BNs included). The norm sits between a conv and its ReLU, as in the original
(``norm="none"`` removes both norm layers; the original always has them). Kaiming-normal weights
(fan-in, ReLU gain).

The original's head differs in two measured quirks that this model does not copy: its classifier
conv has padding 1 and ``AvgPool2d(5)`` + reshape then averages only the top-left 5x5 window of the
9x9 map (28x28 crops), and its logits pass a ReLU. Here the classifier is an unpadded 1x1 conv
followed by a global average pool.

The convolutions are 1-D, 2-D or 3-D following the input (``(C, L)`` for mnist1d). Every layer is
a positively homogeneous map, so :class:`normlab.ENorm` can rebalance all hidden channels.

References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks", ICLR 2019,
arXiv:1902.10416 (code: facebookresearch/enorm, ``models/fully_connected.py`` and
``models/fully_convolutional.py``, whose docstring credits the layout to Gitman & Ginsburg's
comparison of batch and weight normalization).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import NormChoice, adaptive_avg_pool, conv, max_pool, spatial_dims
from .mlp import MLP


def fully_connected(
    in_shape: tuple[int, ...],
    num_classes: int,
    depth: int = 15,
    width: int = 500,
    norm: str = "none",
    affine: bool = True,
    norm_kwargs: dict | None = None,
    bias: bool = False,
) -> MLP:
    """The ENorm paper's fully connected network: :class:`MLP` with Kaiming-normal weights.

    ``depth`` Linear layers (head included), ``depth - 1`` hidden blocks ``Linear -> norm -> ReLU``
    of width ``width``; every Linear weight ~ N(0, 2 / fan_in) (biases, if any, zero).
    """
    model = MLP(in_shape, num_classes, depth, width, norm, affine, norm_kwargs, bias)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


class FullyConv(nn.Module):
    """The ENorm paper's fully convolutional network; see the module docstring.

    Args:
        in_shape: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
        num_classes: channels of the classifier conv.
        width: channels of the first stage (128 in the paper); the second has ``2 * width``, the
            third ``5 * width // 2``.
        norm, affine, norm_kwargs: the two norm layers (see :func:`normlab.nn.make_norm`).
        bias: biases on the convolutions (the original has none).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        norm: str = "bn",
        affine: bool = True,
        norm_kwargs: dict | None = None,
        bias: bool = False,
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"FullyConv needs width >= 1, got {width}")
        dim = spatial_dims(in_shape)
        choice = NormChoice(norm, affine, norm_kwargs)
        w1, w2, w3 = width, 2 * width, max(1, 5 * width // 2)
        layers: list[nn.Module] = []
        channels = in_shape[0]
        for stage_width in (w1, w2):
            for i in range(3):
                layers.append(conv(dim, channels, stage_width, 3, padding=1, bias=bias))
                if i == 2 and choice.enabled:
                    layers.append(choice(stage_width, dim))
                layers.append(nn.ReLU())
                channels = stage_width
            layers.append(max_pool(dim, 3, stride=2, padding=1))
        layers += [
            conv(dim, channels, w3, 3, padding=1, bias=bias),
            nn.ReLU(),
            conv(dim, w3, w3, 1, bias=bias),
            nn.ReLU(),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = conv(dim, w3, num_classes, 1, bias=bias)
        self.pool = adaptive_avg_pool(dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # as the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.classifier(self.features(x))), 1)
