r"""Batch Renormalization (Ioffe, 2017): ``BatchRenorm1d``, ``BatchRenorm2d``, ``BatchRenorm3d``.

Training (Algorithm 1 of the paper), per channel over the m values of a mini-batch:

    mu_B    = (1/m) sum_i x_i
    sigma_B = sqrt(eps + (1/m) sum_i (x_i - mu_B)^2)           (biased, eps inside the sqrt)
    sigma   = sqrt(running_var + eps)                           (the running std)
    r = stop_gradient(clip(sigma_B / sigma,       [1/r_max, r_max]))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, [-d_max, d_max]))
    x_hat_i = (x_i - mu_B) / sigma_B * r + d
    y_i     = gamma * x_hat_i + beta

Inference is BatchNorm's: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

Because r and d are constants for autograd, y = (gamma r) * BN_hat(x) + (beta + gamma d): the layer is
BatchNorm with a per-channel weight gamma*r and bias beta + gamma*d, and its backward is BatchNorm's
backward with that weight (the paper's closed form). The fast path therefore runs the native
batch-norm kernel once (statistics and the normalized x come out together), applies the folded
per-channel affine in one pass, and calls the native batch-norm backward; the cost stays close to
BatchNorm's. ``batch_renorm_reference`` is the literal, readable Algorithm 1 that the tests trust.

Running statistics (``running_stats``):

* ``"std"`` (default, the paper): the running std is averaged, sigma <- sigma + a (sigma_B - sigma).
  It is stored as ``running_var = sigma^2 - eps`` so the buffers keep BatchNorm's names and meaning
  (inference normalizes by sqrt(running_var + eps) = sigma).
* ``"var"``: running_var <- running_var + a (var_B - running_var) with the biased batch variance.
* ``"bn"``: BatchNorm's rule, the unbiased variance var_B * m / (m - 1).

``momentum`` is PyTorch's convention: the weight a of the new value (paper alpha = 0.01), not
Keras/Flax's 1 - a = 0.99. ``momentum=None`` gives a cumulative average as in BatchNorm.

References: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NIPS 2017, arXiv:1702.03275.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "batch_renorm",
    "batch_renorm_reference",
    "renorm_correction",
    "renorm_limits_at",
    "set_renorm_limits",
]

SCHEDULES = ("paper", "constant", "external")
RUNNING_STATS = ("std", "var", "bn")

Limit = float | Tensor


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------


def _ramp_fraction(step, start: int, length: int):
    """0 before ``start``, rising linearly to 1 at ``start + length`` (a step when length is 0)."""
    if length == 0:
        return (step >= start) * 1.0
    if isinstance(step, Tensor):
        return ((step - start) / length).clamp(0.0, 1.0)
    return min(max((step - start) / length, 0.0), 1.0)


def renorm_limits_at(
    step: int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_ramp_steps: int = 35000,
    d_max_ramp_steps: int = 20000,
) -> tuple[float, float]:
    r"""The paper's relaxation schedule of the clipping limits at a training step (0-based).

    r_max(t) = 1 + (r_max - 1) clip((t - warmup) / r_ramp, 0, 1)
    d_max(t) = d_max clip((t - warmup) / d_ramp, 0, 1)

    With the defaults: (1, 0) (plain BatchNorm) for the first 5k steps, then r_max rises linearly
    to 3 at step 40k and d_max to 5 at step 25k (paper, Section 4.1).

    Returns ``(r_max(t), d_max(t))`` as Python floats.
    """
    r_frac = _ramp_fraction(step, warmup_steps, r_max_ramp_steps)
    d_frac = _ramp_fraction(step, warmup_steps, d_max_ramp_steps)
    return 1.0 + (r_max - 1.0) * r_frac, d_max * d_frac


# ----------------------------------------------------------------------------------------------
# Functional pieces
# ----------------------------------------------------------------------------------------------


def _stats_dtype(x: Tensor) -> torch.dtype:
    # Statistics of half / bfloat16 inputs are kept in float32 (as BatchNorm's mixed kernels do).
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _is_identity_limits(r_max: Limit, d_max: Limit) -> bool:
    return (
        not isinstance(r_max, Tensor)
        and not isinstance(d_max, Tensor)
        and r_max == 1.0
        and d_max == 0.0
    )


def verify_batch_size(input: Tensor) -> None:
    """Raise BatchNorm's ValueError when a channel has a single value in training."""
    size = list(input.shape)
    if math.prod(size[:1] + size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for a batch without values (N = 0), as ``F.batch_norm`` gives it: an empty
    tensor of the input's shape, still connected to weight and bias (zero gradients) so that
    backward runs; no statistics exist, so the running statistics are left alone."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0].to(input.dtype)
    if bias is not None:
        out = out + bias[0].to(input.dtype)
    return out


def _clipped_correction(batch_mean, batch_std, running_mean, running_var, eps, r_max, d_max):
    dtype = batch_mean.dtype
    if isinstance(r_max, Tensor):
        r_max = r_max.to(dtype)
    if isinstance(d_max, Tensor):
        d_max = d_max.to(dtype)
    running_std = (running_var.to(dtype) + eps).sqrt()
    r = (batch_std / running_std).clamp(min=1.0 / r_max, max=r_max)
    d = ((batch_mean - running_mean.to(dtype)) / running_std).clamp(min=-d_max, max=d_max)
    return r, d


@torch.library.custom_op("normlab::renorm_correction", mutates_args=())
def _renorm_correction_op(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: Tensor,
    d_max: Tensor,
) -> tuple[Tensor, Tensor]:
    return _clipped_correction(batch_mean, batch_std, running_mean, running_var, eps, r_max, d_max)


@_renorm_correction_op.register_fake
def _(batch_mean, batch_std, running_mean, running_var, eps, r_max, d_max):
    return torch.empty_like(batch_mean), torch.empty_like(batch_mean)


@torch.no_grad()
def renorm_correction(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    r_max: Limit,
    d_max: Limit,
) -> tuple[Tensor, Tensor]:
    r"""The clipped correction (r, d), computed without a graph (the paper's stop_gradient).

    r = clip(sigma_B / sigma, [1/r_max, r_max]), d = clip((mu_B - mu) / sigma, [-d_max, d_max]),
    sigma = sqrt(running_var + eps). Computed in the dtype of ``batch_mean``.
    ``r_max``/``d_max`` may be floats or 0-dim tensors (a schedule evaluated on the device).
    """
    if _is_identity_limits(r_max, d_max) or running_mean is None or running_var is None:
        if not _is_identity_limits(r_max, d_max):
            raise ValueError(
                "batch renormalization with r_max > 1 or d_max > 0 needs running stats"
            )
        return torch.ones_like(batch_mean), torch.zeros_like(batch_mean)
    if torch.compiler.is_compiling():
        # torch 2.13's AOT partitioner may recompute r and d in the backward graph from the
        # running buffers and the step counter *after* the forward has updated them in place:
        # silently wrong gradients (pytorch/pytorch PR #197039). The outputs of an opaque custom
        # op are never recomputed, only saved.
        as_tensor = dict(dtype=batch_mean.dtype, device=batch_mean.device)
        return _renorm_correction_op(
            batch_mean,
            batch_std,
            running_mean,
            running_var,
            eps,
            torch.as_tensor(r_max, **as_tensor),
            torch.as_tensor(d_max, **as_tensor),
        )
    return _clipped_correction(batch_mean, batch_std, running_mean, running_var, eps, r_max, d_max)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_std: Tensor,
    count: int | Tensor,
    momentum: float,
    eps: float,
    running_stats: str = "std",
) -> None:
    r"""In-place moving averages of the batch statistics (no graph is ever attached).

    mean <- mean + a (mu_B - mean); the variance buffer follows ``running_stats``:
    ``"std"``: sigma <- sigma + a (sigma_B - sigma) with sigma = sqrt(running_var + eps), stored back
    as running_var = sigma^2 - eps; ``"var"``: biased batch variance; ``"bn"``: unbiased
    (count / (count - 1)) batch variance, as torch.nn.BatchNorm.
    """
    dtype = batch_mean.dtype
    mean = running_mean.to(dtype)
    running_mean.copy_(mean + momentum * (batch_mean - mean))
    var = running_var.to(dtype)
    if running_stats == "std":
        std = (var + eps).sqrt()
        new_std = std + momentum * (batch_std - std)
        running_var.copy_((new_std * new_std - eps).clamp_min(0.0))
        return
    batch_var = (batch_std * batch_std - eps).clamp_min(0.0)
    if running_stats == "bn":
        batch_var = batch_var * (count / (count - 1))
    elif running_stats != "var":
        raise ValueError(f"Invalid running_stats: {running_stats!r}")
    running_var.copy_(var + momentum * (batch_var - var))


class _BatchRenormFunction(torch.autograd.Function):
    """Native batch-norm kernels with the renorm correction folded into BatchNorm's weight and bias.

    forward(x, weight, bias, running_mean, running_var, r_max, d_max, eps)
        -> (y, batch_mean, batch_std), the statistics in float32 for half inputs.

    Forward: one statistics pass (``batch_norm_update_stats``) and one inference-mode batch-norm
    pass with weight gamma*r and bias beta + gamma*d, i.e. the cost of a BatchNorm forward.
    Backward: BatchNorm's backward kernel with weight gamma*r (r and d are constants).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, r_max, d_max, eps):
        stats_dtype = _stats_dtype(x)
        if x.dtype != stats_dtype:
            # With float32 buffers the mixed-dtype kernel returns float32 statistics for half
            # inputs. Scratch buffers: momentum 0 still writes them, and NaNs would leak in.
            channels = x.shape[1]
            scratch_mean = torch.zeros(channels, dtype=stats_dtype, device=x.device)
            scratch_var = torch.ones(channels, dtype=stats_dtype, device=x.device)
        else:
            scratch_mean = scratch_var = None
        batch_mean, batch_var = torch.batch_norm_update_stats(x, scratch_mean, scratch_var, 0.0)
        batch_std = (batch_var + eps).sqrt()  # biased variance, eps inside the sqrt (paper)
        r, d = renorm_correction(
            batch_mean, batch_std, running_mean, running_var, eps, r_max, d_max
        )
        if weight is not None:
            gamma = weight.to(stats_dtype)
            scale, shift = gamma * r, gamma * d
        else:
            scale, shift = r, d
        if bias is not None:
            shift = shift + bias.to(stats_dtype)
        # y = gamma r (x - mu_B) / sigma_B + beta + gamma d: BatchNorm's inference kernel with the
        # batch statistics as "running" statistics; keeps the memory format (channels_last).
        y = F.batch_norm(x, batch_mean, batch_var, scale, shift, False, 0.0, eps)
        ctx.save_for_backward(x, weight, batch_mean, batch_std.reciprocal(), r, d)
        ctx.eps = eps
        ctx.mark_non_differentiable(batch_mean, batch_std)
        return y, batch_mean, batch_std

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_std):
        x, weight, batch_mean, batch_invstd, r, d = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        # r, d are constants: BatchNorm's backward with the folded weight gamma * r.
        folded_weight = r * weight.to(r.dtype) if weight is not None else r
        need_affine = need_weight or need_bias
        grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            grad_y,
            x,
            folded_weight,
            None,
            None,
            batch_mean,
            batch_invstd,
            True,
            ctx.eps,
            [need_x, need_affine, need_affine],
        )
        grad_weight = grad_bias = None
        if need_weight:
            # dL/dgamma = sum g (r x_hat + d) = r sum g x_hat + d sum g
            grad_weight = (r * grad_scale + d * grad_shift).to(weight.dtype)
        if need_bias:
            grad_bias = grad_shift.to(weight.dtype if weight is not None else grad_shift.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: Limit = 1.0,
    d_max: Limit = 0.0,
    running_stats: str = "std",
) -> Tensor:
    r"""Batch renormalization of an (N, C, *) input; the fast path of the BatchRenorm layers.

    In training, normalizes with the batch statistics corrected by the clipped (r, d) and updates
    ``running_mean``/``running_var`` in place (no graph) following ``running_stats``; in eval it is
    ``F.batch_norm`` with the running statistics. Arguments mirror ``F.batch_norm``; ``r_max`` and
    ``d_max`` are the clipping limits (floats or 0-dim tensors); r_max = 1, d_max = 0 is BatchNorm.
    Supports first-order gradients only (use ``batch_renorm_reference`` for double backward).
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    verify_batch_size(input)
    y, batch_mean, batch_std = _BatchRenormFunction.apply(
        input, weight, bias, running_mean, running_var, r_max, d_max, eps
    )
    if running_mean is not None and running_var is not None:
        count = input.numel() // input.shape[1]
        update_running_stats(
            running_mean, running_var, batch_mean, batch_std, count, momentum, eps, running_stats
        )
    return y


def batch_renorm_reference(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: Limit = 1.0,
    d_max: Limit = 0.0,
    running_stats: str = "std",
) -> Tensor:
    r"""Algorithm 1 of the paper written out with autograd ops (slow, readable, twice differentiable).

    Same signature and semantics as :func:`batch_renorm`; the tests use it as ground truth.
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    verify_batch_size(input)
    dtype = _stats_dtype(input)
    shape = _channel_shape(input)
    dims = [0] + list(range(2, input.dim()))
    x = input.to(dtype)
    batch_var, batch_mean = torch.var_mean(x, dims, correction=0)
    batch_std = (batch_var + eps).sqrt()
    r, d = renorm_correction(
        batch_mean.detach(), batch_std.detach(), running_mean, running_var, eps, r_max, d_max
    )
    x_hat = (x - batch_mean.view(shape)) / batch_std.view(shape) * r.view(shape) + d.view(shape)
    y = x_hat
    if weight is not None:
        y = y * weight.to(dtype).view(shape)
    if bias is not None:
        y = y + bias.to(dtype).view(shape)
    if running_mean is not None and running_var is not None:
        count = input.numel() // input.shape[1]
        update_running_stats(
            running_mean,
            running_var,
            batch_mean.detach(),
            batch_std.detach(),
            count,
            momentum,
            eps,
            running_stats,
        )
    return y.to(input.dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _BatchRenorm(nn.Module):
    r"""Base of the batch renormalization layers (see the module docstring for the math).

    Deliberately *not* a subclass of ``torch.nn.modules.batchnorm._BatchNorm``: torch's converters
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) and other tools that test
    ``isinstance(m, _BatchNorm)`` would silently replace it by a plain (Sync)BatchNorm. It mirrors
    BatchNorm's parameters, buffers and state-dict versioning instead, so BatchNorm checkpoints load
    into it with ``strict=True`` and back, and ``torch.nn.utils.fusion.fuse_conv_bn_eval`` works.

    Args:
        num_features: channels C of an (N, C, *) input.
        eps: added to the variance inside the square root (BatchNorm's default 1e-5).
        momentum: weight a of the newest batch in the moving averages (PyTorch convention; the
            paper's alpha = 0.01). ``None``: cumulative average, as BatchNorm.
        affine: learnable per-channel gamma (and beta when ``bias``).
        bias: learnable beta (BatchNorm's keyword of the same name).
        r_max, d_max: clipping limits. With ``schedule="paper"`` the final values of the ramp; with
            ``"constant"`` fixed limits; with ``"external"`` the initial limits, changed later by
            :func:`set_renorm_limits` / :meth:`set_limits` (e.g. once per optimizer step).
        schedule: ``"paper"`` (default): r_max = 1, d_max = 0 for ``warmup_steps`` steps, then linear
            ramps reaching ``r_max`` after ``r_max_ramp_steps`` and ``d_max`` after
            ``d_max_ramp_steps`` more steps (paper: 5k, then 3 at 40k and 5 at 25k). The step is the
            layer's ``num_batches_tracked`` buffer, i.e. the number of training-mode forward
            passes; with gradient accumulation or several forwards per optimizer step use
            ``"external"`` and drive it with :func:`renorm_limits_at` of the optimizer step.
        running_stats: ``"std"`` (paper), ``"var"`` or ``"bn"`` (see module docstring).

    State: exactly BatchNorm's ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``. The schedule position is derived from ``num_batches_tracked`` (so it
    resumes from checkpoints and continues from a converted BatchNorm's count); limits set in
    ``"external"`` mode are plain attributes, not saved: set them again after loading.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        schedule: str = "paper",
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        running_stats: str = "std",
        device=None,
        dtype=None,
    ) -> None:
        if not eps > 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1] or None)")
        if not r_max >= 1.0:
            raise ValueError(f"Invalid r_max: {r_max} (must be >= 1)")
        if not d_max >= 0.0:
            raise ValueError(f"Invalid d_max: {d_max} (must be >= 0)")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {SCHEDULES})")
        if running_stats not in RUNNING_STATS:
            raise ValueError(
                f"Invalid running_stats: {running_stats!r} (expected one of {RUNNING_STATS})"
            )
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_ramp_steps", r_max_ramp_steps),
            ("d_max_ramp_steps", d_max_ramp_steps),
        ):
            if int(value) != value or value < 0:
                raise ValueError(f"Invalid {name}: {value} (must be an integer >= 0)")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        # Always tracked: renormalization is defined relative to the running statistics. The
        # attribute is kept for tools that duck-type on BatchNorm.
        self.track_running_stats = True
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.r_max_ramp_steps = int(r_max_ramp_steps)
        self.d_max_ramp_steps = int(d_max_ramp_steps)
        self.running_stats = running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    # -- BatchNorm-compatible housekeeping ------------------------------------------------------

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        limits = f"r_max={self.r_max}, d_max={self.d_max}, schedule={self.schedule!r}"
        if self.schedule == "paper":
            limits += (
                f", warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
                f"d_max_ramp_steps={self.d_max_ramp_steps}"
            )
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, {limits}, running_stats={self.running_stats!r}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            # As BatchNorm: checkpoints from before version 2 have no num_batches_tracked.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- schedule ------------------------------------------------------------------------------

    def renorm_config(self) -> dict:
        """Constructor keywords (besides num_features, eps, affine, bias) that define this layer."""
        return {
            "momentum": self.momentum,
            "r_max": self.r_max,
            "d_max": self.d_max,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "r_max_ramp_steps": self.r_max_ramp_steps,
            "d_max_ramp_steps": self.d_max_ramp_steps,
            "running_stats": self.running_stats,
        }

    def set_limits(self, r_max: float, d_max: float) -> None:
        """Set the clipping limits of a layer with ``schedule="external"``."""
        if self.schedule != "external":
            raise ValueError(
                f"set_limits needs schedule='external' (this layer uses {self.schedule!r})"
            )
        if not r_max >= 1.0:
            raise ValueError(f"Invalid r_max: {r_max} (must be >= 1)")
        if not d_max >= 0.0:
            raise ValueError(f"Invalid d_max: {d_max} (must be >= 0)")
        self.r_max, self.d_max = float(r_max), float(d_max)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) the next training forward will use, as floats (synchronizes a device)."""
        if self.schedule == "paper":
            return renorm_limits_at(
                int(self.num_batches_tracked),
                self.r_max,
                self.d_max,
                self.warmup_steps,
                self.r_max_ramp_steps,
                self.d_max_ramp_steps,
            )
        return self.r_max, self.d_max

    def _limits_for_forward(self) -> tuple[Limit, Limit]:
        if self.schedule != "paper":
            return self.r_max, self.d_max
        # Evaluated on the buffer's device: no host synchronization (and no graph break).
        step = self.num_batches_tracked.to(torch.float64)
        r_frac = _ramp_fraction(step, self.warmup_steps, self.r_max_ramp_steps)
        d_frac = _ramp_fraction(step, self.warmup_steps, self.d_max_ramp_steps)
        return 1.0 + (self.r_max - 1.0) * r_frac, self.d_max * d_frac

    # -- forward -------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        r_max, d_max = self._limits_for_forward()  # step t = forwards so far (0-based)
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        else:
            momentum = self.momentum
        return self._train_forward(input, r_max, d_max, momentum)

    def _train_forward(self, input: Tensor, r_max: Limit, d_max: Limit, momentum: float) -> Tensor:
        return batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            r_max,
            d_max,
            self.running_stats,
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization of (N, C) or (N, C, L) inputs; see :class:`_BatchRenorm`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization of (N, C, H, W) inputs; see :class:`_BatchRenorm`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization of (N, C, D, H, W) inputs; see :class:`_BatchRenorm`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


for _layer in (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d):
    # help(BatchRenorm2d) shows the full description of the arguments.
    _layer.__doc__ = (
        _layer.__doc__.replace("; see :class:`_BatchRenorm`.", ".")
        + "\n"
        + (_BatchRenorm.__doc__.split("\n", 1)[1])
    )


def set_renorm_limits(module: nn.Module, r_max: float, d_max: float) -> int:
    """Set (r_max, d_max) on every batch renormalization layer of ``module``.

    Every such layer must use ``schedule="external"`` (a ValueError names the first that does not,
    before anything is changed). Returns the number of layers updated. Typical use, once per
    optimizer step: ``set_renorm_limits(model, *renorm_limits_at(step))``.
    """
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchRenorm)]
    for name, layer in layers:
        if layer.schedule != "external":
            raise ValueError(
                f"set_renorm_limits needs schedule='external'; layer {name or '<root>'!r} "
                f"uses {layer.schedule!r}"
            )
    for _, layer in layers:
        layer.set_limits(r_max, d_max)
    return len(layers)
