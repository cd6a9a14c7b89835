"""Part extraction agrees with ClinicaDL 1.x's algorithms (unfold order, slice layout, ROI bounding box)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinicadl_app.images import modes


@pytest.fixture
def volume() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 61, 72, 55), generator=generator)


def test_patch_at_matches_unfold_order(volume):
    size, stride = 20, 15
    every = modes.patches(volume, size, stride)
    grid = modes.patch_grid(tuple(volume.shape[1:]), size, stride)
    assert every.shape == (int(np.prod(grid)), 1, size, size, size)
    # ClinicaDL: image.unfold(1..3).contiguous().view(-1, s, s, s)[index]
    reference = volume.unfold(1, size, stride).unfold(2, size, stride).unfold(3, size, stride)
    reference = reference.contiguous().view(-1, size, size, size)
    for index in range(every.shape[0]):
        assert torch.equal(modes.patch_at(volume, size, stride, index)[0], reference[index])
        assert torch.equal(every[index, 0], reference[index])


def test_full_size_patches_count():
    assert modes.patch_grid((169, 208, 179), 50, 50) == (3, 4, 3)
    with pytest.raises(ValueError):
        modes.patch_grid((40, 208, 179), 50, 50)


@pytest.mark.parametrize("direction", [0, 1, 2])
def test_slices(volume, direction):
    kept = modes.slice_indices(tuple(volume.shape[1:]), direction, (3, 5))
    assert kept == range(3, volume.shape[direction + 1] - 5)
    rgb = modes.slice_of(volume, direction, kept[0], "rgb")
    single = modes.slice_of(volume, direction, kept[0], "single")
    expected = volume.select(direction + 1, kept[0])
    assert torch.equal(single, expected) and rgb.shape[0] == 3 and torch.equal(rgb[2:], expected)
    with pytest.raises(ValueError):
        modes.slice_indices(tuple(volume.shape[1:]), direction, (40, 40))


def test_roi_box_and_uncropped(volume):
    mask = np.zeros(volume.shape[1:], dtype=bool)
    mask[10:20, 5:9, 30:41] = True
    mask[12, 6, 31] = False  # a hole stays zero
    roi = modes.roi_of(volume, mask, uncrop=False)
    assert roi.shape == (1, 10, 4, 11)
    assert roi[0, 2, 1, 1] == 0 and torch.equal(roi[0, 0, 0], volume[0, 10, 5, 30:41])
    full = modes.roi_of(volume, mask, uncrop=True)
    assert full.shape == volume.shape and float(full[0, ~torch.from_numpy(mask)].abs().sum()) == 0
