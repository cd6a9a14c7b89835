"""How each mode cuts parts out of an image tensor of shape (1, X, Y, Z), exactly as ClinicaDL 1.x does.

Shared by tensor extraction (participant level) and by the datasets that cut parts on the fly.
"""

from __future__ import annotations

import numpy as np
import torch


def patch_grid(shape: tuple[int, ...], size: int, stride: int) -> tuple[int, int, int]:
    """Patches along each axis of a (X, Y, Z) volume; a remainder smaller than a patch is dropped."""
    if any(dim < size for dim in shape):
        raise ValueError(f"patch size {size} exceeds the image size {tuple(shape)}")
    return tuple((dim - size) // stride + 1 for dim in shape)  # type: ignore[return-value]


def patches(image: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """All patches, in ClinicaDL's order, shape (N, 1, size, size, size)."""
    patch_grid(tuple(image.shape[1:]), size, stride)
    unfolded = image.unfold(1, size, stride).unfold(2, size, stride).unfold(3, size, stride)
    return unfolded.contiguous().view(-1, size, size, size).unsqueeze(1)


def patch_at(image: torch.Tensor, size: int, stride: int, index: int) -> torch.Tensor:
    """Patch number `index` of `patches()` without cutting the others, shape (1, size, size, size)."""
    _, ny, nz = patch_grid(tuple(image.shape[1:]), size, stride)
    i, rest = divmod(index, ny * nz)
    j, k = divmod(rest, nz)
    x, y, z = i * stride, j * stride, k * stride
    return image[:, x : x + size, y : y + size, z : z + size].clone()


def slice_indices(shape: tuple[int, ...], direction: int, discard: tuple[int, int]) -> range:
    """Indices of the slices kept along `direction` of a (X, Y, Z) volume."""
    kept = range(discard[0], shape[direction] - discard[1])
    if len(kept) <= 0:
        raise ValueError(f"discarding {discard} slices leaves none of the {shape[direction]} along axis {direction}")
    return kept


def slice_of(image: torch.Tensor, direction: int, index: int, channels: str) -> torch.Tensor:
    """One slice as (1, H, W), or (3, H, W) with the same slice repeated for 'rgb'."""
    part = image.select(direction + 1, index)
    if channels == "rgb":
        part = torch.cat((part, part, part))
    return part.clone()


def roi_of(image: torch.Tensor, mask: np.ndarray, uncrop: bool) -> torch.Tensor:
    """The image times a binary mask, cut to the mask's bounding box unless `uncrop`."""
    if mask.shape != tuple(image.shape[1:]):
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {tuple(image.shape[1:])}")
    masked = image * torch.from_numpy(mask.astype(np.float32))
    if uncrop:
        return masked.float().clone()
    return masked[(slice(None), *bounding_box(mask))].float().clone()


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every non-zero voxel of a 3D mask."""
    if not mask.any():
        raise ValueError("the mask is empty")
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def patch_region(shape: tuple[int, ...], size: int, stride: int, index: int) -> tuple[slice, slice, slice]:
    """Where patch number `index` lies in the (X, Y, Z) volume it was cut from (the inverse of patch_at)."""
    _, ny, nz = patch_grid(shape, size, stride)
    i, rest = divmod(index, ny * nz)
    j, k = divmod(rest, nz)
    return tuple(slice(a * stride, a * stride + size) for a in (i, j, k))  # type: ignore[return-value]


def slice_region(direction: int, index: int) -> tuple[slice, slice, slice]:
    """Where slice `index` lies in the volume: one voxel thick along `direction`."""
    region = [slice(None)] * 3
    region[direction] = slice(index, index + 1)
    return tuple(region)  # type: ignore[return-value]
