"""t1-linear recovers known transforms of real scans (rotations to 15 deg, shifts to 20 mm, scaling to 10 %,
with a smooth bias field and Rician noise): the mean displacement error over the brain stays under 1 mm."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from clinicadl_app.images import templates
from clinicadl_app.participant.t1_linear import run_t1_linear, transform_matrix

from .conftest import DEMO_SUBJECTS, demo_scan

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def brain_points() -> np.ndarray:
    """Template brain voxels (every 3rd) as homogeneous LPS coordinates, where the error is measured."""
    import ants

    mask = templates.image(templates.MNI_BRAIN_MASK)
    voxels = np.argwhere(mask.numpy()[::3, ::3, ::3] > 0.5) * 3
    points = [ants.transform_index_to_physical_point(mask, [int(v) for v in voxel]) for voxel in voxels]
    return np.c_[np.asarray(points), np.ones(len(points))]


def random_move(rng: np.random.Generator) -> np.ndarray:
    """A random RAS affine within the ranges the pipeline must handle."""
    move = np.eye(4)
    angles = rng.uniform(-15, 15, 3)
    scales = rng.uniform(0.9, 1.1, 3)
    move[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    move[:3, 3] = rng.uniform(-20, 20, 3)
    return move


def degrade(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random bias field of up to +-25 % over the field of view, and Rician noise with a standard
    deviation of 3 % of the median head intensity (an SNR of about 30, typical of a T1w MPRAGE)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij"), -1)
    log_field = grid @ rng.normal(0, 1, 3) + 0.5 * np.sin(np.pi * grid @ rng.normal(0, 1, 3))
    log_field *= np.log(1.25) / np.abs(log_field).max()
    sigma = 0.03 * float(np.median(data[data > np.percentile(data, 50)]))
    real = data * np.exp(log_field) + rng.normal(0, sigma, data.shape)
    imaginary = rng.normal(0, sigma, data.shape)
    return np.hypot(real, imaginary).astype(np.float32)


@pytest.mark.slow
def test_known_affines_are_recovered(tmp_path):
    source = demo_scan(DEMO_SUBJECTS[0])
    reference = transform_matrix(run_t1_linear(source, tmp_path / "ref").transform)
    points = brain_points()
    image = nib.load(str(source))
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    rng = np.random.default_rng(20261123)
    for draw in range(3):
        move = random_move(rng)
        moved_path = tmp_path / f"moved{draw}.nii.gz"
        nib.save(nib.Nifti1Image(degrade(data, rng), move @ image.affine), str(moved_path))
        result = run_t1_linear(moved_path, tmp_path / f"moved{draw}")
        recovered = transform_matrix(result.transform)
        expected = LPS @ move @ LPS @ reference  # template point -> original subject point -> moved point
        error = np.linalg.norm((expected @ points.T).T[:, :3] - (recovered @ points.T).T[:, :3], axis=1)
        shift = np.linalg.norm((reference @ points.T).T[:, :3] - (recovered @ points.T).T[:, :3], axis=1)
        assert shift.mean() > 5, "the move was too small to test anything"
        assert error.mean() < 1.0, f"draw {draw}: mean displacement error {error.mean():.2f} mm"
        assert result.qc.passed
