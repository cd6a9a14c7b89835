"""A 3D convolution whose bias gradient is a sum over the output gradient, not oneDNN's.

In a channels-last float32 training step on the CPU, oneDNN's convolution backward with the bias gradient
asked took 0.10 s more than without it for Conv5_FC3's second layer at batch 4 (0.62 against 0.52 s; 0.04
and 0.03 s for the third and fourth) on a 2-core AVX2 EPYC, where torch's sum over the same gradient takes
0.04 s. Whole steps, alternating in one process: median 3.76-3.89 s against 4.15-4.18 s (13 of 14 pairs
faster). Contiguous tensors (bit for bit with the modules), autocast, GPUs and observed modules keep the
module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def applies(x: torch.Tensor, conv: nn.Module) -> bool:
    """For a module that no hook observes (the caller checks)."""
    return (type(conv) is nn.Conv3d and conv.bias is not None and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last_3d) and _channels_last(conv.weight)
            and not torch.is_autocast_enabled("cpu"))


def _channels_last(weight: torch.Tensor) -> bool:
    """Strides exactly channels-last's: a one-channel input or kernel is contiguous in both layouts, and a
    contiguous model's first layer must stay bit for bit the module's."""
    return weight.stride() == torch.empty_like(weight, memory_format=torch.channels_last_3d).stride()


def convolve(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    return _Convolution.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.arguments = (stride, padding, dilation, groups)
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.arguments
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0, 0], groups,
            [needs_x, needs_weight, False])
        grad_bias = grad.sum((0, 2, 3, 4)) if needs_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None
