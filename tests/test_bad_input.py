"""Bad input: one clear line per problem naming the file and the fix; the other subjects complete; nothing
already written is damaged."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clinicadl_app.core.errors import ExitCode

from .conftest import DEMO, DEMO_SUBJECTS, demo_scan, make_bids, run_app

GOOD = DEMO_SUBJECTS[2]


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]) if affine is None else affine), str(path))


@pytest.fixture
def bad_bids(tmp_path) -> Path:
    bids = make_bids(tmp_path / "bad" / "bids", {"sub-good/anat/sub-good_T1w.nii.gz": demo_scan(GOOD)})
    real = nib.load(str(demo_scan(GOOD)))
    data = np.asanyarray(real.dataobj, dtype=np.float32)
    save(bids / "sub-fourd/anat/sub-fourd_T1w.nii.gz", np.stack([data, data], -1), real.affine)
    save(bids / "sub-flat/anat/sub-flat_T1w.nii.gz", data[:, :, 40], real.affine)
    with_nan = data.copy()
    with_nan[50:60, 50:60, 40:45] = np.nan
    save(bids / "sub-nan/anat/sub-nan_T1w.nii.gz", with_nan, real.affine)
    save(bids / "sub-zero/anat/sub-zero_T1w.nii.gz", np.zeros_like(data), real.affine)
    truncated = bids / "sub-cut/anat/sub-cut_T1w.nii.gz"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(demo_scan(GOOD).read_bytes()[: 200_000])
    notgzip = bids / "sub-junk/anat/sub-junk_T1w.nii.gz"
    notgzip.parent.mkdir(parents=True)
    notgzip.write_bytes(gzip.compress(b"this is not a NIfTI file" * 100))
    return bids


@pytest.mark.slow
def test_each_bad_image_fails_alone_with_its_fix_and_a_failed_overwrite_keeps_outputs(bad_bids, tmp_path):
    out = tmp_path / "out"
    done = run_app(bad_bids, out, "participant", "--skip_bids_validator", "--n_cpus", "2")
    assert done.returncode == ExitCode.DATA_ERROR
    assert "Traceback" not in done.stderr
    expected = {
        "sub-fourd": "must be 3D", "sub-flat": "must be 3D", "sub-nan": "NaN",
        "sub-zero": "constant", "sub-cut": "truncated or corrupt", "sub-junk": "not a readable NIfTI",
    }
    for participant, fragment in expected.items():
        lines = [line for line in done.stderr.splitlines() if f"{participant}_T1w.nii.gz" in line and "ERROR" in line]
        assert lines and fragment in lines[0], (participant, done.stderr)
    assert "6 failed" in done.stderr
    good = out / "caps/subjects/sub-good/ses-M000/t1_linear/sub-good_ses-M000_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
    assert good.exists(), "a good subject must complete beside bad ones"
    assert not (out / "caps/subjects/sub-nan").exists()

    # the good subject's source is damaged after that run: --overwrite fails it and keeps what it wrote
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "caps").rglob("*") if p.is_file()}
    source = bad_bids / "sub-good/anat/sub-good_T1w.nii.gz"
    source.write_bytes(source.read_bytes()[:100_000])
    again = run_app(bad_bids, out, "participant", "--skip_bids_validator", "--overwrite", "--participant_label", "good")
    assert again.returncode == ExitCode.DATA_ERROR and "truncated or corrupt" in again.stderr
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
    changed = [p.name for p in before if before[p] != after[p] and "t1_linear" in p.parts]
    assert not changed, f"outputs of the previous run were modified: {changed}"
    assert good.exists()


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = run_app(DEMO, blocker / "out", "participant", "--skip_bids_validator")
    assert done.returncode == ExitCode.CANNOT_WRITE
    assert "not writable" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    work = run_app(DEMO, tmp_path / "out", "participant", "--skip_bids_validator", "--work_dir", blocker / "work")
    assert work.returncode == ExitCode.CANNOT_WRITE and len(work.stderr.strip().splitlines()) == 1, work.stderr
    assert "work folder is not writable" in work.stderr and "--work_dir" in work.stderr
    assert not list((tmp_path / "out").glob("caps/subjects/*")), "refused before any subject"


def test_unreadable_image(tmp_path):
    """An image that cannot be read whoever runs us (CI runs as root, which reads any file): a symbolic link
    to content that is not there, as a DataLad dataset whose files were never fetched."""
    bids = make_bids(tmp_path / "bids", {"sub-02/anat/sub-02_T1w.nii.gz": demo_scan(GOOD)})
    link = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../.git/annex/objects/Xk/MD5E-s1--0.nii.gz")
    done = run_app(bids, tmp_path / "out", "participant", "--skip_bids_validator", "--participant_label", "01")
    assert done.returncode == ExitCode.DATA_ERROR and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "ERROR" in line and "sub-01_T1w" in line][:1]
    assert "symbolic link to a missing file" in line and "datalad get" in line


def test_empty_bids_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    validated = run_app(empty, tmp_path / "out", "participant")
    assert validated.returncode == ExitCode.VALIDATION_FAILED
    assert "--skip_bids_validator" in validated.stderr
    skipped = run_app(make_bids(empty, {}), tmp_path / "out2", "participant", "--skip_bids_validator")
    assert skipped.returncode == ExitCode.NO_DATA and "no T1w image" in skipped.stderr


def test_invalid_bids_dataset_is_exit_16(tmp_path):
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": demo_scan(GOOD)})
    shutil.copyfile(demo_scan(GOOD), bids / "sub-01/anat/sub-01_T1weighted.nii.gz")
    done = run_app(bids, tmp_path / "out", "participant")
    assert done.returncode == ExitCode.VALIDATION_FAILED and "BIDS validation failed" in done.stderr


def test_unknown_participant_label(tmp_path):
    done = run_app(DEMO, tmp_path / "out", "participant", "--participant_label", "nobody", "--skip_bids_validator")
    assert done.returncode == ExitCode.USAGE and "sub-nobody" in done.stderr
    escaped = run_app(DEMO, tmp_path / "out", "participant", "--participant_label", "../x")
    assert escaped.returncode == ExitCode.USAGE and "letters and digits" in escaped.stderr


def test_bad_roi_mask(tmp_path):
    mask = tmp_path / "my_roi-blob_mask.nii.gz"
    save(mask, np.zeros((10, 10, 10), dtype=np.uint8))
    done = run_app(DEMO, tmp_path / "out", "participant", "--modes", "roi", "--roi_masks", mask,
                   "--roi_list", "blob", "--skip_bids_validator", "--participant_label", DEMO_SUBJECTS[0])
    assert done.returncode == ExitCode.USAGE and "my_roi-blob_mask.nii.gz" in done.stderr
    unknown = run_app(DEMO, tmp_path / "out", "participant", "--modes", "roi", "--roi_list", "amygdala",
                      "--skip_bids_validator")
    assert unknown.returncode == ExitCode.USAGE and "amygdala" in unknown.stderr and "leftHippocampus" in unknown.stderr
