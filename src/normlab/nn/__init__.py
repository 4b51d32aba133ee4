"""Normalization layers, the norm factory and model converters."""

from .factory import group_count, make_norm, norm_names, register_norm

__all__ = ["group_count", "make_norm", "norm_names", "register_norm"]
from .batch_renorm import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
    renorm_limits_at,
    set_renorm_limits,
)
from .convert import convert_norm, group_norm_groups  # noqa: E402
from .sync import SyncBatchNorm, SyncBatchRenorm  # noqa: E402

__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm", "renorm_limits_at"]
__all__ += ["set_renorm_limits", "convert_norm", "group_norm_groups", "SyncBatchNorm"]
__all__ += ["SyncBatchRenorm"]
