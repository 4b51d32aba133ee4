"""Models that take a ``norm`` choice, and the registry that builds them by name.

Every model is built as ``MODEL(in_shape, num_classes, **options)`` where ``in_shape`` is the shape of
one input, ``(C, L)`` for 1-D data or ``(C, H, W)`` for images; ``norm`` picks the normalization from
:func:`normlab.nn.make_norm`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

from ..registry import load_methods
from .convnet import ConvNet
from .lenet import LeNet
from .mlp import MLP
from .resnet import PreActResNet18, WideResNet
from .vgg import VGG

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], *, overwrite: bool = False):
    """Register ``builder(in_shape, num_classes, **options)`` under ``name``."""
    if name in _MODELS and not overwrite:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = builder


def model_names() -> list[str]:
    load_methods()
    return list(_MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options of model ``name`` with their defaults (read from its signature)."""
    builder = _get(name)
    params = list(inspect.signature(builder).parameters.values())[2:]
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build model ``name``; an unknown option is an error listing the valid ones."""
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {unknown}; valid options: {', '.join(valid)}"
        )
    return _get(name)(tuple(in_shape), num_classes, **options)


def _get(name: str):
    load_methods()
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(_MODELS)}") from None


register_model("mlp", MLP)
register_model("lenet", LeNet)
register_model("convnet", ConvNet)
register_model("vgg", VGG)
register_model("wrn", WideResNet)
register_model("resnet18", PreActResNet18)

__all__ = [
    "MLP",
    "LeNet",
    "ConvNet",
    "VGG",
    "WideResNet",
    "PreActResNet18",
    "build_model",
    "model_names",
    "model_options",
    "register_model",
]
