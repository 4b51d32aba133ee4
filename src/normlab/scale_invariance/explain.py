"""Explanations of the probe's findings: the eps leak of norm layers and the fx graph path.

* :func:`norm_input_leaks` hooks every norm layer of the probe copy and records, at the model's
  own weights, eps / (median pre-norm variance + eps) with the model's own eps: the fraction of
  a scaling that leaks through the layer. :func:`leak_notes` turns values above 1e-2 into
  warnings (there the real model is only approximately invariant).
* :func:`fx_paths` traces the model with torch.fx and, for every Conv/Linear-like layer, follows
  single-user chains of positively homogeneous ops to a norm layer: the structural reason for
  per-row or per-tensor invariance, reported as ``fx_path``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .probe import is_norm_layer

__all__ = ["fx_paths", "leak_notes", "norm_input_leaks"]

# Warn when a norm layer's median eps / (sigma^2 + eps), with the model's own eps, exceeds this.
_LEAK_WARNING = 1e-2


def norm_input_leaks(
    model: nn.Module, model_eps: Mapping[str, float]
) -> tuple[list, Callable[[], None]]:
    """Hooks recording eps / (median pre-norm variance + eps), eps = the model's own eps."""
    leaks: list[tuple[str, float]] = []
    handles = []

    def variance(module: nn.Module, x: Tensor) -> Tensor | None:
        x = x.detach()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and x.ndim >= 2:
            return x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and x.ndim >= 3:
            return x.reshape(x.shape[0] * x.shape[1], -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.GroupNorm):
            return x.reshape(x.shape[0] * module.num_groups, -1).var(dim=1, unbiased=False)
        if isinstance(module, nn.LayerNorm):
            dims = len(module.normalized_shape)
            return x.reshape(-1, math.prod(x.shape[-dims:])).var(dim=1, unbiased=False)
        return None

    for name, module in model.named_modules():
        eps = model_eps.get(name)
        if eps is None:
            continue

        def hook(module: nn.Module, args: tuple, name: str = name, eps: float = eps) -> None:
            if args and isinstance(args[0], Tensor):
                var = variance(module, args[0])
                if var is not None and var.numel():
                    leaks.append((name, eps / (var.median().item() + eps)))

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return leaks, remove


def leak_notes(leaks: list[tuple[str, float]]) -> list[str]:
    """Warning texts for the norm layers whose recorded eps leak exceeds 1e-2."""
    return [
        f"norm layer '{layer}': median eps/(var+eps) = {leak:.1e} at the model's weights "
        "(its own eps): scale invariance of the real model is only approximate here"
        for layer, leak in leaks
        if leak > _LEAK_WARNING
    ]


_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
)
_HOMOGENEOUS_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.max_pool3d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.avg_pool3d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.dropout,
    torch.flatten,
}
_HOMOGENEOUS_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}


def _norm_scope(module: nn.Module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return "per channel"
    if isinstance(module, nn.GroupNorm):
        if module.num_groups == module.num_channels:
            return "per channel"
        return f"per group of {module.num_channels // module.num_groups} channels"
    if isinstance(module, nn.LayerNorm):
        return "per sample"
    return "custom norm"


def fx_paths(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """Map parameter names of Conv/Linear-like layers to their path into a norm layer.

    From every ``call_module`` node of a layer with a >= 2-D weight, follow single-user chains
    through positively homogeneous ops (ReLU, pools, dropout, flatten) to a norm module. Returns
    ({param name: path text}, None) or ({}, error text) when tracing fails.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...): all mean "no fx"
        return {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    modules = dict(model.named_modules())
    found: dict[str, list[str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        start = modules.get(node.target)
        weight = getattr(start, "weight", None)
        if is_norm_layer(start) or not isinstance(weight, Tensor) or weight.ndim < 2:
            continue
        chain = [f"{node.target} ({type(start).__name__})"]
        current, path = node, None
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op == "call_module":
                module = modules.get(user.target)
                if module is not None and is_norm_layer(module):
                    scope = _norm_scope(module)
                    chain.append(f"{user.target} ({type(module).__name__}, {scope})")
                    path = " -> ".join(chain)
                    break
                if not isinstance(module, _HOMOGENEOUS_MODULES):
                    break
                chain.append(f"{user.target} ({type(module).__name__})")
            elif user.op == "call_function" and user.target in _HOMOGENEOUS_FUNCTIONS:
                chain.append(getattr(user.target, "__name__", str(user.target)))
            elif user.op == "call_method" and user.target in _HOMOGENEOUS_METHODS:
                chain.append(f".{user.target}()")
            else:
                break
            current = user
        for pname, _ in start.named_parameters(recurse=False):
            found.setdefault(f"{node.target}.{pname}" if node.target else pname, []).append(path)
    paths = {}
    for name, options in found.items():
        if all(p is not None for p in options):
            paths[name] = options[0] if len(options) == 1 else " | ".join(options)
    return paths, None
