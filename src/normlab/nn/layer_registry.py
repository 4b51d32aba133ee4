r"""One registry of normalization layers and of the ops that pass channels through them.

Two parts of normlab read a network's graph: the scale-invariance probe's explainer
(:mod:`normlab.scale_invariance`: which weights feed a norm layer through positively homogeneous
ops, how much of a rescale a norm's eps leaks) and ENorm's tracer (:mod:`normlab.enorm.graph`:
which channels can be rescaled, where the norm layers cut). Both read the tables here, so a layer
registered once (:func:`register_norm_layer`, :func:`register_pass_through`) is known to both.

Norm layers (:class:`NormLayer`). A norm layer computes, over the set S of entries that share a
statistic,

    y = weight * (x - mean_S(x)) / sqrt(var_S(x) + eps) + bias

(without the mean for RMSNorm). ``normalized`` names S:

* ``"batch"``: per channel, over the batch and the spatial dims (BatchNorm, SyncBatchNorm, batch
  renormalization, normlab's synced norms);
* ``"instance"``: per sample and channel, over the spatial dims (InstanceNorm);
* ``"group"``: per sample and group of channels (GroupNorm);
* ``"layer"``: per sample, over the trailing ``normalized_shape`` dims (LayerNorm, RMSNorm);
* ``None``: unknown (a custom layer registered without it).

Scaling x by c > 0 multiplies var_S by c^2, so y changes only through eps: by the factor
eps / (var_S + eps) (the eps leak the probe warns about). ``affine`` names the per-channel scale
and shift parameters (ENorm rescales the output channels through them).

Pass-through ops (:class:`PassThrough`): modules, functions and tensor methods that map each
channel to itself (element-wise, or per channel over the spatial dims), with ``homogeneous``
telling whether f(c x) = c f(x) for every c > 0 (ReLU, pooling, zero padding, dropout: yes;
GELU, sigmoid, tanh: no). Only homogeneous ops carry a rescaling from a layer to the next norm
(Cho & Lee's scale invariance, Stock et al.'s rescaling symmetry). ``layout`` is
``"elementwise"`` (any layout), ``"spatial"`` (per channel of a channels-first tensor),
``"flatten"`` or ``"reshape"`` (layout changes the users follow themselves). ``refuse``
returns why one configured instance is not homogeneous after all (a non-zero constant pad).

Layers are matched through their class's MRO. With ``same_forward=True`` (ENorm) a subclass
counts only if it keeps the registered class's ``forward``: a subclass overriding it (a
weight-standardised conv, a custom norm) is a different computation.

References: Cho & Lee, NIPS 2017, arXiv 1709.09603; Stock et al., "Equi-normalization of Neural
Networks", ICLR 2019, arXiv 1902.10416.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .batch_renorm import _BatchRenorm
from .sync import SyncBatchNorm, SyncBatchRenorm

__all__ = [
    "NORMALIZED",
    "NormLayer",
    "PassThrough",
    "find_norm_layer",
    "find_pass_through",
    "norm_layers",
    "pass_through_function",
    "pass_through_method",
    "register_norm_layer",
    "register_pass_through",
]

NORMALIZED = ("batch", "instance", "group", "layer", None)
LAYOUTS = ("elementwise", "spatial", "flatten", "reshape")


# ----------------------------------------------------------------------------------------------
# Norm layers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormLayer:
    """A normalization layer class and what its users need to know about it.

    Attributes:
        cls: the ``nn.Module`` subclass.
        normalized: the set of entries sharing a statistic (see the module docstring).
        centered: whether the mean is subtracted (False for RMSNorm: the statistic is the mean
            square).
        affine: names of the per-channel affine parameters (scale first), possibly None on an
            instance (``affine=False``).
        eps: name of the attribute holding eps; the layer must read it in ``forward``.
    """

    cls: type
    normalized: str | None = None
    centered: bool = True
    affine: tuple[str, ...] = ("weight", "bias")
    eps: str = "eps"

    def eps_of(self, module: nn.Module) -> float | None:
        """The module's eps, or None if it has no float eps (RMSNorm's default eps=None)."""
        eps = getattr(module, self.eps, None)
        return eps if isinstance(eps, float) else None

    def affine_params(self, module: nn.Module) -> tuple[Tensor | None, ...]:
        """The affine parameters named by ``affine`` (None where the instance has none)."""
        values = (getattr(module, name, None) for name in self.affine)
        return tuple(v if isinstance(v, Tensor) else None for v in values)

    def statistic_sets(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """The input ``x`` as (sets, entries): one row per set sharing a statistic.

        None when ``normalized`` is unknown or ``x`` does not have the expected rank.
        """
        if self.normalized == "batch" and x.ndim >= 2:
            return x.transpose(0, 1).reshape(x.shape[1], -1)
        if self.normalized == "instance" and x.ndim >= 3:
            return x.reshape(x.shape[0] * x.shape[1], -1)
        if self.normalized == "group" and x.ndim >= 2:
            return x.reshape(x.shape[0] * module.num_groups, -1)
        if self.normalized == "layer":
            dims = len(module.normalized_shape)
            return x.reshape(-1, math.prod(x.shape[-dims:]))
        return None

    def statistic(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """Per set, the statistic eps is added to: the biased variance (the mean square when not
        centred)."""
        sets = self.statistic_sets(module, x)
        if sets is None:
            return None
        if self.centered:
            return sets.var(dim=1, unbiased=False)
        return sets.square().mean(dim=1)

    def scope(self, module: nn.Module) -> str:
        """Where the statistic is shared, in words (for explanations)."""
        if self.normalized in ("batch", "instance"):
            return "per channel"
        if self.normalized == "group":
            if module.num_groups == module.num_channels:
                return "per channel"
            return f"per group of {module.num_channels // module.num_groups} channels"
        if self.normalized == "layer":
            return "per sample"
        return "custom norm"


_NORMS: dict[type, NormLayer] = {}


def register_norm_layer(
    cls: type,
    *,
    normalized: str | None = None,
    centered: bool = True,
    affine: tuple[str, ...] = ("weight", "bias"),
    eps: str = "eps",
    overwrite: bool = False,
) -> NormLayer:
    """Declare ``cls`` a normalization layer (see :class:`NormLayer`); returns its entry.

    A class already registered keeps its entry unless ``overwrite``: declaring torch's
    BatchNorm2d again does not forget what is known about it.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"Invalid norm layer class: {cls!r} is not an nn.Module subclass")
    if normalized not in NORMALIZED:
        raise ValueError(f"Invalid normalized: {normalized!r} (expected one of {NORMALIZED})")
    if cls in _NORMS and not overwrite:
        return _NORMS[cls]
    entry = NormLayer(cls, normalized, centered, tuple(affine), eps)
    _NORMS[cls] = entry
    return entry


def norm_layers() -> tuple[NormLayer, ...]:
    """Every registered norm layer, in registration order."""
    return tuple(_NORMS.values())


def _find(table: dict, module: nn.Module, same_forward: bool):
    kind = type(module)
    for cls in kind.__mro__:
        entry = table.get(cls)
        if entry is not None and (not same_forward or kind.forward is cls.forward):
            return entry
    return None


def find_norm_layer(module: nn.Module, *, same_forward: bool = False) -> NormLayer | None:
    """The entry of the most specific registered class ``module`` is an instance of.

    With ``same_forward`` only a class whose ``forward`` the module keeps counts.
    """
    return _find(_NORMS, module, same_forward)


# ----------------------------------------------------------------------------------------------
# Pass-through ops
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassThrough:
    """An op that maps each channel to itself, and whether it is positively 1-homogeneous.

    ``target`` is a module class, a function or a tensor method name; see the module docstring
    for ``layout``. ``refuse(module)`` (modules only) returns why an instance is not usable.
    """

    target: type | Callable | str
    layout: str = "elementwise"
    homogeneous: bool = True
    refuse: Callable[[nn.Module], str | None] | None = None

    def refusal(self, module: nn.Module) -> str | None:
        """Why this instance breaks the rescaling (None when it does not)."""
        if not self.homogeneous:
            name = type(module).__name__ if isinstance(module, nn.Module) else str(self.target)
            return f"{name} is channel-wise but not positively homogeneous (f(c x) != c f(x))"
        return None if self.refuse is None else self.refuse(module)


_MODULES: dict[type, PassThrough] = {}
_FUNCTIONS: dict[Callable, PassThrough] = {}
_METHODS: dict[str, PassThrough] = {}


def register_pass_through(
    target: type | Callable | str,
    layout: str = "elementwise",
    *,
    homogeneous: bool = True,
    refuse: Callable[[nn.Module], str | None] | None = None,
) -> PassThrough:
    """Declare a channel-preserving module class, function or tensor method (by name)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout: {layout!r} (expected one of {LAYOUTS})")
    entry = PassThrough(target, layout, homogeneous, refuse)
    if isinstance(target, str):
        _METHODS[target] = entry
    elif isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"Invalid pass-through class: {target!r} is not an nn.Module subclass")
        _MODULES[target] = entry
    elif callable(target):
        _FUNCTIONS[target] = entry
    else:
        raise TypeError(f"Invalid pass-through op: {target!r}")
    return entry


def find_pass_through(module: nn.Module) -> PassThrough | None:
    """The entry of a module that keeps a registered class's ``forward`` (else None)."""
    return _find(_MODULES, module, same_forward=True)


def pass_through_function(target: object) -> PassThrough | None:
    """The entry of a function (an fx ``call_function`` target), else None."""
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def pass_through_method(name: object) -> PassThrough | None:
    """The entry of a tensor method name (an fx ``call_method`` target), else None."""
    return _METHODS.get(name) if isinstance(name, str) else None


# ----------------------------------------------------------------------------------------------
# The built-in tables
# ----------------------------------------------------------------------------------------------


def _refuse_indices(module: nn.Module) -> str | None:
    if getattr(module, "return_indices", False):
        return "pooling with return_indices is not supported"
    return None


def _refuse_constant(module: nn.Module) -> str | None:
    if module.value != 0:
        return (
            f"padding with the constant {module.value} is not positively homogeneous "
            "(only zero padding is)"
        )
    return None


_UPSAMPLE_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "nearest-exact")


def _refuse_upsample(module: nn.Module) -> str | None:
    if module.mode not in _UPSAMPLE_MODES:
        return f"upsampling mode {module.mode!r} is not supported"
    return None


def _torch(*names: str) -> list:
    """The named ``torch.nn`` classes this torch version has."""
    return [getattr(nn, n) for n in names if hasattr(nn, n)]


def _register_builtins() -> None:
    batch = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, _BatchNorm)
    for cls in (*batch, _BatchRenorm, SyncBatchNorm, SyncBatchRenorm):
        register_norm_layer(cls, normalized="batch")
    for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, _InstanceNorm):
        register_norm_layer(cls, normalized="instance")
    register_norm_layer(nn.GroupNorm, normalized="group")
    register_norm_layer(nn.LayerNorm, normalized="layer")
    for cls in _torch("RMSNorm"):
        register_norm_layer(cls, normalized="layer", centered=False, affine=("weight",))

    elementwise = _torch("ReLU", "LeakyReLU", "PReLU", "RReLU", "Identity")
    elementwise += _torch("Dropout", "Dropout1d", "Dropout2d", "Dropout3d")
    for cls in elementwise:
        register_pass_through(cls)
    # Channel-wise but not homogeneous: listed so that users can say so.
    curved = _torch("GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "ELU", "SELU", "CELU", "Softplus")
    curved += _torch("Hardtanh", "ReLU6", "Hardswish", "Hardsigmoid", "Softsign", "Tanhshrink")
    curved += _torch("AlphaDropout", "FeatureAlphaDropout")  # affine in train mode
    for cls in curved:
        register_pass_through(cls, homogeneous=False)
    for dims in ("1d", "2d", "3d"):
        for kind in ("MaxPool", "AvgPool", "AdaptiveMaxPool", "AdaptiveAvgPool", "LPPool"):
            for cls in _torch(kind + dims):
                register_pass_through(cls, "spatial", refuse=_refuse_indices)
        for kind in ("ZeroPad", "ReflectionPad", "ReplicationPad", "CircularPad"):
            for cls in _torch(kind + dims):
                register_pass_through(cls, "spatial")
        for cls in _torch("ConstantPad" + dims):
            register_pass_through(cls, "spatial", refuse=_refuse_constant)
    register_pass_through(nn.Upsample, "spatial", refuse=_refuse_upsample)
    register_pass_through(nn.Flatten, "flatten")

    elementwise_functions = [F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu]
    elementwise_functions += [F.leaky_relu_, F.prelu, F.rrelu, F.dropout, F.dropout1d]
    elementwise_functions += [F.dropout2d, F.dropout3d, operator.neg, torch.neg]
    for fn in elementwise_functions:
        register_pass_through(fn)
    for fn in (F.gelu, F.silu, F.mish, torch.sigmoid, torch.tanh, F.elu, F.softplus, F.hardtanh):
        register_pass_through(fn, homogeneous=False)
    spatial_functions = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d]
    spatial_functions += [F.avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d]
    spatial_functions += [F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d]
    spatial_functions += [F.adaptive_avg_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate]
    spatial_functions += [F.upsample, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d]
    spatial_functions += [torch.avg_pool1d]
    for fn in spatial_functions:
        register_pass_through(fn, "spatial")
    register_pass_through(torch.flatten, "flatten")

    for name in ("relu", "relu_", "contiguous", "clone", "detach", "float", "double", "neg", "to"):
        register_pass_through(name)
    for name in ("sigmoid", "tanh"):
        register_pass_through(name, homogeneous=False)
    register_pass_through("flatten", "flatten")
    for name in ("view", "reshape"):
        register_pass_through(name, "reshape")


_register_builtins()
