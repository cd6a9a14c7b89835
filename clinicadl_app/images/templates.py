"""The templates bundled with the package (see data/LICENSES.md); nothing is downloaded at run time."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

MNI_T1 = "tpl-MNI152NLin2009cSym_res-1_T1w.nii.gz"
MNI_BRAIN_MASK = "tpl-MNI152NLin2009cSym_res-1_desc-brain_mask.nii.gz"
COLIN_T1_2MM = "tpl-Colin27_res-2_T1w.nii.gz"
COLIN_TO_MNI = "from-Colin27_to-MNI152NLin2009cSym_mode-image_xfm.mat"

GRID_SHAPE = (193, 229, 193)
"""The MNI152NLin2009cSym 1 mm grid Clinica's t1-linear resamples onto (origin -96, -132, -78 mm)."""
CROP = (slice(12, 181), slice(13, 221), slice(0, 179))
"""Clinica's crop box on that grid; it gives ClinicaDL's 169x208x179 input."""
CROPPED_SHAPE = (169, 208, 179)


def path(name: str) -> Path:
    """Bundled files live on disk inside the installed package (a wheel or the container image)."""
    return Path(str(resources.files("clinicadl_app") / "data" / "templates" / name))


@cache
def image(name: str):  # -> ants.ANTsImage
    import ants

    return ants.image_read(str(path(name)), pixeltype="float")


def cropped_affine(affine: np.ndarray) -> np.ndarray:
    """Affine of the crop box: the same space, origin moved to the box's first voxel."""
    shift = np.eye(4)
    shift[:3, 3] = [CROP[0].start, CROP[1].start, CROP[2].start]
    return affine @ shift


def resample_nearest(mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, ...],
                     affine: np.ndarray) -> np.ndarray:
    """An image (binary or not) brought onto another grid of the same space by nearest neighbour; 0 outside."""
    voxels = np.indices(shape).reshape(3, -1)
    world = affine @ np.vstack([voxels, np.ones(voxels.shape[1])])
    inside = np.rint(np.linalg.solve(mask_affine, world)[:3]).astype(int)
    valid = np.all((inside >= 0) & (inside < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros(voxels.shape[1], dtype=mask.dtype)
    out[valid] = mask[tuple(inside[:, valid])]
    return out.reshape(shape)


def brain_mask(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The template brain mask on any grid of the template space (cropped, downsampled...); read-only: the
    images of a CAPS share their grid, so it is computed once per grid (0.8 s each at 1 mm)."""
    return _brain_mask(tuple(int(n) for n in shape), tuple(np.asarray(affine, dtype=float).ravel().tolist()))


@cache
def _brain_mask(shape: tuple[int, ...], affine: tuple[float, ...]) -> np.ndarray:
    import nibabel as nib

    mask_img = nib.load(str(path(MNI_BRAIN_MASK)))
    mask = resample_nearest(np.asanyarray(mask_img.dataobj) > 0.5, mask_img.affine, shape,
                            np.array(affine).reshape(4, 4))
    mask.setflags(write=False)
    return mask


def template_on(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The MNI T1 template on any grid of its space: the background maps are drawn over."""
    import nibabel as nib

    template = nib.load(str(path(MNI_T1)))
    return resample_nearest(np.asanyarray(template.dataobj, dtype=np.float32), template.affine, shape, affine)
