r"""Cross-process batch normalization and renormalization that also run on CPU (gloo).

``SyncBatchNorm`` and ``SyncBatchRenorm`` compute the batch statistics over the whole process group:
per channel, the count and the sum are all-reduced, giving the global mean mu_B; then the centred
sum of squares sum (x - mu_B)^2 is all-reduced, giving the biased global variance (two passes, no
cancellation of sum x^2 - m mu_B^2). The all-reduce is differentiable (its backward all-reduces
the incoming gradient), so autograd gives every rank d(sum_k loss_k)/d(its inputs), exactly as
BatchNorm on the concatenation of all ranks' batches (what torch.nn.SyncBatchNorm computes, but
also on CPU tensors, where torch's layer refuses to run once a process group exists).

With no initialized process group, a group of one rank, or in eval mode, the layers compute
locally (``SyncBatchRenorm`` uses BatchRenorm's fast native-kernel path). The synchronized path is
plain autograd (a few elementwise passes), meant for correctness first.

References: S. Ioffe and C. Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167;
S. Ioffe, "Batch Renormalization", NIPS 2017, arXiv:1702.03275.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn.batch_renorm import (
    Limit,
    _BatchRenorm,
    _channel_shape,
    _stats_dtype,
    renorm_correction,
    update_running_stats,
)

__all__ = ["SyncBatchNorm", "SyncBatchRenorm", "all_reduce_sum", "sync_batch_renorm", "world_size"]


def world_size(process_group=None) -> int:
    """Ranks in ``process_group`` (the default group when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; backward: the gradient is all-reduced too (d sum_k L_k / dx)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad, None


def all_reduce_sum(tensor: Tensor, process_group=None) -> Tensor:
    """Differentiable sum over the ranks of ``process_group`` (every rank must call backward)."""
    return _AllReduceSum.apply(tensor, process_group)


def sync_batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    r_max: Limit = 1.0,
    d_max: Limit = 0.0,
    running_stats: str = "bn",
    process_group=None,
) -> Tensor:
    r"""Training-mode batch (re)normalization with statistics over all ranks of ``process_group``.

    mu_B = sum_k S1_k / sum_k m_k, var_B = sum_k sum_i (x_i - mu_B)^2 / m (biased),
    sigma_B = sqrt(var_B + eps); y = gamma r (x - mu_B) / sigma_B + gamma d + beta with the clipped
    (r, d) of batch renormalization (r_max = 1, d_max = 0: BatchNorm). Running statistics, when
    given, are updated in place with the global statistics (``running_stats`` as in
    :func:`normlab.nn.batch_renorm.update_running_stats`; ``"bn"`` uses the global count in the
    Bessel factor, as torch.nn.SyncBatchNorm). Every rank must call it (collective).
    """
    channels = input.shape[1]
    shape = _channel_shape(input)
    dims = [0] + list(range(2, input.dim()))
    dtype = _stats_dtype(input)  # float32 statistics for half inputs
    x = input.to(dtype)
    local_count = input.numel() // channels
    # Sums and counts travel in float64: counts stay exact beyond 2**24 values per channel.
    local_sum = x.sum(dims, dtype=torch.float64)
    sum_and_count = torch.cat([local_sum, local_sum.new_full((1,), float(local_count))])
    sum_and_count = all_reduce_sum(sum_and_count, process_group)
    count = sum_and_count[channels].detach()
    if local_count <= 1 and int(count) <= 1:
        # Ranks with >= 2 local values know the global count is >= 2 without a host sync; when
        # the global count is 1 every rank has <= 1 and raises, so they stay in step.
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} (and {int(count)} value(s) per channel over all ranks)"
        )
    mean = (sum_and_count[:channels] / count).to(dtype)
    count = count.to(dtype)
    centred = x - mean.view(shape)
    var = all_reduce_sum((centred * centred).sum(dims), process_group) / count
    std = (var + eps).sqrt()
    r, d = renorm_correction(
        mean.detach(), std.detach(), running_mean, running_var, eps, r_max, d_max
    )
    scale = r / std  # differentiable through sigma_B; r is a constant
    shift = d
    if weight is not None:
        gamma = weight.to(dtype)
        scale, shift = scale * gamma, shift * gamma
    if bias is not None:
        shift = shift + bias.to(dtype)
    y = torch.addcmul(shift.view(shape), centred, scale.view(shape))
    if running_mean is not None and running_var is not None:
        update_running_stats(
            running_mean,
            running_var,
            mean.detach(),
            std.detach(),
            count,
            momentum,
            eps,
            running_stats,
        )
    return y.to(input.dtype)


class SyncBatchNorm(_BatchNorm):
    r"""BatchNorm over all ranks of a process group, on any device (CPU/gloo included).

    Same arguments, buffers, state dict and semantics as ``torch.nn.SyncBatchNorm`` (momentum 0.1,
    unbiased running variance with the global count, ``momentum=None`` cumulative average,
    ``track_running_stats=False`` batch statistics in eval). Accepts (N, C, *) inputs.

    It is a ``_BatchNorm`` (tools that special-case batch norm treat it as one); note that
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would swap it for torch's CUDA-only layer
    (use :func:`normlab.nn.convert_norm` instead).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        if not (use_batch_stats and self.training and world_size(self.process_group) > 1):
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                momentum,
                self.eps,
            )
        return sync_batch_renorm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            momentum,
            self.eps,
            1.0,
            0.0,
            "bn",
            self.process_group,
        )


class SyncBatchRenorm(_BatchRenorm):
    r"""Batch renormalization with the batch statistics of all ranks of a process group.

    Arguments and state as :class:`normlab.nn.BatchRenorm2d` plus ``process_group``; accepts
    (N, C, *) inputs. Every rank computes the same mu_B, sigma_B, hence the same r, d and running
    statistics; gradients are those of single-process batch renormalization on the concatenated
    batch. Falls back to the local computation without a process group or with one rank.
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _train_forward(self, input: Tensor, r_max: Limit, d_max: Limit, momentum: float) -> Tensor:
        if world_size(self.process_group) <= 1:
            return super()._train_forward(input, r_max, d_max, momentum)
        return sync_batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            momentum,
            self.eps,
            r_max,
            d_max,
            self.running_stats,
            self.process_group,
        )
