"""Output shapes of the networks' layers by arithmetic, for building heads and checking that inputs fit.

Running a module on the meta device gives the same answer, but its first use in a process imports torch's
decomposition and dynamo machinery (1-2 s): half the time of a short predict run, which builds its models but
never trains. Layers without a rule here still go through the meta device.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .layers import PadMaxPool

_SAME_SHAPE = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Dropout,
               nn.Identity, nn.Sigmoid, nn.Tanh)


class _NoRule(Exception):
    pass


def output_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the module's output for one input of shape `in_shape` (channels first, no batch axis)."""
    try:
        return _shape(module, tuple(in_shape))
    except _NoRule:
        meta = copy.deepcopy(module).to("meta")
        with torch.no_grad():
            return tuple(meta(torch.empty(1, *in_shape, device="meta")).shape[1:])


def _shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    from .cnn import CNN
    from .resnet import BasicBlock

    if isinstance(module, _SAME_SHAPE):
        return shape
    if isinstance(module, CNN):
        return _shape(module.fc, _shape(module.convolutions, shape))
    if type(module) is nn.Sequential or _plain_sequence(module):
        for layer in module:
            shape = _shape(layer, shape)
        return shape
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        if isinstance(module.padding, str) or module.in_channels != shape[0]:
            raise _NoRule
        return (module.out_channels, *_sliding(shape[1:], module.kernel_size, module.stride, module.padding,
                                               module.dilation, False))
    if isinstance(module, (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)):
        dims = len(shape) - 1
        dilation = getattr(module, "dilation", 1)
        return (shape[0], *_sliding(shape[1:], *(_tuple(v, dims) for v in (module.kernel_size, module.stride or
                                    module.kernel_size, module.padding, dilation)), module.ceil_mode))
    if isinstance(module, PadMaxPool) and not module.return_indices:
        spatial = [size + (module.stride - size % module.stride) % module.stride for size in shape[1:]]
        return (shape[0], *_sliding(spatial, module.kernel_size, module.stride, 0, 1, False))
    if isinstance(module, BasicBlock):
        out = _shape(module.bn2, _shape(module.conv2, _shape(module.conv1, shape)))
        identity = shape if module.downsample is None else _shape(module.downsample, shape)
        if identity != out:
            raise RuntimeError(f"a residual block adds shapes {identity} and {out}")
        return out
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return (math.prod(shape),)
    if isinstance(module, nn.Linear):
        if shape != (module.in_features,):
            raise RuntimeError(f"a linear layer of {module.in_features} inputs receives shape {shape}")
        return (module.out_features,)
    raise _NoRule


def _plain_sequence(module: nn.Module) -> bool:
    """A Sequential subclass whose forward computes what nn.Sequential's does (ConvBlocks: fused, same result)."""
    from .fused import ConvBlocks

    return isinstance(module, ConvBlocks)


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _sliding(sizes, kernel, stride, padding, dilation, ceil_mode: bool) -> tuple[int, ...]:
    """torch's output size of a convolution or pooling window along each axis."""
    dims = len(sizes)
    out = []
    for n, k, s, p, d in zip(sizes, *(_tuple(v, dims) for v in (kernel, stride, padding, dilation)), strict=True):
        span = n + 2 * p - d * (k - 1) - 1
        size = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (size - 1) * s >= n + p:  # the last window must start inside the input
            size -= 1
        if size < 1:
            raise RuntimeError(f"an axis of {n} voxels is too small for a window of {k} (stride {s}, padding {p})")
        out.append(size)
    return tuple(out)
