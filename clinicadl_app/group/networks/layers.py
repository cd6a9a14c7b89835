"""Layers ClinicaDL's architectures use that torch lacks, and a factory that makes them 2D or 3D.

Model code asks `layers(spatial_dims)` for its convolution, normalisation and pooling, so the same
architecture runs on 2D slices, small test volumes and full 169x208x179 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class PadMaxPool(nn.Module):
    """Max pooling that pads odd sizes first (ClinicaDL's PadMaxPool3d/2d), so no voxel is dropped.

    With `return_indices` it also returns the indices and the padding, for CropMaxUnpool.
    """

    def __init__(self, kernel_size: int, stride: int, spatial_dims: int = 3, return_indices: bool = False,
                 nonnegative: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.spatial_dims = kernel_size, stride, spatial_dims
        self.return_indices = return_indices
        self.nonnegative = nonnegative
        """Inputs are >= 0 (after a ReLU): zero padding then equals the pooling's own -inf padding."""

    def padding(self, shape: torch.Size) -> tuple[int, ...]:
        """F.pad order (last axis first), padding before each axis as ClinicaDL does."""
        pads: list[int] = []
        for size in reversed(shape[2:]):
            missing = (self.stride - size % self.stride) % self.stride
            pads += [missing, 0]
        return tuple(pads)

    def fast_path(self, shape: torch.Size) -> bool:
        """One voxel of padding before an odd axis gives the same windows as symmetric padding of one with the
        last, incomplete window dropped: then the pooling pads itself instead of copying a padded tensor."""
        return (self.nonnegative and not self.return_indices and self.kernel_size == 2 == self.stride
                and max(self.padding(shape)) <= 1)

    def padding_arguments(self, shape: torch.Size) -> tuple[int, ...]:
        """The fast path's `padding` argument of max_pool (first axis first)."""
        return tuple(self.padding(shape)[::2][::-1])

    def forward(self, x: torch.Tensor):
        pad = self.padding(x.shape)
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        if self.fast_path(x.shape):
            return pool(x, 2, 2, padding=self.padding_arguments(x.shape))
        if any(pad):
            x = F.pad(x, pad)
        if self.return_indices:
            out, indices = pool(x, self.kernel_size, self.stride, return_indices=True)
            return out, indices, pad
        return pool(x, self.kernel_size, self.stride)


class CropMaxUnpool(nn.Module):
    """Inverse of PadMaxPool: unpool with the saved indices, then remove the padding."""

    def __init__(self, kernel_size: int, stride: int, spatial_dims: int = 3):
        super().__init__()
        self.kernel_size, self.stride, self.spatial_dims = kernel_size, stride, spatial_dims

    def forward(self, x: torch.Tensor, indices: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
        unpool = F.max_unpool3d if self.spatial_dims == 3 else F.max_unpool2d
        out = unpool(x, indices, self.kernel_size, self.stride)
        starts = pad[::2][::-1]  # padding added before each axis, first axis first
        return out[(slice(None), slice(None), *(slice(s, None) for s in starts))]


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)


@dataclass(frozen=True)
class Layers:
    conv: type[nn.Module]
    conv_transpose: type[nn.Module]
    norm: type[nn.Module]
    spatial_dims: int

    def pool(self, kernel_size: int = 2, stride: int = 2, nonnegative: bool = False) -> PadMaxPool:
        return PadMaxPool(kernel_size, stride, self.spatial_dims, nonnegative=nonnegative)


def layers(spatial_dims: int) -> Layers:
    if spatial_dims == 3:
        return Layers(nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, 3)
    if spatial_dims == 2:
        return Layers(nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, 2)
    raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
