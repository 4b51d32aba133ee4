"""Scale-invariant (SI) models of Kodryan et al. (2022): BN networks with a fixed last layer.

A body of bias-free Linear/conv layers, each followed by ``BatchNorm(affine=False)``, makes every
weight tensor of the body individually scale-invariant: ``BN(c W x) = BN(W x)`` for ``c > 0`` (up
to BN's ``eps``) in train mode. With the head frozen the whole loss depends only on the directions
of the body's weights: the model is "fully SI" and can be trained on a sphere with
:class:`normlab.optim.SphereSGD`.

Fixed head ("same last layer"): the head ``Linear(features, num_classes)`` is drawn from its
default PyTorch init (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weight and bias) with a private
generator seeded by ``head_seed`` (228 as in the original code), so every run of a sweep shares
the same head whatever its global seed; the global RNG is not consumed or reset by the head. The
weight is then rescaled to Frobenius norm ``init_scale`` (10 in the paper; the logits get a large
scale, so a random-guess loss sits near 10 rather than ``ln C``). The head is frozen with
``requires_grad=False`` (the original froze it by giving it lr 0 in the optimizer; here it has no
gradient at all, so it cannot be trained by accident and costs no backward work).

"Af" variants (``MLPSIAf``, ``ConvNetSIAf``, ``ResNet18SIAf``): BN with ``affine=True`` and a head
trained from its default init; the SI set is still the body's weights, BN's gamma/beta and the head
are not SI.

``ResNet18SI`` is normlab's pre-activation ResNet-18 with ``affine=False`` BN and the fixed head
(bias-free, as the original's). Its residual stream makes most convs scale-invariant only
*jointly*: the stem, every block's second conv and the shortcut convs all add into the stream, so
scaling one alone changes the output, while scaling every conv by ``c`` scales the stream by ``c``
and the next BN removes it. Only each block's first conv (it feeds BN directly) is SI on its own.
Train it on one joint sphere (``SphereSGD`` granularity ``"global"``, the paper's choice).

Every model exposes ``scale_invariant_parameters()`` and ``other_parameters()`` (the trainable
non-SI ones) to build :class:`~normlab.optim.SphereSGD` groups. ``head_seed=None`` draws the head
from the global RNG instead; ``init_scale=None`` (or <= 0) keeps the head's default scale.

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); official code
``tipt0p/three_regimes_on_the_sphere`` (``nets/convnet_si.py``, ``nets/convnet_si_af.py``,
``nets/resnet_si.py``, ``nets/resnet_si_af.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._layers import adaptive_max_pool, conv, max_pool, spatial_dims
from .resnet import PreActResNet18

__all__ = [
    "MLPSI",
    "MLPSIAf",
    "ConvNetSI",
    "ConvNetSIAf",
    "ResNet18SI",
    "ResNet18SIAf",
    "SCALE_INVARIANT_MODELS",
    "make_head",
]


def make_head(
    in_features: int,
    num_classes: int,
    init_scale: float | None = 10.0,
    head_seed: int | None = 228,
    bias: bool = True,
    frozen: bool = True,
) -> nn.Linear:
    """The last layer: default ``nn.Linear`` init (seeded by ``head_seed``), weight rescaled.

    With ``head_seed`` set, the draw uses a private ``torch.Generator`` (on CPU, in float32) so the
    same head comes out in every run regardless of the global seed, and the global RNG is left
    untouched. ``init_scale`` (if > 0) sets the Frobenius norm of the weight; ``frozen`` turns off
    ``requires_grad`` of weight and bias.
    """
    if in_features < 1 or num_classes < 1:
        raise ValueError(f"Invalid head shape: {in_features} -> {num_classes}")
    if head_seed is None:
        head = nn.Linear(in_features, num_classes, bias=bias)
    else:
        # skip_init builds the layer without running (and consuming the global RNG for) its init.
        head = nn.utils.skip_init(nn.Linear, in_features, num_classes, bias=bias)
        generator = torch.Generator().manual_seed(int(head_seed))
        bound = 1.0 / math.sqrt(in_features)  # what nn.Linear's kaiming_uniform(a=sqrt 5) gives
        with torch.no_grad():
            head.weight.copy_(
                torch.empty(num_classes, in_features).uniform_(-bound, bound, generator=generator)
            )
            if bias:
                head.bias.copy_(
                    torch.empty(num_classes).uniform_(-bound, bound, generator=generator)
                )
    if init_scale is not None and init_scale > 0:
        with torch.no_grad():
            head.weight.mul_(init_scale / head.weight.norm())
    if frozen:
        head.requires_grad_(False)
    return head


class _ScaleInvariantNet(nn.Module):
    """A ``body`` whose weight tensors are SI (each feeds a BatchNorm) and a ``head``."""

    body: nn.Sequential
    head: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def scale_invariant_parameters(self) -> list[nn.Parameter]:
        """The body's Linear/conv weights: each is individually scale-invariant."""
        return [
            m.weight
            for m in self.body.modules()
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
        ]

    def other_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are not SI (BN gamma/beta, a trained head); may be []."""
        si = {id(p) for p in self.scale_invariant_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in si]


def _check_common(num_classes: int, width: int, name: str = "width") -> None:
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes} (must be >= 2)")
    if width < 1:
        raise ValueError(f"Invalid {name}: {width} (must be >= 1)")


class MLPSI(_ScaleInvariantNet):
    """Fully SI MLP: ``depth`` x [Linear(no bias) -> BatchNorm1d(affine=False) -> ReLU] + fixed head.

    Args:
        in_shape: the shape of one input (flattened).
        num_classes: outputs of the head.
        width: hidden width (128 in the notes' reproduction).
        depth: number of hidden blocks (3).
        init_scale: Frobenius norm of the fixed head weight (10); None or <= 0 keeps the default.
        head_seed: seed of the shared head (228); None draws it from the global RNG.
        affine: BatchNorm affine flag (False: fully SI).
        freeze_head: head ``requires_grad=False``.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        init_scale: float | None = 10.0,
        head_seed: int | None = 228,
        affine: bool = False,
        freeze_head: bool = True,
    ):
        super().__init__()
        _check_common(num_classes, width)
        if depth < 1:
            raise ValueError(f"Invalid depth: {depth} (must be >= 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(in_shape)
        for _ in range(depth):
            layers += [
                nn.Linear(features, width, bias=False),
                nn.BatchNorm1d(width, affine=affine),
                nn.ReLU(),
            ]
            features = width
        self.body = nn.Sequential(*layers)
        self.head = make_head(features, num_classes, init_scale, head_seed, True, freeze_head)


class MLPSIAf(MLPSI):
    """:class:`MLPSI` with affine BatchNorm and a head trained from its default init."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        init_scale: float | None = None,
        head_seed: int | None = 228,
        affine: bool = True,
        freeze_head: bool = False,
    ):
        super().__init__(
            in_shape, num_classes, width, depth, init_scale, head_seed, affine, freeze_head
        )


class ConvNetSI(_ScaleInvariantNet):
    """Fully SI ConvNet (Myrtle-style, as ConvNetSI of the paper) with a fixed head.

    conv3x3(C_in -> c) -> BN -> ReLU, then ``depth`` blocks conv3x3(-> 2^i c) -> BN -> ReLU ->
    MaxPool(2), a global max pool, Flatten and the head Linear(2^depth c -> num_classes, bias).
    Convs are bias-free with padding 1; BN has ``affine=False``. Conv2d for ``in_shape = (C, H, W)``,
    Conv1d for ``(C, L)``. With c = 32, depth 3 and CIFAR input the SI set has 387,936 weights.

    Args:
        in_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: outputs of the head.
        c: width of the first conv (32 in the paper's runs).
        depth: number of pooled blocks (3; the widths are c, 2c, 4c, 8c).
        init_scale, head_seed, affine, freeze_head: as in :class:`MLPSI`.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        c: int = 32,
        depth: int = 3,
        init_scale: float | None = 10.0,
        head_seed: int | None = 228,
        affine: bool = False,
        freeze_head: bool = True,
    ):
        super().__init__()
        _check_common(num_classes, c, "c")
        if depth < 1:
            raise ValueError(f"Invalid depth: {depth} (must be >= 1)")
        dim = spatial_dims(tuple(in_shape))
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        layers: list[nn.Module] = []
        channels = in_shape[0]
        for i in range(depth + 1):
            width = c * 2**i
            layers += [conv(dim, channels, width, 3, padding=1, bias=False)]
            layers += [bn(width, affine=affine), nn.ReLU()]
            if i > 0:
                layers.append(max_pool(dim, 2))
            channels = width
        layers += [adaptive_max_pool(dim, 1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = make_head(channels, num_classes, init_scale, head_seed, True, freeze_head)


class ConvNetSIAf(ConvNetSI):
    """:class:`ConvNetSI` with affine BatchNorm and a head trained from its default init."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        c: int = 32,
        depth: int = 3,
        init_scale: float | None = None,
        head_seed: int | None = 228,
        affine: bool = True,
        freeze_head: bool = False,
    ):
        super().__init__(
            in_shape, num_classes, c, depth, init_scale, head_seed, affine, freeze_head
        )


class ResNet18SI(PreActResNet18):
    """Fully SI pre-activation ResNet-18: BN ``affine=False`` everywhere and a fixed head.

    The body is :class:`normlab.models.resnet.PreActResNet18` (3x3 stem, four stages of two
    pre-activation blocks, widths ``64, 128, 256, 512`` times ``width_multiplier``, strides
    1/2/2/2, bias-free convs, final BN -> ReLU -> global average pool); the head
    ``Linear(8k -> num_classes, bias=head_bias)`` is drawn as in :func:`make_head` and rescaled to
    norm ``init_scale``. Differences from the original ``nets/resnet_si.py``: the width is set by
    ``width_multiplier`` (the original's ``init_channels`` k = 64 * width_multiplier), and the
    downsampling shortcut is normlab's ``BN -> ReLU -> conv1x1`` of the block (the original:
    ``BN -> conv1x1``); both are SI jointly with the rest of the stream.

    ``scale_invariant_parameters()`` is every conv weight: jointly (not individually) SI, see the
    module docstring.

    Args:
        in_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: outputs of the head.
        width_multiplier: stage widths ``64, 128, 256, 512`` times this.
        init_scale, head_seed, affine, freeze_head: as in :class:`MLPSI`.
        head_bias: give the head a bias (the original's ResNet head has none).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width_multiplier: float = 1.0,
        init_scale: float | None = 10.0,
        head_seed: int | None = 228,
        affine: bool = False,
        freeze_head: bool = True,
        head_bias: bool = False,
    ):
        if num_classes < 2:
            raise ValueError(f"Invalid num_classes: {num_classes} (must be >= 2)")
        if not width_multiplier > 0:
            raise ValueError(f"Invalid width_multiplier: {width_multiplier} (must be > 0)")
        super().__init__(in_shape, num_classes, width_multiplier, norm="bn", affine=affine)
        # The parent's default head is replaced (its global-RNG draw comes after every conv init).
        self.head = make_head(
            self.head.in_features, num_classes, init_scale, head_seed, head_bias, freeze_head
        )

    def scale_invariant_parameters(self) -> list[nn.Parameter]:
        """Every conv weight (stem, blocks, shortcuts): jointly scale-invariant."""
        return [
            m.weight
            for m in self.modules()
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.weight.requires_grad
        ]

    def other_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are not SI (BN gamma/beta, a trained head); may be []."""
        si = {id(p) for p in self.scale_invariant_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in si]


class ResNet18SIAf(ResNet18SI):
    """:class:`ResNet18SI` with affine BatchNorm and a head trained from its default init.

    The original code allows this model only in conventional (``fix_lr``) training; here it also
    trains on the sphere (the conv weights stay jointly SI with affine BN; gamma/beta and the head
    form the non-SI group).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width_multiplier: float = 1.0,
        init_scale: float | None = None,
        head_seed: int | None = 228,
        affine: bool = True,
        freeze_head: bool = False,
        head_bias: bool = False,
    ):
        super().__init__(
            in_shape,
            num_classes,
            width_multiplier,
            init_scale,
            head_seed,
            affine,
            freeze_head,
            head_bias,
        )


SCALE_INVARIANT_MODELS: dict[str, type[nn.Module]] = {
    "mlp_si": MLPSI,
    "mlp_si_af": MLPSIAf,
    "convnet_si": ConvNetSI,
    "convnet_si_af": ConvNetSIAf,
    "resnet18_si": ResNet18SI,
    "resnet18_si_af": ResNet18SIAf,
}
