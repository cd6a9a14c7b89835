"""ClinicaDL 1.x's convolutional networks, built from the input shape (never hard-coded sizes).

Module names (`convolutions`, `fc`) and layer order match ClinicaDL, so state dicts are interchangeable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fused import ConvBlocks
from .layers import layers
from .shapes import output_shape


class CNN(nn.Module):
    """convolutions -> fc; `in_shape` is (channels, *spatial)."""

    def __init__(self, convolutions: nn.Sequential, fc: nn.Sequential, in_shape: tuple[int, ...]):
        super().__init__()
        self.convolutions = convolutions
        self.fc = fc
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convolutions(x))


def _conv_block(kind, in_channels: int, out_channels: int, pool: bool, stride: int = 1) -> list[nn.Module]:
    block = [kind.conv(in_channels, out_channels, 3, padding=1, stride=stride), kind.norm(out_channels),
             nn.ReLU(inplace=True)]
    return block + [kind.pool(2, 2, nonnegative=True)] if pool else block


def _features(in_shape: tuple[int, ...], channels: tuple[int, ...], pool: bool, stride: int) -> nn.Sequential:
    kind = layers(len(in_shape) - 1)
    modules: list[nn.Module] = []
    previous = in_shape[0]
    for width in channels:
        modules += _conv_block(kind, previous, width, pool, stride)
        previous = width
    return ConvBlocks(*modules)


def _head(flat: int, hidden: tuple[int, ...], output_size: int, dropout: float) -> nn.Sequential:
    modules: list[nn.Module] = [nn.Flatten(), nn.Dropout(p=dropout)]
    previous = flat
    for width in hidden:
        modules += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    modules.append(nn.Linear(previous, output_size))
    return nn.Sequential(*modules)


def _build(in_shape, output_size, dropout, *, pool: bool, stride: int, hidden: tuple[int, ...]) -> CNN:
    convolutions = _features(in_shape, (8, 16, 32, 64, 128), pool, stride)
    shape = output_shape(convolutions, in_shape)
    return CNN(convolutions, _head(math.prod(shape), hidden, output_size, dropout), in_shape)


def conv5_fc3(in_shape: tuple[int, ...], output_size: int, dropout: float = 0.5) -> CNN:
    """Five conv-BN-ReLU-PadMaxPool blocks (8 to 128 channels), then FC 1300-50-out."""
    return _build(in_shape, output_size, dropout, pool=True, stride=1, hidden=(1300, 50))


def conv4_fc3(in_shape: tuple[int, ...], output_size: int, dropout: float = 0.5) -> CNN:
    """As ClinicaDL 1.x defines it: the same five blocks as Conv5_FC3 (sic), then FC 50-40-out."""
    return _build(in_shape, output_size, dropout, pool=True, stride=1, hidden=(50, 40))


def stride_conv5_fc3(in_shape: tuple[int, ...], output_size: int, dropout: float = 0.5) -> CNN:
    """Five conv-BN-ReLU blocks with stride 2 instead of pooling, then FC 1300-50-out."""
    return _build(in_shape, output_size, dropout, pool=False, stride=2, hidden=(1300, 50))
