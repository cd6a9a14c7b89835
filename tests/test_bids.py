"""Input discovery on real files: sessions or not, several runs, ambiguous acquisitions, labels, filters."""

from __future__ import annotations

import json

import pytest

from clinicadl_app.core.errors import NoDataError, UsageError
from clinicadl_app.layouts.bids import SESSIONLESS, find_t1w, normalise_labels, read_filters
from clinicadl_app.layouts.caps import Caps

from .conftest import DEMO_SUBJECTS, demo_scan, make_bids

A, B = DEMO_SUBJECTS[:2]


def test_sessionless_dataset_uses_documented_session(tmp_path):
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": demo_scan(A)})
    scans = find_t1w(bids).scans
    assert [(s.participant, s.session, s.session_id) for s in scans] == [("01", None, f"ses-{SESSIONLESS}")]
    assert Caps(tmp_path).image_for(scans[0]).prefix == f"sub-01_ses-{SESSIONLESS}"


def test_sessions_and_highest_run_as_clinica(tmp_path):
    bids = make_bids(tmp_path / "bids", {
        "sub-01/ses-M000/anat/sub-01_ses-M000_run-01_T1w.nii.gz": demo_scan(A),
        "sub-01/ses-M000/anat/sub-01_ses-M000_run-02_T1w.nii.gz": demo_scan(B),
        "sub-01/ses-M012/anat/sub-01_ses-M012_T1w.nii.gz": demo_scan(A),
        "sub-02/ses-M000/anat/sub-02_ses-M000_acq-fast_T1w.nii.gz": demo_scan(B),
    })
    scans = {(s.participant, s.session): s for s in find_t1w(bids).scans}
    assert set(scans) == {("01", "M000"), ("01", "M012"), ("02", "M000")}
    assert scans[("01", "M000")].path.name == "sub-01_ses-M000_run-02_T1w.nii.gz"
    caps = Caps(tmp_path / "caps")
    assert caps.image_for(scans[("01", "M000")]).prefix == "sub-01_ses-M000_run-02"
    assert caps.image_for(scans[("02", "M000")]).prefix == "sub-02_ses-M000_acq-fast"


def test_ambiguous_acquisitions_are_skipped_with_the_fix(tmp_path):
    bids = make_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_acq-a_T1w.nii.gz": demo_scan(A),
        "sub-01/anat/sub-01_acq-b_T1w.nii.gz": demo_scan(B),
        "sub-02/anat/sub-02_T1w.nii.gz": demo_scan(B),
    })
    selection = find_t1w(bids)
    assert [s.participant for s in selection.scans] == ["02"]
    assert len(selection.skipped) == 1 and "--bids_filter_file" in selection.skipped[0]
    filters = tmp_path / "filter.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": "b"}}))
    chosen = find_t1w(bids, filters=read_filters(filters)).scans
    assert [s.path.name for s in chosen] == ["sub-01_acq-b_T1w.nii.gz"]


def test_labels_with_or_without_prefix_and_unsafe_labels():
    assert normalise_labels(("sub-01", "02", "01"), "sub") == ("01", "02")
    for bad in ("../etc", "01_x", "a/b", ""):
        with pytest.raises(UsageError):
            normalise_labels((bad,), "sub")


def test_participant_and_session_selection(tmp_path):
    bids = make_bids(tmp_path / "bids", {
        "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz": demo_scan(A),
        "sub-01/ses-B/anat/sub-01_ses-B_T1w.nii.gz": demo_scan(A),
        "sub-02/ses-A/anat/sub-02_ses-A_T1w.nii.gz": demo_scan(B),
    })
    scans = find_t1w(bids, participants=("01",), sessions=("B",)).scans
    assert [(s.participant, s.session) for s in scans] == [("01", "B")]
    with pytest.raises(UsageError, match="sub-03"):
        find_t1w(bids, participants=("03",))
    with pytest.raises(NoDataError):
        find_t1w(bids, sessions=("C",))


def test_empty_dataset_and_bad_filter_file(tmp_path):
    empty = make_bids(tmp_path / "empty", {})
    with pytest.raises(NoDataError, match="no T1w"):
        find_t1w(empty)
    broken = tmp_path / "f.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="f.json"):
        read_filters(broken)
    misspelt = tmp_path / "t1.json"
    misspelt.write_text(json.dumps({"T1w": {"acquisition": "b"}, "bold": {"task": "rest"}}))
    with pytest.raises(UsageError, match="'T1w'.*'t1w'"):  # would select every scan, not acquisition b
        read_filters(misspelt)
    fmriprep = tmp_path / "fmriprep.json"
    fmriprep.write_text(json.dumps({"t1w": {"acquisition": "b"}, "bold": {"task": "rest"}}))
    assert read_filters(fmriprep) == {"acquisition": "b"}  # an fMRIPrep file's other queries are not ours
