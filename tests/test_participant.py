"""The participant level end to end on real scans: concurrent jobs into one folder, resumable reruns,
CAPS layout and tensors as ClinicaDL writes them, QC, reports, and a valid BIDS derivative."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clinicadl_app.images import templates
from clinicadl_app.layouts.caps import Caps, CapsImage
from clinicadl_app.layouts.output import OutputLayout
from clinicadl_app.participant.bids_validator import validator_command
from clinicadl_app.participant.report import write_participant_report

from .conftest import DEMO_SUBJECTS, ROOT, demo_scan, make_bids, run_app

MODES = ("image", "patch", "roi", "slice")
pytestmark = pytest.mark.slow


def moved_copy(source: Path, target: Path, degrees: float, axis: str = "z") -> Path:
    """The same head turned by `degrees` about the z (yaw) or x (pitch) axis and shifted: a visit in another
    position."""
    img = nib.load(str(source))
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn = {"z": np.array([[c, -s, 0, 5], [s, c, 0, -8], [0, 0, 1, 3], [0, 0, 0, 1.0]]),
            "x": np.array([[1, 0, 0, 5], [0, c, -s, -8], [0, s, c, 3], [0, 0, 0, 1.0]])}[axis]
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), turn @ img.affine, img.header), str(target))
    return target


@pytest.fixture(scope="module")
def sessions_bids(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sessions")
    a, b = DEMO_SUBJECTS[0], DEMO_SUBJECTS[1]
    bids = make_bids(root / "bids", {
        "sub-01/ses-M000/anat/sub-01_ses-M000_T1w.nii.gz": demo_scan(a),
        "sub-02/ses-M000/anat/sub-02_ses-M000_T1w.nii.gz": demo_scan(b),
    }, participants="participant_id\tage\nsub-01\t60\nsub-02\t65\n")
    moved_copy(demo_scan(a), bids / "sub-01/ses-M012/anat/sub-01_ses-M012_T1w.nii.gz", 12)
    return bids


@pytest.fixture(scope="module")
def run_two_jobs(sessions_bids, tmp_path_factory):
    """Two invocations (array jobs, one per session of one participant) writing into one OUTPUT_DIR at the same
    time: the participant's folder, report and the CAPS files are shared."""
    out = tmp_path_factory.mktemp("out") / "derivatives"
    common = [str(ROOT / "run.py"), str(sessions_bids), str(out), "participant", "--n_cpus", "1",
              "--modes", *MODES, "--uncropped_image"]
    jobs = [subprocess.Popen([sys.executable, *common, "--participant_label", "01", "--session_label", session],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for session in ("M000", "M012")]
    results = [(job.wait(), job.stderr.read()) for job in jobs]
    return out, results


def caps_images(out: Path) -> list[CapsImage]:
    images, problems = Caps(out / "caps").index()
    assert not problems
    return images


def test_concurrent_jobs_both_succeed(run_two_jobs):
    out, results = run_two_jobs
    for code, stderr in results:
        assert code == 0, stderr
    assert len(caps_images(out)) == 2


def test_images_on_the_cropped_template_grid_with_passing_qc(run_two_jobs):
    out, _ = run_two_jobs
    caps = Caps(out / "caps")
    template = nib.load(str(templates.path(templates.MNI_T1)))
    expected_affine = templates.cropped_affine(template.affine)
    for image in caps_images(out):
        cropped = nib.load(str(caps.t1_linear(image)))
        assert cropped.shape == (169, 208, 179)
        assert np.allclose(cropped.affine, expected_affine)
        assert nib.load(str(caps.t1_linear(image, cropped=False))).shape == (193, 229, 193)
        sidecar = json.loads(caps.sidecar(image).read_text())
        assert sidecar["SkullStripped"] is False and sidecar["SpatialReference"] == "MNI152NLin2009cSym"
        assert sidecar["QualityCheck"]["correlation"] >= 0.3 and sidecar["QualityCheck"]["passed"]
        assert sidecar["Parameters"]["threads"] == 1, "--n_cpus 1: the ITK thread count is recorded"
        assert caps.transform(image).stat().st_size > 0
    table = pd.read_csv(caps.qc_table, sep="\t")
    assert len(table) == 2 and table["pass"].all()


def test_longitudinal_sessions_agree(run_two_jobs):
    """The same head in another position lands on the same place of the template."""
    out, _ = run_two_jobs
    caps = Caps(out / "caps")
    first, second = (nib.load(str(caps.t1_linear(CapsImage("sub-01", ses, f"sub-01_{ses}")))).get_fdata()
                     for ses in ("ses-M000", "ses-M012"))
    mask = first > np.percentile(first, 60)
    assert np.corrcoef(first[mask], second[mask])[0, 1] > 0.95


def test_tensors_have_clinicadl_names_and_shapes(run_two_jobs):
    out, _ = run_two_jobs
    caps = Caps(out / "caps")
    left_box = nib.load(str(caps.mask("leftHippocampusBox"))).get_fdata() > 0
    for image in caps_images(out):
        data = torch.from_numpy(nib.load(str(caps.t1_linear(image))).get_fdata(dtype=np.float32))
        whole = torch.load(caps.image_tensor(image), weights_only=True)
        assert whole.shape == (1, 169, 208, 179) and whole.dtype == torch.float32
        assert torch.equal(whole[0], data)
        patches = sorted(caps.tensor_dir(image, "patch").glob("*_patchsize-50_stride-50_patch-*_T1w.pt"))
        assert len(patches) == 36
        stem = f"{image.participant_id}_{image.session_id}_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1"
        patch = caps.tensor_dir(image, "patch") / f"{stem}_patchsize-50_stride-50_patch-35_T1w.pt"
        assert torch.load(patch, weights_only=True).shape == (1, 50, 50, 50)
        slices = sorted(caps.tensor_dir(image, "slice").glob("*_axis-sag_channel-rgb_slice-*_T1w.pt"))
        assert len(slices) == 169 - 40
        first = caps.tensor_dir(image, "slice") / f"{stem}_axis-sag_channel-rgb_slice-20_T1w.pt"
        assert torch.load(first, weights_only=True).shape == (3, 208, 179)
        roi = torch.load(caps.roi_tensor(image, "leftHippocampusBox"), weights_only=True)
        assert roi.shape == (1, 50, 50, 50) and left_box.sum() == 50**3
        name = caps.roi_tensor(image, "leftHippocampusBox").name
        assert name == f"{image.participant_id}_{image.session_id}_space-MNI152NLin2009cSym_desc-CropRoi_res-1x1x1_roi-leftHippocampusBox_T1w.pt"
    for mode in MODES:
        described = [json.loads(p.read_text()) for p in (out / "caps" / "tensor_extraction").glob("*.json")]
        assert any(d["mode"] == mode and d["preprocessing"] == "t1-linear" and d["prepare_dl"] for d in described)


def test_shared_files_survive_concurrency(run_two_jobs):
    out, _ = run_two_jobs
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "clinicadl-app"
    caps_description = json.loads((out / "caps" / "dataset_description.json").read_text())
    assert caps_description["CAPSVersion"]
    lines = (out / ".bidsignore").read_text().splitlines()
    assert len(lines) == len(set(lines)) and "caps" in lines
    assert not list(out.rglob(".*.tmp-*")), "no temporary file may remain"
    assert len(list((out / "logs").glob("participant-*.toml"))) == 2


def test_output_is_a_valid_bids_derivative(run_two_jobs):
    out, _ = run_two_jobs
    done = subprocess.run([validator_command(), str(out), "--format", "json"], capture_output=True, text=True)
    issues = json.loads(done.stdout)["issues"]["issues"]
    assert not [i for i in issues if i["severity"] == "error"], issues


def test_a_report_lists_sessions_in_the_order_their_labels_count(tmp_path):
    images = [CapsImage("sub-01", f"ses-{label}", f"sub-01_ses-{label}") for label in ("10", "2", "9", "1")]
    page = write_participant_report(OutputLayout(tmp_path), Caps(tmp_path / "caps"), "sub-01", images).read_text()
    assert re.findall(r"<h2>sub-01 (ses-\d+)</h2>", page) == ["ses-1", "ses-2", "ses-9", "ses-10"]


def test_reports_show_each_session_with_its_figure(run_two_jobs):
    out, _ = run_two_jobs
    for participant, sessions in (("sub-01", 2),):  # both sessions, although each job wrote one
        page = (out / "reports" / f"{participant}.html").read_text()
        assert page.count("<h2>") == sessions and "PASS" in page
        for source in re.findall(r"src='([^']+)'", page):
            figure = out / "reports" / source
            assert figure.exists() and figure.stat().st_size > 10_000
            # the page says red for the brain outline and cyan for the white-matter edge: both drawn, and apart
            pixels = np.asarray(Image.open(figure).convert("RGB")).astype(int)
            r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
            assert ((r > 180) & (g < 90) & (b < 90)).sum() > 300 and ((r < 120) & (g > 180) & (b > 180)).sum() > 300
            assert "red line" in page and "cyan line" in page


def test_rerun_skips_complete_sessions_and_overwrite_redoes(run_two_jobs, sessions_bids):
    out, _ = run_two_jobs
    caps = Caps(out / "caps")
    target = caps.t1_linear(CapsImage("sub-01", "ses-M000", "sub-01_ses-M000"))
    before = target.stat().st_mtime_ns
    again = run_app(sessions_bids, out, "participant", "--participant_label", "01", "--modes", *MODES,
                    "--uncropped_image", "--skip_bids_validator")
    assert again.returncode == 0 and "already complete" in again.stderr
    assert target.stat().st_mtime_ns == before
    redo = run_app(sessions_bids, out, "participant", "--participant_label", "01", "--session_label", "M000",
                   "--overwrite", "--skip_bids_validator")
    assert redo.returncode == 0, redo.stderr
    assert target.stat().st_mtime_ns > before


def test_existing_clinica_caps_is_used_without_preprocessing(run_two_jobs, sessions_bids, tmp_path):
    out, _ = run_two_jobs
    ours = Caps(out / "caps").t1_linear(CapsImage("sub-01", "ses-M000", "sub-01_ses-M000"))
    clinica = Caps(tmp_path / "clinica_caps")
    old_name = CapsImage("sub-02", "ses-M000", "sub-02_ses-M000_T1w")  # Clinica < 0.9 kept the suffix
    clinica.t1_linear(old_name).parent.mkdir(parents=True)
    clinica.t1_linear(old_name).write_bytes(ours.read_bytes())
    done = run_app(sessions_bids, tmp_path / "out", "participant", "--caps_dir", clinica.root,
                   "--participant_label", "02", "--session_label", "M000", "--modes", "image", "patch",
                   "--skip_bids_validator")
    assert done.returncode == 0, done.stderr
    assert "1 already in the CAPS" in done.stderr
    assert not list(clinica.root.rglob("*.mat")), "no registration may run"
    assert clinica.image_tensor(old_name).exists()
    assert len(list(clinica.tensor_dir(old_name, "patch").glob("*.pt"))) == 36


def test_the_job_as_pid_1_keeps_its_workers(run_two_jobs, sessions_bids, tmp_path):
    """In a container the job is pid 1: its worker processes must not take that for a dead parent."""
    out, _ = run_two_jobs
    caps = Caps(tmp_path / "caps")
    image = CapsImage("sub-01", "ses-M000", "sub-01_ses-M000")
    caps.t1_linear(image).parent.mkdir(parents=True)
    caps.t1_linear(image).write_bytes(Caps(out / "caps").t1_linear(image).read_bytes())
    command = [sys.executable, str(ROOT / "run.py"), str(sessions_bids), str(tmp_path / "out"), "participant",
               "--caps_dir", str(caps.root), "--participant_label", "01", "--session_label", "M000",
               "--modes", "image", "--skip_bids_validator"]
    pid = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                          sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert pid.stdout.strip() == "1", f"unshare cannot make a pid namespace here: {pid.stderr}"
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", *command],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "worker process died" not in done.stderr
    assert caps.image_tensor(image).exists()


@pytest.mark.slow
def test_a_registration_that_fails_qc_is_retried_reported_and_left_out_of_labels(tmp_path):
    """A head pitched by 50 degrees, judged against an impossible threshold. The plain registration falls into
    a wrong alignment; the retry's rotation search finds the right one and the better result is kept. The
    session is written but said to have failed, and the labels stage leaves it out unless asked to keep it.

    50, not 40: at 40 degrees the plain registration sits on a knife edge (r 0.19 with one thread, 0.21 with
    two, 0.44 = aligned on another CPU); at 50 and 55 it fails everywhere measured (r 0.10) and the search
    still rescues it (0.44)."""
    bids = make_bids(tmp_path / "bids", {}, participants="participant_id\tdiagnosis\nsub-01\tAD\n")
    moved_copy(demo_scan(DEMO_SUBJECTS[3]), bids / "sub-01/anat/sub-01_T1w.nii.gz", 50, axis="x")
    out = tmp_path / "out"
    done = run_app(bids, out, "participant", "--skip_bids_validator", "--qc_threshold", "0.99", "--n_cpus", "2")
    assert done.returncode == 0, done.stderr
    assert "failed the quality check" in done.stderr and "1 session(s) failed the registration quality check" \
        in done.stderr
    (first_try,) = set(re.findall(r"QC correlation (0\.\d+) below 0\.99; retrying with a rotation search",
                                  done.stderr))
    caps = Caps(out / "caps")
    (image,) = caps.index()[0]
    quality = caps.quality(image)
    assert quality["passed"] is False and quality["threshold"] == 0.99
    assert float(first_try) < 0.3 <= quality["correlation"], \
        f"the search rescued what the plain registration missed: {first_try} then {quality['correlation']}"
    assert json.loads(caps.sidecar(image).read_text())["RegistrationRetried"] is True
    assert pd.read_csv(caps.qc_table, sep="\t").retried.tolist() == [True]
    dropped = run_app(bids, out, "group", "--stages", "labels", "--column", "diagnosis")
    assert dropped.returncode == 18 and "no image kept" in dropped.stderr, dropped.stderr
    assert "quality check (r 0." in dropped.stderr and "--keep_failed_qc" in dropped.stderr
    kept = run_app(bids, out, "group", "--stages", "labels", "--column", "diagnosis", "--keep_failed_qc",
                   "--name", "kept")
    assert kept.returncode == 0, kept.stderr
    assert list(pd.read_csv(out / "splits" / "kept" / "labels.tsv", sep="\t").participant_id) == ["sub-01"]


def test_tensors_from_the_uncropped_image_and_a_user_mask(run_two_jobs, sessions_bids, tmp_path):
    """--use_uncropped_image cuts tensors out of the 193x229x193 image; a --roi_masks file is a region of its
    own, whose tensor is exactly the image inside the mask's box."""
    out, _ = run_two_jobs
    caps = Caps(out / "caps")
    grid = nib.load(str(templates.path(templates.MNI_T1)))
    cube = np.zeros(grid.shape, np.uint8)
    cube[60:100, 80:120, 60:90] = 1
    mask = tmp_path / "tpl-MNI152NLin2009cSym_res-1x1x1_roi-cube_mask.nii.gz"
    nib.save(nib.Nifti1Image(cube, grid.affine), mask)
    registered = caps.t1_linear(CapsImage("sub-01", "ses-M012", "sub-01_ses-M012"), cropped=False).stat().st_mtime_ns
    done = run_app(sessions_bids, out, "participant", "--participant_label", "01", "--session_label", "M012",
                   "--modes", "image", "roi",
                   "--uncropped_image", "--use_uncropped_image", "--roi_masks", mask, "--roi_list", "cube",
                   "--skip_bids_validator")
    assert done.returncode == 0, done.stderr
    image = CapsImage("sub-01", "ses-M012", "sub-01_ses-M012")
    assert caps.t1_linear(image, cropped=False).stat().st_mtime_ns == registered, "tensors only, no registration"
    uncropped = torch.from_numpy(nib.load(str(caps.t1_linear(image, cropped=False))).get_fdata(dtype=np.float32))
    whole = torch.load(caps.image_tensor(image, cropped=False), weights_only=True)
    assert whole.shape == (1, 193, 229, 193) and torch.equal(whole[0], uncropped)
    region = torch.load(caps.roi_tensor(image, "cube", cropped=False), weights_only=True)
    assert region.shape == (1, 40, 40, 30) and torch.equal(region[0], uncropped[60:100, 80:120, 60:90])
