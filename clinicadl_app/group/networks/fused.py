"""BatchNorm -> ReLU -> 2x2 max pooling as one autograd node, keeping a third of the activations, and BatchNorm
on few channels in channels-last memory at the speed of many.

Step by step, autograd keeps the BatchNorm input (for its backward), the ReLU output (for ReLU's backward and
the pooling's) and the pooling indices. The ReLU output is the largest tensor of a 3D CNN's first block
(805 MB for Conv5_FC3 at batch 4 on 169x208x179 images). It is not needed: 2x2 pooling with stride 2 sends
each output gradient to exactly one input voxel (the index), and ReLU's gradient there is 1 where the pooled
value is positive, so masking the small pooled gradient first gives the same numbers as ReLU's backward
applied to the large one.

torch's channels-last BatchNorm kernels are 4x slower per voxel with 8 channels than with 16 (measured: 0.86 s
instead of 0.20 s for the forward of Conv5_FC3's first block, 0.93 s for its backward; together 40 % of a
training step). In channels-last memory a tensor with C channels is a matrix of rows of C values, so pairs of
rows are rows of 2C values: the kernels then run on 16 "channels", and the statistics of the pairs' halves are
combined exactly (mean of means; mean of variances plus variance of means). Those blocks are not bit-identical
to the modules (other summation order, within float32 rounding); every other block runs torch's own kernels,
bit for bit.

Used only in float32 training (with or without gradients: BatchNorm recalibration) on plain BatchNorm modules
without hooks; everything else (evaluation, autocast, SyncBatchNorm, interpretation hooks) runs the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PadMaxPool

_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)
_CONVOLUTIONS = (nn.Conv2d, nn.Conv3d)
_WIDE = 16
"""Channels from which torch's channels-last BatchNorm kernels reach their speed."""


class ConvBlocks(nn.Sequential):
    """An nn.Sequential (same modules, same state-dict keys) that runs BatchNorm-ReLU-pool runs fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            if i + 2 < len(modules) and torch.is_grad_enabled() and _fusable(x, *modules[i:i + 3]):
                x = _fused(x, modules[i], modules[i + 2], i > 0 and _unobserved_convolution(modules[i - 1]))
                i += 3
            elif not torch.is_grad_enabled() and folding(x) > 1 and _plain_norm(x, modules[i]):
                x = _train_norm(x, modules[i])
                i += 1
            else:
                x = modules[i](x)
                i += 1
        return x


def _observed(module: nn.Module) -> bool:
    """Hooks may read or keep what the module sees or gives, so it must run as a module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _unobserved_convolution(module: nn.Module) -> bool:
    """Its output is held by nothing but the next module: torch's convolution backward keeps its input."""
    return (isinstance(module, _CONVOLUTIONS) and not _observed(module)
            and not nn.modules.module._global_forward_hooks)


def _plain_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """A BatchNorm module in training mode that nothing observes, on float32 without autocast."""
    return (type(norm) in _NORMS and norm.training and norm.track_running_stats and norm.affine
            and x.dtype == torch.float32 == norm.weight.dtype and not torch.is_autocast_enabled(x.device.type)
            and not _observed(norm))


def _fusable(x: torch.Tensor, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (_plain_norm(x, norm) and isinstance(relu, nn.ReLU) and isinstance(pool, PadMaxPool)
            and pool.fast_path(x.shape) and not _observed(relu) and not _observed(pool))


def folding(x: torch.Tensor) -> int:
    """How many rows of a channels-last tensor go into one row of the folded matrix (1: not folded)."""
    if x.device.type != "cpu" or x.dim() not in (4, 5):  # measured on CPUs only
        return 1
    channels = x.shape[1]
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if channels >= _WIDE or _WIDE % channels or not x.is_contiguous(memory_format=layout):
        return 1
    k = _WIDE // channels
    return k if (x.numel() // channels) % k == 0 else 1


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The channels-last tensor as a matrix of k voxels' channels per row (a view)."""
    return x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1] * k)


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.view(like.shape[0], *like.shape[2:], like.shape[1]).permute(0, like.dim() - 1,
                                                                              *range(1, like.dim() - 1))


def _statistics(x: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a folded tensor, combined from its k column groups."""
    rows = _rows(x, k)
    width = rows.shape[1]
    # the kernel's normalised output is discarded: CPUs have no statistics-only kernel (batch_norm_stats is
    # CUDA's), and this pass still costs a quarter of the 8-channel one
    _, means, invstd = torch.ops.aten.native_batch_norm(rows, torch.ones(width), torch.zeros(width), None, None,
                                                       True, 0.0, eps)
    means = means.view(k, -1)
    mean = means.mean(0)
    return mean, (invstd.view(k, -1).pow(-2) - eps + (means - mean).square()).mean(0)


def _normalise(x: torch.Tensor, weight, bias, mean, var, eps: float, k: int) -> torch.Tensor:
    y = torch.ops.aten.native_batch_norm(_rows(x, k), weight.repeat(k), bias.repeat(k), mean.repeat(k),
                                         var.repeat(k), False, 0.0, eps)[0]
    return _unrows(y, x)


def _next_batch(norm: nn.modules.batchnorm._BatchNorm) -> float:
    """Counts the batch; the running statistics' update factor, as nn.BatchNorm: its momentum, or a cumulative
    average when momentum is None."""
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def _update_running(norm: nn.modules.batchnorm._BatchNorm, mean, var, count: int) -> None:
    """As nn.BatchNorm, with the unbiased variance."""
    factor = _next_batch(norm)
    norm.running_mean.lerp_(mean, factor)
    norm.running_var.lerp_(var * (count / max(count - 1, 1)), factor)


@torch.no_grad()
def _batch_statistics(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, k: int):
    """The folded batch's mean and biased variance, after updating the module's running statistics with them."""
    mean, var = _statistics(x, k, norm.eps)
    _update_running(norm, mean, var, x.numel() // x.shape[1])
    return mean, var


@torch.no_grad()
def _train_norm(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    k = folding(x)
    return _normalise(x, norm.weight, norm.bias, *_batch_statistics(x, norm, k), norm.eps, k)


def _fused(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, pool: PadMaxPool, overwrite: bool) -> torch.Tensor:
    """`overwrite`: x is a convolution's output, which nothing but this node keeps."""
    k = folding(x)
    if k > 1:
        return _FoldedBatchNormReLUPool.apply(x, norm.weight, norm.bias, *_batch_statistics(x, norm, k), norm.eps,
                                              pool.padding_arguments(x.shape), k, overwrite)
    return _BatchNormReLUPool.apply(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, _next_batch(norm),
                                    norm.eps, pool.padding_arguments(x.shape))


def _pool(y: torch.Tensor, padding) -> tuple[torch.Tensor, torch.Tensor]:
    return (F.max_pool3d if y.dim() == 5 else F.max_pool2d)(y, 2, 2, padding=padding, return_indices=True)


def _unpool(grad, positive, like, indices, padding) -> torch.Tensor:
    """The pooling's and ReLU's backward: the masked pooled gradient sent back to the chosen voxels."""
    grad = torch.where(positive, grad, 0.0)  # ReLU's gradient at the voxels the pooling chose
    backward = (torch.ops.aten.max_pool3d_with_indices_backward if like.dim() == 5
                else torch.ops.aten.max_pool2d_with_indices_backward)
    dims = like.dim() - 2
    # `like` stands in for the ReLU output: same shape and layout, and the kernel reads only the indices
    return backward(grad, like, [2] * dims, [2] * dims, list(padding), [1] * dims, False, indices)


class _BatchNormReLUPool(torch.autograd.Function):
    """torch's kernels (native_batch_norm, max_pool with indices, and their backwards): bit for bit the modules."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, padding):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)
        out, indices = _pool(y.relu_(), padding)
        del y  # the point: not kept for backward
        ctx.save_for_backward(x, weight, mean, invstd, indices, out > 0)
        ctx.eps, ctx.padding = eps, padding
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, indices, positive = ctx.saved_tensors
        grad_y = _unpool(grad, positive, x, indices, ctx.padding)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class _FoldedBatchNormReLUPool(torch.autograd.Function):
    """The same on the folded matrix, with the batch statistics computed before (they also update the running
    ones). Backward: BatchNorm's eval-mode backward gives the per-column sums of dy and dy * x_hat, which fold
    into the channels' sums; then dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) in two passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, padding, k, overwrite):
        out, indices = _pool(_normalise(x, weight, bias, mean, var, eps, k).relu_(), padding)
        ctx.save_for_backward(x, weight, mean, var, indices, out > 0)
        ctx.eps, ctx.padding, ctx.k, ctx.overwrite = eps, padding, k, overwrite
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var, indices, positive = ctx.saved_tensors
        k, eps = ctx.k, ctx.eps
        grad_y = _rows(_unpool(grad, positive, x, indices, ctx.padding), k)
        rows = _rows(x, k)
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, rows, None, mean.repeat(k), var.repeat(k), None, None, False, eps, [False, True, True])
        grad_weight, grad_bias = grad_weight.view(k, -1).sum(0), grad_bias.view(k, -1).sum(0)
        count = rows.shape[0] * k
        invstd = (var + eps).rsqrt()
        scale = weight * invstd
        slope = -scale * invstd * grad_weight / count
        offset = -scale * grad_bias / count - slope * mean
        # written over x when ConvBlocks says nothing else holds it (a convolution's output: its backward keeps
        # its input, not its output), so that backward needs no third tensor of this size
        grad_x = torch.addcmul(offset.repeat(k), rows, slope.repeat(k), out=rows if ctx.overwrite else None)
        grad_x.addcmul_(grad_y, scale.repeat(k))
        return _unrows(grad_x, x), grad_weight, grad_bias, None, None, None, None, None, None
