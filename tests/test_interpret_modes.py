"""The default group run, all stages, in patch, roi and slice mode on a trivial dataset (left hemisphere
darkened for AD, right for CN): it completes, the maps are stitched into the MNI image grid with a sidecar,
the report shows them over the template, and the AD map leans further toward AD's side than the CN map."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from clinicadl_app.generate import Trivial, generate_trivial, hemisphere

from .conftest import run_app, source_brains, subset_caps

pytestmark = pytest.mark.slow

RUN = """
[labels]
column = "diagnosis"
[split]
n_test = 0.25
n_splits = 0
n_validation = 0.25
max_attempts = 3
[train]
epochs = {epochs}
batch_size = 4
[interpret]
methods = ["gradients"]
"""
# hemisphere ROIs: the hippocampus boxes are not lateral enough to tell the classes apart; their boxes
# differ in size, so each region is kept in the whole image (uncropped), one network per region
MODES = {
    "patch": (6, ["--mode", "patch", "--patch_size", "42", "--stride_size", "42"]),
    "roi": (3, ["--mode", "roi", "--roi_list", "leftHemisphere", "rightHemisphere", "--roi_uncrop_output",
                "--multi_network"]),
    "slice": (4, ["--mode", "slice", "--slice_direction", "2", "--discarded_slices", "25",
                  "--architecture", "Conv4_FC3", "--save_individual"]),
}


@pytest.fixture(scope="module")
def trivial(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    generate_trivial(subset_caps(root / "sources", source_brains()[0][:8]), root / "data",
                     Trivial(n_subjects=16, seed=4))
    return root / "data"


def _left_right(path) -> float:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    left = hemisphere(data.shape, image.affine, "left")
    right = hemisphere(data.shape, image.affine, "right")
    return float(data[left].mean() / data[right].mean())


@pytest.mark.parametrize("mode", list(MODES))
def test_default_run_interprets_parts_in_mni_space(mode, trivial, tmp_path):
    epochs, extra = MODES[mode]
    (tmp_path / "run.toml").write_text(RUN.format(epochs=epochs))
    out = tmp_path / "out"
    done = run_app(trivial / "bids", out, "group", "--caps_dir", trivial / "caps", "--config",
                   tmp_path / "run.toml", *extra)
    assert done.returncode == 0, done.stderr
    (maps,) = (out / "maps").iterdir()
    # the part model learnt (this replaces test_training's patch and slice cases)
    best = maps / "split-0" / "best-BA" / "validation"
    assert pd.read_csv(best / "validation_image_level_metrics.tsv", sep="\t").BA.iloc[0] >= 0.8
    column = {"patch": "patch_id", "roi": "roi_id", "slice": "slice_id"}[mode]
    assert pd.read_csv(best / f"validation_{mode}_level_prediction.tsv", sep="\t")[column].nunique() > 1
    folder = maps / "split-0" / "best-loss" / "test" / "interpret-gradients"
    reference = nib.load(str(next((trivial / "caps" / "subjects").glob("*/ses-M000/t1_linear/*.nii.gz"))))
    ratios = {}
    for label in ("AD", "CN"):
        path = folder / f"group-test_label-{label}_mode-{mode}_desc-gradients_mean.nii.gz"
        image = nib.load(str(path))
        assert image.shape == reference.shape and np.allclose(image.affine, reference.affine)
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["mode"] == mode and sidecar["method"] == "gradients" and sidecar["n_images"] >= 1
        covered = np.asanyarray(image.dataobj) > 0
        assert sidecar["covered_fraction"] >= covered.mean() - 1e-6
        if mode != "roi":
            assert sidecar["covered_fraction"] < 1 and sidecar["uncovered_voxels"].startswith("0")
        ratios[label] = _left_right(path)
        test = pd.read_csv(maps / "groups" / "test" / "data.tsv", sep="\t")
        own = [folder / f"{p}_{s}_mode-{mode}_desc-gradients_map.nii.gz"
               for p, s in zip(test.participant_id, test.session_id, strict=True)
               if test.set_index(["participant_id", "session_id"]).loc[(p, s), "diagnosis"] == label]
        if mode == "slice":  # --save_individual: one map per image, and the group's mean is their mean
            assert own and all(f.is_file() for f in own)
            mean = np.mean([np.asanyarray(nib.load(str(f)).dataobj) for f in own], axis=0)
            assert np.allclose(mean, np.asanyarray(image.dataobj), rtol=1e-5, atol=1e-6 * mean.max())
        else:
            assert not list(folder.glob("sub-*_map.nii.gz")), "individual maps only with --save_individual"
    # AD images differ on the left, CN images on the right: the AD map leans further left than the CN map. The
    # ratio of the two ratios cancels what both classes share (how one trained network, or each hemisphere's
    # own network in roi mode, weighs the hemispheres overall), which moves both maps' lean with the training's
    # rounding: a correct model (test BA 1.0) once gave {'AD': 1.55, 'CN': 1.05}, seeds 4-7 of this data with
    # AVX2 or AVX-512 kernels gave AD/CN 1.35-1.82 in every mode
    assert ratios["AD"] / ratios["CN"] > 1.25, ratios
    page = (maps / "report.html").read_text()
    assert "Attribution and error maps" in page and f"mode-{mode}_desc-gradients (one colour scale" in page
    if mode == "patch":  # inference is reproducible: interpreting again writes the same maps
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.nii.gz")}
        again = run_app(trivial / "bids", out, "group", "--caps_dir", trivial / "caps", "--config",
                        tmp_path / "run.toml", *extra, "--stages", "interpret")
        assert again.returncode == 0, again.stderr
        assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.nii.gz")}
