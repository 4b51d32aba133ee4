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

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..nn.layer_registry import (
    find_norm_layer,
    find_pass_through,
    pass_through_function,
    pass_through_method,
)
from .probe import is_norm_layer

__all__ = ["fx_paths", "leak_notes", "norm_input_leaks"]

# Warn when a norm layer's median eps / (sigma^2 + eps), with the model's own eps, exceeds this.
_LEAK_WARNING = 1e-2


def norm_input_leaks(
    model: nn.Module, model_eps: Mapping[str, float]
) -> tuple[list, Callable[[], None]]:
    """Hooks recording eps / (median pre-norm statistic + eps), eps = the model's own eps.

    The statistic (the variance over each set of entries that share one, the mean square for
    RMSNorm) comes from the layer registry; norm layers it does not describe record nothing.
    """
    leaks: list[tuple[str, float]] = []
    handles = []

    for name, module in model.named_modules():
        eps = model_eps.get(name)
        if eps is None:
            continue

        def hook(module: nn.Module, args: tuple, name: str = name, eps: float = eps) -> None:
            if args and isinstance(args[0], Tensor):
                entry = find_norm_layer(module)
                var = None if entry is None else entry.statistic(module, args[0].detach())
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


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, but norm layers and registered pass-through modules stay leaves
    (normlab's and the user's are not torch.nn's, and may not be traceable)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_norm_layer(m) or find_pass_through(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _norm_scope(module: nn.Module) -> str:
    entry = find_norm_layer(module)
    return "custom norm" if entry is None else entry.scope(module)


def _homogeneous_step(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The chain text of a channel-wise positively homogeneous node, else None.

    Pass-through ops come from the layer registry; dropout switched off (the probe copy runs
    every dropout in eval mode) is the identity, whatever its kind.
    """
    if node.op == "call_module":
        module = modules.get(node.target)
        op = None if module is None else find_pass_through(module)
        off = isinstance(module, nn.modules.dropout._DropoutNd) and not module.training
        if off or (op is not None and op.refusal(module) is None):
            return f"{node.target} ({type(module).__name__})"
        return None
    if node.op == "call_function":
        op = pass_through_function(node.target)
        if op is not None and op.homogeneous:
            return getattr(node.target, "__name__", str(node.target))
        return None
    if node.op == "call_method":
        op = pass_through_method(node.target)
        return f".{node.target}()" if op is not None and op.homogeneous else None
    return None


def fx_paths(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """Map parameter names of Conv/Linear-like layers to their path into a norm layer.

    From every ``call_module`` node of a layer with a >= 2-D weight, follow single-user chains
    through positively homogeneous ops (ReLU, pools, dropout, flatten) to a norm module. Returns
    ({param name: path text}, None) or ({}, error text) when tracing fails.
    """
    try:
        graph = _Tracer().trace(model)
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
            module = modules.get(user.target) if user.op == "call_module" else None
            if module is not None and is_norm_layer(module):
                chain.append(f"{user.target} ({type(module).__name__}, {_norm_scope(module)})")
                path = " -> ".join(chain)
                break
            step = _homogeneous_step(user, modules)
            if step is None:
                break
            chain.append(step)
            current = user
        for pname, _ in start.named_parameters(recurse=False):
            found.setdefault(f"{node.target}.{pname}" if node.target else pname, []).append(path)
    paths = {}
    for name, options in found.items():
        if all(p is not None for p in options):
            paths[name] = options[0] if len(options) == 1 else " | ".join(options)
    return paths, None
