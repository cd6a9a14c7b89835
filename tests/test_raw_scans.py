"""Every shared raw scan (adult and children, with skull, ~1 mm, RAS; the project's 2 mm copies when
../shared/data is absent) registers with a passing quality check in a sessionless dataset."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import torch

from clinicadl_app.layouts.bids import SESSIONLESS

from .conftest import RAW2MM, ROOT, make_bids, run_app

SHARED = Path(os.environ.get("CLINICADL_APP_SHARED_DATA", ROOT.parent / "shared" / "data")) / "raw1mm_bids"


def raw_scans() -> dict[str, Path]:
    if SHARED.is_dir():
        return {p.name.split("_")[0]: p for p in sorted(SHARED.glob("sub-*/anat/*_T1w.nii.gz"))}
    return {p.name.split("_")[0]: p for p in sorted(RAW2MM.glob("sub-*_T1w.nii.gz"))}


@pytest.mark.slow
def test_raw_scans_register_with_passing_qc(tmp_path):
    scans = raw_scans()
    assert len(scans) == 3
    bids = make_bids(tmp_path / "bids", {f"{sub}/anat/{sub}_T1w.nii.gz": path for sub, path in scans.items()})
    out = tmp_path / "out"
    done = run_app(bids, out, "participant", "--n_cpus", "2", "--skip_bids_validator")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "caps/qc/t1-linear_qc.tsv", sep="\t")
    assert sorted(table.participant_id) == sorted(scans)
    assert (table.correlation >= 0.3).all() and table["pass"].all(), table
    assert set(table.session_id) == {f"ses-{SESSIONLESS}"}
    for sub in scans:
        folder = out / "caps/subjects" / sub / f"ses-{SESSIONLESS}"
        (image,) = folder.glob("t1_linear/*_desc-Crop_res-1x1x1_T1w.nii.gz")
        assert nib.load(str(image)).shape == (169, 208, 179)
        (tensor,) = folder.glob("deeplearning_prepare_data/image_based/t1_linear/*.pt")
        assert torch.load(tensor, weights_only=True).shape == (1, 169, 208, 179)
