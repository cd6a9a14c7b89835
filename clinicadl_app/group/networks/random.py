"""ClinicaDL's "random" architecture family: a CNN described by a few numbers that a search samples.

Block i has `n_conv` convolution-normalisation-ReLU layers with min(first_conv_width * 2**i, channels_limit)
channels, then halves the grid (max pooling, or a stride-2 last convolution). The head has `n_fcblocks`
linear layers whose widths shrink geometrically from the flattened features to the output, as ClinicaDL's.
The description is the [train] settings themselves, so a MAPS record rebuilds the network exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .cnn import CNN, output_shape
from .fused import ConvBlocks
from .layers import layers

NORMALISATIONS = ("BatchNorm", "InstanceNorm", "GroupNorm")


@dataclass(frozen=True)
class RandomSpec:
    n_convblocks: int = 3
    first_conv_width: int = 8
    n_conv: int = 1
    channels_limit: int = 128
    d_reduction: str = "MaxPooling"
    network_normalization: str = "BatchNorm"
    n_fcblocks: int = 2

    def __post_init__(self) -> None:
        if min(self.n_convblocks, self.first_conv_width, self.n_conv, self.channels_limit, self.n_fcblocks) < 1:
            raise ValueError("the random architecture's block counts and widths must be at least 1")
        if self.d_reduction not in ("MaxPooling", "stride"):
            raise ValueError(f"d_reduction must be MaxPooling or stride, not {self.d_reduction!r}")
        if self.network_normalization not in NORMALISATIONS:
            raise ValueError(f"network_normalization must be one of {', '.join(NORMALISATIONS)}")


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "BatchNorm":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "InstanceNorm":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def random_cnn(in_shape: tuple[int, ...], output_size: int, dropout: float, spec: RandomSpec) -> CNN:
    kind = layers(len(in_shape) - 1)
    modules: list[nn.Module] = []
    previous = in_shape[0]
    for block in range(spec.n_convblocks):
        width = min(spec.first_conv_width * 2**block, spec.channels_limit)
        for layer in range(spec.n_conv):
            stride = 2 if spec.d_reduction == "stride" and layer == spec.n_conv - 1 else 1
            modules += [kind.conv(previous, width, 3, padding=1, stride=stride),
                        _norm(spec.network_normalization, width, kind.spatial_dims), nn.ReLU(inplace=True)]
            previous = width
        if spec.d_reduction == "MaxPooling":
            modules.append(kind.pool(2, 2, nonnegative=True))
    convolutions = ConvBlocks(*modules)
    flat = math.prod(output_shape(convolutions, in_shape))
    ratio = (flat / output_size) ** (1 / spec.n_fcblocks)
    head: list[nn.Module] = [nn.Flatten(), nn.Dropout(p=dropout)]
    width = flat
    for _ in range(spec.n_fcblocks - 1):
        narrower = max(int(width / ratio), output_size)
        head += [nn.Linear(width, narrower), nn.ReLU()]
        width = narrower
    head.append(nn.Linear(width, output_size))
    return CNN(convolutions, nn.Sequential(*head), in_shape)
