"""trivial and atrophy: real t1-linear brains with a hemisphere darkened, a known answer for networks and maps.

trivial: each subject is a real t1-linear image with one hemisphere darkened inside the brain: the left
for label AD, the right for label CN. A network must learn it; a saliency map must point to it.
atrophy: the left hemisphere is darkened by a random fraction (0 to --atrophy), written in the column
"atrophy": a quantity the images encode, for regression.
Each subject gets its own intensity scaling and noise, so no two generated images are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from clinicadl_app.core.atomic import atomic_path
from clinicadl_app.core.errors import MissingInputError, UsageError
from clinicadl_app.generate.dataset import demographics, finish, save_image, session, source_image
from clinicadl_app.images.templates import brain_mask, resample_nearest
from clinicadl_app.layouts.caps import Caps

TRIVIAL_SPLIT = """
[labels]
column = "diagnosis"
values = ["AD", "CN"]
[split]
n_test = 0.25
n_splits = 2
seed = 0
max_attempts = 20
"""
"""An experiment file's labels and 2-fold split for a trivial dataset (AD against CN), as the tests and
benchmarks draw them."""


@dataclass(frozen=True)
class Trivial:
    n_subjects: int = 40
    atrophy: float = 0.6
    """Fraction of intensity removed from the affected hemisphere."""
    downsample: int = 1
    """Integer factor: 2 gives 2 mm images (85x104x90), 8 times cheaper to train on, for tests."""
    seed: int = 0
    continuous: bool = False
    """Regression variant: a random atrophy fraction of the left hemisphere instead of two classes."""
    prefix: str = "TRIV"
    """Participant labels are sub-<prefix><number>."""
    sessions: int = 1
    """Above 1, each subject has 1 to this many sessions (ses-M000, ses-M012, ...): follow-up scans of its brain,
    each with its own intensity scaling and noise, so that longitudinal data meet the group level."""


def hemisphere(shape: tuple[int, ...], affine: np.ndarray, side: str) -> np.ndarray:
    """Voxels whose world x is left (< 0) or right (> 0) of the midline."""
    x = (affine @ np.vstack([np.indices(shape).reshape(3, -1), np.ones(int(np.prod(shape)))]))[0]
    return (x < 0 if side == "left" else x > 0).reshape(shape)


def generate_trivial(source: Caps, output: Path, settings: Trivial) -> pd.DataFrame:
    images, _ = source.index()
    if not images:
        raise MissingInputError(f"{source.root}: no t1-linear image to build the trivial dataset from")
    if settings.n_subjects > 2 * len(images):
        raise UsageError(
            f"{source.root}: {len(images)} source images make at most {2 * len(images)} subjects (each brain once "
            "per class); more would put the same brain twice under two names, which the leakage checks refuse"
        )
    rng = np.random.default_rng(settings.seed)
    caps = Caps(output / "caps")
    rows = []
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(settings.n_subjects):
        index = i // 2 % len(images)
        if index not in loaded:
            loaded[index] = source_image(source.t1_linear(images[index]), settings.downsample)
        data, affine = loaded[index]
        label = "AD" if i % 2 == 0 else "CN"
        side = "left" if label == "AD" or settings.continuous else "right"
        amount = float(rng.uniform(0, settings.atrophy)) if settings.continuous else settings.atrophy
        region = brain_mask(data.shape, affine) & hemisphere(data.shape, affine, side)
        region = ndimage.gaussian_filter(region.astype(np.float32), 1.0)
        participant_id = f"sub-{settings.prefix}{i:03d}"
        save_image(caps, session(participant_id), _scan(data, amount * region, rng), affine)
        rows.append({"participant_id": participant_id, "diagnosis": label, "atrophy": round(amount, 4),
                     **demographics(rng), "source": f"{images[index].participant_id}_{images[index].session_id}"})
        follow_ups = int(rng.integers(0, settings.sessions)) if settings.sessions > 1 else 0
        for year in range(1, follow_ups + 1):
            save_image(caps, session(participant_id, f"ses-M{12 * year:03d}"), _scan(data, amount * region, rng),
                       affine)
    write_masks(caps, *loaded[0])
    return finish(output, caps, "atrophy" if settings.continuous else "trivial", settings, rows, str(source.root))


def _scan(data: np.ndarray, loss: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One scan of a brain with `loss` (a fraction per voxel) removed: its own intensity scaling and noise."""
    noisy = data * float(rng.uniform(0.9, 1.1)) * (1 - loss)
    noisy = noisy + rng.normal(0, 0.01 * float(np.percentile(data, 99)), data.shape).astype(np.float32)
    return np.clip(noisy, 0, None)


def write_masks(caps: Caps, data: np.ndarray, affine: np.ndarray) -> None:
    """The built-in ROI masks on this dataset's grid (resampled when the images were downsampled), and the
    two brain hemispheres (roi leftHemisphere, rightHemisphere): ROIs where the trivial answer lies."""
    from importlib import resources

    source = resources.files("clinicadl_app") / "data" / "masks"
    for entry in source.iterdir():
        named = Caps.mask_name(Path(entry.name))
        if not named or not named[1]:
            continue
        with resources.as_file(entry) as path:
            mask_img = nib.load(str(path))
            out = resample_nearest(np.asanyarray(mask_img.dataobj) > 0, mask_img.affine, data.shape, affine)
        with atomic_path(caps.mask(named[0], cropped=True)) as tmp:
            nib.save(nib.Nifti1Image(out.astype(np.uint8), affine), str(tmp))
    inside = brain_mask(data.shape, affine)
    for side in ("left", "right"):
        with atomic_path(caps.mask(f"{side}Hemisphere", cropped=True)) as tmp:
            nib.save(nib.Nifti1Image((inside & hemisphere(data.shape, affine, side)).astype(np.uint8), affine),
                     str(tmp))
