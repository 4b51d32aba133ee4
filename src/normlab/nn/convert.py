r"""Swap the normalization layers of a model, in the style of ``convert_sync_batchnorm``.

``convert_norm(model, to=...)`` walks ``named_children`` recursively and replaces each matching
layer; it modifies ``model`` in place and returns it (or the new layer when ``model`` itself is a
normalization layer). Parameters and running-statistics buffers are *shared* with the new layer
(the same ``Parameter`` objects, so an optimizer built before the conversion keeps working);
``training``, ``requires_grad`` and ``qconfig`` carry over.

| ``to``            | replaces                                        | by                                 |
|-------------------|-------------------------------------------------|------------------------------------|
| ``"batch_renorm"``| BatchNorm1d/2d/3d; torch or normlab SyncBatchNorm | BatchRenorm1d/2d/3d; SyncBatchRenorm |
| ``"batch_norm"``  | BatchRenorm1d/2d/3d; SyncBatchRenorm            | BatchNorm1d/2d/3d; normlab SyncBatchNorm |
| ``"sync"``        | any BatchNorm (torch SyncBatchNorm included); BatchRenorm | normlab SyncBatchNorm; SyncBatchRenorm |
| ``"group_norm"``  | any BatchNorm or BatchRenorm                    | torch.nn.GroupNorm                 |

Notes: ``eps`` and the affine parameters carry over; ``momentum`` for ``"batch_renorm"`` is the
paper's 0.01 unless given. BatchRenorm's schedule position is ``num_batches_tracked``, which is
shared with the BatchNorm: a converted pre-trained model starts at that step of the schedule
(pass ``schedule="external"`` or zero the counters to restart the warm-up). GroupNorm has no
running statistics: they are dropped, and a BatchNorm-trained network needs fine-tuning after
``"group_norm"`` (its features were normalized per channel over the batch, now per group over
each sample).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, _BatchRenorm
from normlab.nn.factory import group_count
from normlab.nn.sync import SyncBatchNorm, SyncBatchRenorm

__all__ = ["convert_norm", "group_norm_groups"]

TARGETS = ("batch_renorm", "batch_norm", "sync", "group_norm")

_BN_TO_BRN = (
    (nn.BatchNorm1d, BatchRenorm1d),
    (nn.BatchNorm2d, BatchRenorm2d),
    (nn.BatchNorm3d, BatchRenorm3d),
)


# One function for the factory and the converters (same policy, same error messages).
group_norm_groups = group_count


def _device_dtype(module: nn.Module) -> dict:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _share_state(src: nn.Module, dst: nn.Module, buffers: bool = True) -> nn.Module:
    """Give ``dst`` the parameters (and running-statistics buffers) of ``src``, plus its flags."""
    with torch.no_grad():
        dst.weight = src.weight
        dst.bias = src.bias
    if buffers:
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _require_running_stats(module: nn.Module) -> None:
    if getattr(module, "running_mean", None) is None:
        raise ValueError(
            f"cannot convert {type(module).__name__} without running statistics "
            "(track_running_stats=False) to batch renormalization"
        )


def _to_batch_renorm(module: nn.Module, options: dict) -> nn.Module | None:
    if isinstance(module, _BatchRenorm) or not isinstance(module, _BatchNorm):
        return None
    _require_running_stats(module)
    kwargs = {"momentum": 0.01, "eps": module.eps, **options}
    common = dict(affine=module.affine, bias=module.bias is not None, **_device_dtype(module))
    if isinstance(module, (nn.SyncBatchNorm, SyncBatchNorm)):
        kwargs.setdefault("process_group", module.process_group)
        return _share_state(module, SyncBatchRenorm(module.num_features, **common, **kwargs))
    for bn_type, brn_type in _BN_TO_BRN:
        if isinstance(module, bn_type):
            return _share_state(module, brn_type(module.num_features, **common, **kwargs))
    raise TypeError(f"no batch renormalization counterpart for {type(module).__name__}")


def _to_batch_norm(module: nn.Module, options: dict) -> nn.Module | None:
    if not isinstance(module, _BatchRenorm):
        return None
    kwargs = {"momentum": module.momentum, "eps": module.eps, **options}
    common = dict(affine=module.affine, bias=module.bias is not None, **_device_dtype(module))
    if isinstance(module, SyncBatchRenorm):
        kwargs.setdefault("process_group", module.process_group)
        return _share_state(module, SyncBatchNorm(module.num_features, **common, **kwargs))
    for bn_type, brn_type in _BN_TO_BRN:
        if isinstance(module, brn_type):
            return _share_state(module, bn_type(module.num_features, **common, **kwargs))
    raise TypeError(f"no batch norm counterpart for {type(module).__name__}")


def _to_sync(module: nn.Module, options: dict) -> nn.Module | None:
    if isinstance(module, (SyncBatchNorm, SyncBatchRenorm)):
        if "process_group" in options:
            module.process_group = options["process_group"]
        return module
    if not isinstance(module, (_BatchRenorm, _BatchNorm)):
        return None
    common = dict(affine=module.affine, bias=module.bias is not None, **_device_dtype(module))
    if isinstance(module, _BatchRenorm):
        kwargs = {"eps": module.eps, **module.renorm_config(), **options}
        return _share_state(module, SyncBatchRenorm(module.num_features, **common, **kwargs))
    kwargs = {
        "eps": module.eps,
        "momentum": module.momentum,
        "track_running_stats": module.track_running_stats,
        **options,
    }
    return _share_state(module, SyncBatchNorm(module.num_features, **common, **kwargs))


def _to_group_norm(module: nn.Module, options: dict) -> nn.Module | None:
    if not isinstance(module, (_BatchNorm, _BatchRenorm)):
        return None
    options = dict(options)
    eps = options.pop("eps", module.eps)
    groups = group_norm_groups(module.num_features, **options)
    group_norm = nn.GroupNorm(
        groups,
        module.num_features,
        eps=eps,
        affine=module.affine,
        bias=module.bias is not None,
        **_device_dtype(module),
    )
    return _share_state(module, group_norm, buffers=False)


_CONVERTERS: dict[str, Callable[[nn.Module, dict], nn.Module | None]] = {
    "batch_renorm": _to_batch_renorm,
    "batch_norm": _to_batch_norm,
    "sync": _to_sync,
    "group_norm": _to_group_norm,
}


def _plan(module: nn.Module, make, options: dict, cache: dict, plan: list) -> None:
    # Not named_children(): it yields a module registered under two names only once.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) not in cache:  # a module used twice is converted once (and stays shared)
            cache[id(child)] = make(child, options)
            if cache[id(child)] is None:
                _plan(child, make, options, cache, plan)
        replacement = cache[id(child)]
        if replacement is not None and replacement is not child:
            plan.append((module, name, replacement))


def convert_norm(module: nn.Module, to: str, **options) -> nn.Module:
    """Replace the normalization layers of ``module`` (recursively); see the module docstring.

    Args:
        module: the model (modified in place) or a single normalization layer.
        to: ``"batch_renorm"``, ``"batch_norm"``, ``"sync"`` or ``"group_norm"``.
        **options: for ``"batch_renorm"``, BatchRenorm keywords (``r_max``, ``d_max``,
            ``schedule``, ``warmup_steps``, ``momentum``, ``running_stats``, ...); for ``"sync"``,
            ``process_group`` (and layer keywords); for ``"batch_norm"``, BatchNorm keywords; for
            ``"group_norm"``, ``num_groups`` | ``channels_per_group``, ``on_indivisible``, ``eps``
            (see :func:`group_norm_groups`).

    Returns:
        ``module`` with its layers replaced, or the replacement when ``module`` is itself one.

    Raises:
        ValueError: unknown ``to``; BatchNorm without running statistics to ``"batch_renorm"``;
            channels not divisible into groups (``on_indivisible="error"``).
    """
    if to not in _CONVERTERS:
        raise ValueError(f"Invalid to: {to!r} (expected one of {TARGETS})")
    make = _CONVERTERS[to]
    replacement = make(module, options)
    if replacement is not None:
        return replacement
    # Build every replacement first, then swap: an error (e.g. indivisible channels) leaves the
    # model untouched rather than half converted.
    plan: list = []
    _plan(module, make, options, {}, plan)
    for parent, name, new_child in plan:
        parent.add_module(name, new_child)
    return module
