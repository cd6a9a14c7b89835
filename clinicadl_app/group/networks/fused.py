"""BatchNorm -> ReLU -> 2x2 max pooling as one autograd node, keeping a third of the activations.

Step by step, autograd keeps the BatchNorm input (for its backward), the ReLU output (for ReLU's backward and
the pooling's) and the pooling indices. The ReLU output is the largest tensor of a 3D CNN's first block
(805 MB for Conv5_FC3 at batch 4 on 169x208x179 images). It is not needed: 2x2 pooling with stride 2 sends
each output gradient to exactly one input voxel (the index), and ReLU's gradient there is 1 where the pooled
value is positive, so masking the small pooled gradient first gives the same numbers, bit for bit, as
ReLU's backward applied to the large one. The kernels are torch's own (native_batch_norm and its backward,
max_pool with indices and its backward), in either memory layout.

Used only when training in float32 with gradients, on plain BatchNorm modules without hooks; everything else
(evaluation, BatchNorm recalibration, autocast, SyncBatchNorm, interpretation hooks) runs the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PadMaxPool

_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


class ConvBlocks(nn.Sequential):
    """An nn.Sequential (same modules, same state-dict keys) that runs BatchNorm-ReLU-pool runs fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            if i + 2 < len(modules) and _fusable(x, *modules[i:i + 3]):
                x = _fused(x, modules[i], modules[i + 2])
                i += 3
            else:
                x = modules[i](x)
                i += 1
        return x


def _fusable(x: torch.Tensor, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (type(norm) in _NORMS and isinstance(relu, nn.ReLU) and isinstance(pool, PadMaxPool)
            and norm.training and norm.track_running_stats and norm.affine and torch.is_grad_enabled()
            and x.dtype == torch.float32 == norm.weight.dtype and not torch.is_autocast_enabled(x.device.type)
            and pool.fast_path(x.shape) and not any(m._forward_hooks or m._forward_pre_hooks or
                                                    m._backward_hooks for m in (norm, relu, pool)))


def _fused(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, pool: PadMaxPool) -> torch.Tensor:
    """As nn.BatchNorm (momentum, or a cumulative average when momentum is None) then ReLU then pool."""
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return _BatchNormReLUPool.apply(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, factor,
                                    norm.eps, pool.padding_arguments(x.shape))


class _BatchNormReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, padding):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)
        y.relu_()
        pool = F.max_pool3d if x.dim() == 5 else F.max_pool2d
        out, indices = pool(y, 2, 2, padding=padding, return_indices=True)
        del y  # the point: not kept for backward
        ctx.save_for_backward(x, weight, mean, invstd, indices, out > 0)
        ctx.eps, ctx.padding = eps, padding
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, indices, positive = ctx.saved_tensors
        grad = torch.where(positive, grad, 0.0)  # ReLU's gradient at the voxels the pooling chose
        backward = (torch.ops.aten.max_pool3d_with_indices_backward if x.dim() == 5
                    else torch.ops.aten.max_pool2d_with_indices_backward)
        dims = x.dim() - 2
        # `x` stands in for the ReLU output: same shape and layout, and the kernel reads only the indices
        grad_y = backward(grad, x, [2] * dims, [2] * dims, list(ctx.padding), [1] * dims, False, indices)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_weight, grad_bias, None, None, None, None, None
