"""BatchNorm -> ReLU -> 2x2 max pooling as one autograd node, pooling before normalising, keeping a third of the
activations, and BatchNorm on few channels in channels-last memory at the speed of many.

Step by step, autograd keeps the BatchNorm input (for its backward), the ReLU output (for ReLU's backward and
the pooling's) and the pooling indices. The ReLU output is the largest tensor of a 3D CNN's first block
(805 MB for Conv5_FC3 at batch 4 on 169x208x179 images). It is not needed: 2x2 pooling with stride 2 sends
each output gradient to exactly one input voxel (the index), and ReLU's gradient there is 1 where the pooled
value is positive, so masking the small pooled gradient first gives the same numbers as ReLU's backward
applied to the large one.

Nor is the normalised tensor needed at full size: BatchNorm is a per-channel affine map, increasing where its
scale is positive, and ReLU is increasing, so the maximum of relu(BatchNorm(x)) over a window is
relu(BatchNorm(max of x)) (of the minimum where the scale is negative). The node pools the convolution's output
and normalises the eighth that is left; in backward, BatchNorm's sums over dy and dy * x_hat run on that eighth
too (dy is zero elsewhere). At full size the forward only reads (statistics, pooling) and the backward no longer
reads dy and x for the sums (measured on Conv5_FC3's first block, batch 4, this AVX2 EPYC: forward 0.54 ->
0.43 s, backward 0.55 -> 0.43 s; a recalibration batch 1.22 -> 1.07 s, an evaluation batch 0.95 -> 0.75 s).

torch's channels-last BatchNorm kernels are 4x slower per voxel with 8 channels than with 16 (measured: 0.86 s
instead of 0.20 s for the forward of Conv5_FC3's first block, 0.93 s for its backward). In channels-last memory
a tensor with C channels is a matrix of rows of C values, so pairs of rows are rows of 2C values: the kernels
then run on 16 "channels", and the statistics of the pairs' halves are combined exactly (mean of means; mean
of variances plus variance of means).

Channels-last float32 on the CPU (training, BatchNorm recalibration and evaluation) runs this way, within
float32 rounding of the modules (other summation order); contiguous tensors and GPUs run torch's own kernels,
bit for bit, in training and the modules otherwise; SyncBatchNorm and hooks (interpretation) run the modules.
Under bfloat16 autocast on the CPU, channels-last blocks run this way too: the convolution gives bfloat16, the
node takes statistics in float32 (as torch's mixed kernels), pools the bfloat16 values (exact), normalises the
pooled eighth in float32 and returns the gradient in bfloat16, as close to float32 as the modules (which keep
a full-size float32 BatchNorm output); measured on an AVX512-BF16 EPYC, Conv5_FC3 batch 4 of 1 mm images, a
step runs 1.7 -> 4.0 img/s. Contiguous bfloat16 runs the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import convolution
from .layers import PadMaxPool

_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)
_CONVOLUTIONS = (nn.Conv2d, nn.Conv3d)
_WIDE = 16
"""Channels from which torch's channels-last BatchNorm kernels reach their speed."""
_BLOCK_BYTES = 4 << 20
"""Size of a block of rows (counted as float32) in the statistics pass: its scratch output stays in the cache
(4-16 MiB measured alike, 1 MiB 1.4x and 256 KiB 2x slower)."""


class ConvBlocks(nn.Sequential):
    """An nn.Sequential (same modules, same state-dict keys) that runs BatchNorm-ReLU-pool runs fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            block = modules[i:i + 3]
            if len(block) == 3 and _fusable(x, *block):
                norm, _, pool = block
                if not torch.is_grad_enabled() and _channels_last_cpu(x):
                    x = _pool_first(x, norm, pool)
                    i += 3
                    continue
                if torch.is_grad_enabled() and norm.training:
                    x = _fused(x, norm, pool, i > 0 and _unobserved_convolution(modules[i - 1]))
                    i += 3
                    continue
            if not torch.is_grad_enabled() and folding(x) > 1 and _plain_norm(x, modules[i]) and modules[i].training:
                x = _train_norm(x, modules[i])
            else:
                x = run_layer(modules[i], x)
            i += 1
        return x


def run_layer(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x); in float32 where torch 2.13's bfloat16 kernel on the CPU (oneDNN's AVX512-BF16) leaves the
    weight gradient undefined, NaN or different at each call: a 3D convolution, plain or transposed, whose input
    is 2 voxels deep and whose kernel is deeper than 1 (Conv5_FC3's last layer on 32-voxel patches). A
    channels-last float32 3D convolution in training takes its bias gradient as a sum (convolution.py)."""
    if _unobserved_convolution(module) and convolution.applies(x, module):
        return convolution.convolve(x, module)
    if (isinstance(module, nn.Conv3d | nn.ConvTranspose3d) and x.dim() == 5 and x.shape[2] == 2
            and module.kernel_size[0] > 1 and x.device.type == "cpu" and _cpu_bfloat16_autocast()):
        with torch.autocast("cpu", enabled=False):
            return module(x.float())
    return module(x)


def _cpu_bfloat16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _observed(module: nn.Module) -> bool:
    """Hooks may read or keep what the module sees or gives, so it must run as a module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _unobserved_convolution(module: nn.Module) -> bool:
    """Its output is held by nothing but the next module: torch's convolution backward keeps its input."""
    return (isinstance(module, _CONVOLUTIONS) and not _observed(module)
            and not nn.modules.module._global_forward_hooks)


def _plain_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """A BatchNorm module with running statistics that nothing observes, on float32 without autocast or on
    channels-last bfloat16 under the CPU's bfloat16 autocast."""
    return (type(norm) in _NORMS and norm.track_running_stats and norm.affine and x.device.type != "meta"
            and norm.weight.dtype == torch.float32 and _handled_precision(x) and not _observed(norm))


def _handled_precision(x: torch.Tensor) -> bool:
    if not torch.is_autocast_enabled(x.device.type):
        return x.dtype == torch.float32
    return x.dtype == torch.bfloat16 and _cpu_bfloat16_autocast() and _channels_last_cpu(x)


def _fusable(x: torch.Tensor, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (_plain_norm(x, norm) and isinstance(relu, nn.ReLU) and isinstance(pool, PadMaxPool)
            and pool.fast_path(x.shape) and not _observed(relu) and not _observed(pool))


def _channels_last_cpu(x: torch.Tensor) -> bool:
    """A CPU tensor whose memory is a matrix of rows of its channels (measured on CPUs only)."""
    if x.device.type != "cpu" or x.dim() not in (4, 5):
        return False
    return x.is_contiguous(memory_format=_layout(x))


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def folding(x: torch.Tensor) -> int:
    """How many rows of a channels-last tensor go into one row of the folded matrix (1: not folded)."""
    channels = x.shape[1]
    if not _channels_last_cpu(x) or channels >= _WIDE or _WIDE % channels:
        return 1
    k = _WIDE // channels
    return k if (x.numel() // channels) % k == 0 else 1


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The channels-last tensor as a matrix of k voxels' channels per row (a view)."""
    return x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1] * k)


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.view(like.shape[0], *like.shape[2:], like.shape[1]).permute(0, like.dim() - 1,
                                                                              *range(1, like.dim() - 1))


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """scale * x + shift per channel, on the folded matrix (torch's elementwise kernels are ~1.6x slower on a
    5D channels-last tensor broadcast over 8 channels)."""
    k = folding(x)
    rows = _rows(x, k)
    if shift is None:
        return _unrows(rows * scale.repeat(k), x)
    return _unrows(torch.addcmul(shift.repeat(k), rows, scale.repeat(k)), x)


def _statistics(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a folded tensor, from cache-sized blocks of its rows and their k
    column groups, combined in float64. CPUs have no statistics-only kernel (batch_norm_stats is CUDA's), so
    BatchNorm's training kernel writes its discarded output into one scratch block that stays in the cache
    instead of a full-size tensor: on Conv5_FC3's first block at batch 4, 0.44 -> 0.09 s in float32 and 0.21 ->
    0.08 s in bfloat16 alone (fresh pages included), epochs 4-8 % shorter in the trainer. And the blocks are exact
    where one float32 pass over the whole tensor drifts (its variance 0.8 % low there, at a mean 1.5 standard
    deviations from zero)."""
    rows = _rows(x, k)
    count, width = rows.shape
    step = max(1, _BLOCK_BYTES // (width * 4))
    starts = range(0, count, step)
    scratch = torch.empty(min(step, count), width, dtype=rows.dtype)
    means, invstds = torch.empty(len(starts), width), torch.empty(len(starts), width)
    ones, zeros = torch.ones(width), torch.zeros(width)
    for i, start in enumerate(starts):
        block = rows[start:start + step]
        torch.ops.aten.native_batch_norm.out(block, ones, zeros, None, None, True, 0.0, 0.0, out=scratch[:len(block)],
                                             save_mean=means[i], save_invstd=invstds[i])
    # a row holds k voxels' channels: each block gives k groups of rows per channel, all the block's size
    channels = width // k
    means, invstds = means.double().view(-1, channels), invstds.double().view(-1, channels)
    # with eps 0, torch writes invstd 0 for a block of zero variance (one row, or a constant background)
    variances = torch.where(invstds > 0, invstds.pow(-2), 0.0)
    sizes = torch.tensor([min(step, count - start) for start in starts], dtype=torch.float64)
    weights = sizes.repeat_interleave(k).div_(count * k).view(-1, 1)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)
    return mean.float(), var.float()


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
    mean, var = _statistics(x, k)
    _update_running(norm, mean, var, x.numel() // x.shape[1])
    return mean, var


@torch.no_grad()
def _train_norm(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    k = folding(x)
    return _normalise(x, norm.weight, norm.bias, *_batch_statistics(x, norm, k), norm.eps, k)


@torch.no_grad()
def _pool_first(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, pool: PadMaxPool) -> torch.Tensor:
    """Without gradients: evaluation (running statistics) or recalibration (the batch's, which update them)."""
    if norm.training:
        mean, var = _batch_statistics(x, norm, folding(x))
    else:
        mean, var = norm.running_mean, norm.running_var
    return _normalised_pool(x, norm.weight, norm.bias, mean, var, norm.eps, pool.padding_arguments(x.shape))[0]


def _normalised_pool(x, weight, bias, mean, var, eps: float, padding, indices: bool = False):
    """relu(BatchNorm(x)) max-pooled, from x pooled (its minimum where the scale is negative): the output, x at
    the voxels the pooling chose, and their indices if asked."""
    scale = weight * (var + eps).rsqrt()
    shift = bias - mean * scale
    negative = scale < 0
    sign = torch.where(negative, -1.0, 1.0).to(x.dtype)  # +-1: exact in bfloat16 too
    flip = bool(negative.any())  # BatchNorm's weights start at 1: in practice seldom
    pooled = _pool(_affine(x, sign) if flip else x, padding, indices)
    chosen = _affine(pooled[0], sign) if flip else pooled[0]
    return _affine(chosen, scale, shift).relu_(), chosen, pooled[1] if indices else None  # float32 output


def _fused(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, pool: PadMaxPool, overwrite: bool) -> torch.Tensor:
    """`overwrite`: x is a convolution's output, which nothing but this node keeps."""
    if _channels_last_cpu(x):
        k = folding(x)
        return _PoolFirstBatchNormReLU.apply(x, norm.weight, norm.bias, *_batch_statistics(x, norm, k), norm.eps,
                                             pool.padding_arguments(x.shape), k, overwrite)
    return _BatchNormReLUPool.apply(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, _next_batch(norm),
                                    norm.eps, pool.padding_arguments(x.shape))


def _pool(y: torch.Tensor, padding, indices: bool = True):
    pool = F.max_pool3d if y.dim() == 5 else F.max_pool2d
    return pool(y, 2, 2, padding=padding, return_indices=True) if indices else (pool(y, 2, 2, padding=padding), None)


def _unpool(grad, like, indices, padding) -> torch.Tensor:
    """The pooling's backward: the pooled gradient sent back to the chosen voxels."""
    backward = (torch.ops.aten.max_pool3d_with_indices_backward if like.dim() == 5
                else torch.ops.aten.max_pool2d_with_indices_backward)
    dims = like.dim() - 2
    # `like` stands in for the pooling's input: same shape and layout, and the kernel reads only the indices
    return backward(grad, like, [2] * dims, [2] * dims, list(padding), [1] * dims, False, indices)


def _add_at(full: torch.Tensor, pooled: torch.Tensor, indices: torch.Tensor, padding) -> None:
    """full += pooled sent back to the voxels the pooling chose, one image at a time: the pooling's backward
    makes a zeroed full-size tensor, 805 MB for Conv5_FC3's first block at batch 4, which the allocator often
    took from fresh pages (peak RSS +0.6-1.7 GiB over a run on an AVX2 EPYC); an image's is a quarter of that,
    freed and taken again at once. Adding through scatter_add_ or index_add_ instead was 1.1-2.4x slower."""
    k = folding(full[:1])
    for i in range(full.shape[0]):
        image = full[i:i + 1]
        _rows(image, k).add_(_rows(_unpool(pooled[i:i + 1], image, indices[i:i + 1], padding), k))


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
        # ReLU's gradient at the voxels the pooling chose
        grad_y = _unpool(torch.where(positive, grad, 0.0), x, indices, ctx.padding)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class _PoolFirstBatchNormReLU(torch.autograd.Function):
    """The same on channels-last CPU tensors, pooling first, with the batch statistics computed before (they also
    update the running ones). Backward: dy is the masked pooled gradient at the chosen voxels and zero elsewhere,
    so BatchNorm's sums of dy and dy * x_hat are sums over the pooled tensors (its eval-mode backward gives them);
    then dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) in two passes on the folded matrix."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, padding, k, overwrite):
        out, chosen, indices = _normalised_pool(x, weight, bias, mean, var, eps, padding, indices=True)
        ctx.save_for_backward(x, weight, mean, var, indices, chosen, out > 0)
        ctx.eps, ctx.padding, ctx.k, ctx.overwrite = eps, padding, k, overwrite
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var, indices, chosen, positive = ctx.saved_tensors
        k, eps = ctx.k, ctx.eps
        # ReLU's gradient at the chosen voxels, in the pooled tensors' layout
        grad = torch.where(positive, grad, 0.0).contiguous(memory_format=_layout(chosen))
        j = folding(chosen)
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            _rows(grad, j), _rows(chosen.to(grad.dtype), j), None, mean.repeat(j), var.repeat(j), None, None, False,
            eps, [False, True, True])
        grad_weight, grad_bias = grad_weight.view(j, -1).sum(0), grad_bias.view(j, -1).sum(0)
        count = x.numel() // x.shape[1]
        invstd = (var + eps).rsqrt()
        scale = weight * invstd
        slope = -scale * invstd * grad_weight / count
        offset = -scale * grad_bias / count - slope * mean
        rows = _rows(x, k)
        # written over x when ConvBlocks says nothing else holds it (a convolution's output: its backward keeps
        # its input, not its output), so that backward needs no third tensor of this size
        out = rows if ctx.overwrite else torch.empty_like(rows)
        if x.dtype == torch.float32:
            grad_x = torch.addcmul(offset.repeat(k), rows, slope.repeat(k), out=out)
        else:  # bfloat16, as the modules' gradient (see _mixed_affine)
            grad_x = _mixed_affine(rows, slope.repeat(k), offset.repeat(k), out)
        grad_x = _unrows(grad_x, x)
        # the pooled gradient, scaled (in float32, rounded once), added at the chosen voxels
        _add_at(grad_x, _affine(grad, scale).to(x.dtype), indices, ctx.padding)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _mixed_affine(rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """scale * rows + shift per column, bfloat16 rows and float32 coefficients, computed in float32 and rounded
    once, into `out` (which may be `rows`): BatchNorm's evaluation kernel with mean 0 and variance 1. An
    elementwise op mixing the two precisions converts through float32 copies instead, measured 20x slower."""
    torch.ops.aten.native_batch_norm.out(rows, scale, shift, torch.zeros_like(scale), torch.ones_like(scale), False,
                                         0.0, 0.0, out=out, save_mean=torch.empty(0), save_invstd=torch.empty(0))
    return out
