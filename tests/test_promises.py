"""The group level keeps its promises outside the happy path: a redrawn split, several folds of unequal
sizes, a moved output folder, datasets that reuse labels, classes a model never saw, images that failed
QC, transfer sources that saw validation subjects, repeated inference. Small real runs at 4 mm."""

from __future__ import annotations

import html
import json
import shlex
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from clinicadl_app.core.errors import ExitCode
from clinicadl_app.generate import Trivial, generate_trivial
from clinicadl_app.layouts.caps import Caps
from clinicadl_app.layouts.splits import SplitFolder

from .conftest import run_app, source_brains, subset_caps

pytestmark = pytest.mark.slow

EXPERIMENT = """
[labels]
column = "diagnosis"
[split]
n_test = 0.25
n_splits = 3
seed = 0
max_attempts = 5
[train]
epochs = 1
batch_size = 4
evaluate_train = true
[interpret]
methods = ["gradients"]
target = "predicted"
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 subjects from 12 brains at 4 mm (3 brains are kept back for new datasets)."""
    root = tmp_path_factory.mktemp("promises")
    generate_trivial(subset_caps(root / "sources", source_brains()[0]), root / "data",
                     Trivial(n_subjects=24, seed=3, downsample=2))
    (root / "experiment.toml").write_text(EXPERIMENT)
    return root


def group(data, out, *args, stages=None):
    extra = ("--stages", *stages) if stages else ()
    return run_app(data / "data" / "bids", out, "group", "--caps_dir", data / "data" / "caps", "--config",
                   data / "experiment.toml", *extra, *args)


def one_error_line(done) -> str:
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def new_dataset(root, prefix: str, diagnoses: dict[int, str] | None = None):
    """6 subjects from the 3 brains no model saw; `diagnoses` overrides some labels."""
    generate_trivial(subset_caps(root / "sources", source_brains()[1]), root / "new",
                     Trivial(n_subjects=6, seed=9, downsample=2, prefix=prefix))
    table = pd.read_csv(root / "new" / "bids" / "participants.tsv", sep="\t")
    for row, label in (diagnoses or {}).items():
        table.loc[row, "diagnosis"] = label
    table.to_csv(root / "new" / "bids" / "participants.tsv", sep="\t", index=False)
    return root / "new"


def predict(dataset, out, maps, group_name, *extra):
    return run_app(dataset / "bids", out, "group", "--stages", "predict", "--maps_dir", maps, "--group_name",
                   group_name, "--caps_dir", dataset / "caps", *extra)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The default run of every stage, 3 folds of unequal sizes, --evaluate_train, target 'predicted'."""
    out = tmp_path_factory.mktemp("trained") / "out"
    done = group(data, out)
    assert done.returncode == 0, done.stderr
    return out, out / "maps" / "diagnosis_image_Conv5_FC3"


def test_the_maps_records_the_command_and_the_report_shows_it(trained):
    out, maps = trained
    record = json.loads((maps / "maps.json").read_text())
    argv = shlex.split(record["command_line"])
    assert argv[0] == "clinicadl-app" and argv[1:] == record["command"][1:] and "group" in argv
    assert Path(record["working_directory"]).is_dir() and record["container"] is None
    assert html.escape(record["command_line"]) in (maps / "report.html").read_text()
    card = (maps / "model_card.md").read_text()
    for section in ("## Model", "## Data", "## Performance", "## Intended use and limits", "## Provenance"):
        assert section in card
    assert "| test | best-loss | 0 | " in card and "classify `diagnosis` into AD, CN" in card
    assert "test set of 25 % of the participants, 3 folds," in card and "1 epoch at most" in card
    grid = "x".join(map(str, record["image_size"][1:]))  # 4 mm images: the card says so, not the 1 mm grid
    assert f"MNI152NLin2009cSym, resampled, {grid})" in card and "169x208x179" not in card
    assert record["command_line"] in card and "sub-" not in card, "counts, never participant names"


def test_evaluate_train_with_unequal_sets_reports_the_selected_model(trained):
    """Each fold's training set is larger than its validation set; the training-set metrics logged at the
    selected epoch are those of the saved model on the training set."""
    out, maps = trained
    for fold in (0, 1, 2):
        train = pd.read_csv(out / "splits" / "diagnosis" / f"split-{fold}" / "train.tsv", sep="\t")
        validation = pd.read_csv(out / "splits" / "diagnosis" / f"split-{fold}" / "validation.tsv", sep="\t")
        assert len(train) > len(validation)
        log = pd.read_csv(maps / f"split-{fold}" / "training_logs" / "training.tsv", sep="\t")
        epoch = torch.load(maps / f"split-{fold}" / "best-loss" / "model.pth.tar", weights_only=True)["epoch"]
        row = log[log.epoch == epoch].iloc[-1]
        on_train = pd.read_csv(maps / f"split-{fold}" / "best-loss" / "train" / "train_image_level_metrics.tsv",
                               sep="\t").iloc[0]
        assert row.BA_train == pytest.approx(on_train.BA, abs=1e-9)
        assert row.loss_train == pytest.approx(on_train.loss, rel=1e-4)


def test_records_hold_relative_paths_and_the_split_membership(trained):
    out, maps = trained
    record = json.loads((maps / "maps.json").read_text())
    assert record["split_directory"] == "splits/diagnosis"
    assert record["split_membership_sha256"] == SplitFolder(out / "splits" / "diagnosis").membership_sha256()
    assert json.loads((maps / "groups" / "train" / "split-0" / "maps.json").read_text())["split_directory"] \
        == "splits/diagnosis"
    # the command as typed is provenance, kept verbatim; every path the app follows is relative
    recorded = json.dumps({key: value for key, value in record.items() if key not in ("command", "command_line")})
    assert str(out) not in recorded, "no path into OUTPUT_DIR is absolute"


def test_a_moved_output_folder_still_predicts_interprets_and_reports(trained, data, tmp_path):
    out, maps = trained
    moved = tmp_path / "elsewhere" / "out"
    shutil.copytree(out, moved, symlinks=True)
    hidden = out.with_name("hidden")
    out.rename(hidden)  # nothing may still point into the old place
    try:
        done = group(data, moved, stages=("predict", "interpret", "report"))
        assert done.returncode == 0, done.stderr
        assert (moved / "maps" / maps.name / "split-0" / "best-loss" / "test" / "interpret-gradients").is_dir()
        assert "Attribution and error maps" in (moved / "maps" / maps.name / "report.html").read_text()
        # an external folder that is gone: one line naming it
        caps = data / "data" / "caps"
        caps.rename(caps.with_name("caps-away"))
        try:
            missing = group(data, moved, stages=("interpret",))
        finally:
            caps.with_name("caps-away").rename(caps)
        assert missing.returncode == ExitCode.MISSING_INPUT and str(caps) in one_error_line(missing)
    finally:
        hidden.rename(out)


def test_inference_runs_in_eval_mode_and_repeats_exactly(trained, data):
    """Dropout (0.5) is on in training mode: any inference in training mode would change between runs."""
    out, maps = trained
    paths = sorted((maps / "split-0" / "best-loss" / "test" / "interpret-gradients").glob("*.nii.gz"))
    first = [nib.load(str(p)).get_fdata() for p in paths]
    prediction = maps / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv"
    before = pd.read_csv(prediction, sep="\t")
    again = group(data, out, stages=("predict", "interpret"))
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(before, pd.read_csv(prediction, sep="\t"))
    for path, values in zip(paths, first, strict=True):
        assert np.array_equal(values, nib.load(str(path)).get_fdata()), path


def test_a_dataset_reusing_labels_with_other_images_is_warned_not_refused(trained, tmp_path):
    _, maps = trained
    dataset = new_dataset(tmp_path, "TRIV")  # sub-TRIV000... as in training, other brains
    seen = set(pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t").participant_id)
    assert seen & set(pd.read_csv(dataset / "bids" / "participants.tsv", sep="\t").participant_id)
    done = predict(dataset, tmp_path / "out", maps, "reused")
    assert done.returncode == 0, done.stderr
    assert "also used by a seen participant" in done.stderr
    record = json.loads((maps / "groups" / "reused" / "maps.json").read_text())
    assert record["label_check"] == record["content_check"] == "passed"


def test_the_training_dataset_needs_both_waivers_each_recorded(trained, data, tmp_path):
    _, maps = trained
    dataset = data / "data"
    labels_only = predict(dataset, tmp_path / "out", maps, "again", "--skip_content_check")
    assert labels_only.returncode == ExitCode.LEAKAGE and "--skip_label_check" in one_error_line(labels_only)
    content_only = predict(dataset, tmp_path / "out", maps, "again", "--skip_label_check")
    assert content_only.returncode == ExitCode.LEAKAGE and "--skip_content_check" in one_error_line(content_only)
    assert "same scan" in content_only.stderr
    both = predict(dataset, tmp_path / "out", maps, "again", "--skip_label_check", "--skip_content_check")
    assert both.returncode == 0, both.stderr
    record = json.loads((maps / "groups" / "again" / "maps.json").read_text())
    assert record["label_check"].startswith("waived") and record["content_check"].startswith("waived")
    assert "leakage check: skipped" in (maps / "split-0" / "best-loss" / "again" / "description.log").read_text()


def test_a_class_the_model_never_saw_is_predicted_outside_the_metrics(trained, tmp_path):
    _, maps = trained
    dataset = new_dataset(tmp_path, "NEW", {0: "MCI", 3: "MCI"})
    done = predict(dataset, tmp_path / "out", maps, "withmci")
    assert done.returncode == 0, done.stderr
    assert "never saw (MCI)" in done.stderr and "sub-NEW000" in done.stderr and "sub-NEW003" in done.stderr
    folder = maps / "split-0" / "best-loss" / "withmci"
    prediction = pd.read_csv(folder / "withmci_image_level_prediction.tsv", sep="\t")
    assert len(prediction) == 6
    unknown = prediction.participant_id.isin(["sub-NEW000", "sub-NEW003"])
    assert prediction[unknown].true_label.isna().all() and prediction[~unknown].true_label.notna().all()
    metrics = pd.read_csv(folder / "withmci_image_level_metrics.tsv", sep="\t").iloc[0]
    known = prediction[~unknown]
    assert metrics.accuracy == pytest.approx((known.true_label == known.predicted_label).mean())


def test_failed_qc_is_dropped_by_labels_and_marked_by_predict(trained, data, tmp_path):
    _, maps = trained
    copy = tmp_path / "data"
    shutil.copytree(data / "data", copy, symlinks=True)
    caps = Caps(copy / "caps")
    images = sorted(caps.index()[0])
    failed = images[0]
    for image in images:
        bad = image == failed
        caps.sidecar(image).write_text(json.dumps({"QualityCheck": {
            "correlation": 0.12 if bad else 0.45, "nmi": 1.1, "threshold": 0.3, "passed": not bad}}))
    out = tmp_path / "out"
    labels = run_app(copy / "bids", out, "group", "--caps_dir", copy / "caps", "--config", data / "experiment.toml",
                     "--stages", "labels")
    assert labels.returncode == 0, labels.stderr
    dropped = pd.read_csv(out / "splits" / "diagnosis" / "dropped.tsv", sep="\t")
    (reason,) = dropped[dropped.participant_id == failed.participant_id].reason
    assert "quality check" in reason and "r 0.120" in reason
    kept = pd.read_csv(out / "splits" / "diagnosis" / "labels.tsv", sep="\t")
    assert failed.participant_id not in set(kept.participant_id) and len(kept) == len(images) - 1
    keep = run_app(copy / "bids", tmp_path / "keep", "group", "--caps_dir", copy / "caps", "--config",
                   data / "experiment.toml", "--stages", "labels", "--keep_failed_qc")
    assert keep.returncode == 0, keep.stderr
    assert len(pd.read_csv(tmp_path / "keep" / "splits" / "diagnosis" / "labels.tsv", sep="\t")) == len(images)

    dataset = new_dataset(tmp_path, "QC")
    new_caps = Caps(dataset / "caps")
    new_images = sorted(new_caps.index()[0])
    for image in new_images:
        bad = image == new_images[1]
        new_caps.sidecar(image).write_text(json.dumps({"QualityCheck": {
            "correlation": 0.1 if bad else 0.5, "nmi": 1.1, "threshold": 0.3, "passed": not bad}}))
    done = predict(dataset, tmp_path / "pred", maps, "qc")
    assert done.returncode == 0, done.stderr
    prediction = pd.read_csv(maps / "split-0" / "best-loss" / "qc" / "qc_image_level_prediction.tsv", sep="\t")
    marks = dict(zip(prediction.participant_id, prediction.qc_passed.astype(str), strict=True))
    assert marks.pop(new_images[1].participant_id) == "False"
    assert set(marks.values()) == {"True"}, marks


def test_follow_up_sessions_stay_with_their_subject_from_split_to_prediction(tmp_path):
    """1 to 3 sessions per subject (follow-up scans of its brain): every set holds all the sessions of its
    participants, training and prediction use every session, and counts tell participants from images."""
    root = tmp_path / "data"
    generate_trivial(subset_caps(tmp_path / "sources", source_brains()[0]), root,
                     Trivial(n_subjects=24, seed=3, downsample=2, sessions=3))
    (tmp_path / "experiment.toml").write_text(EXPERIMENT)
    out = tmp_path / "out"
    done = run_app(root / "bids", out, "group", "--caps_dir", root / "caps", "--config", tmp_path / "experiment.toml")
    assert done.returncode == 0, done.stderr
    images, _ = Caps(root / "caps").index()
    sessions = pd.Series([i.participant_id for i in images]).value_counts()
    assert sessions.max() == 3 and sessions.min() == 1 and len(images) > 1.5 * len(sessions)

    folder = SplitFolder(out / "splits" / "diagnosis")
    keys = lambda path: set(map(tuple, pd.read_csv(path, sep="\t")[["participant_id", "session_id"]].values))  # noqa: E731
    test = keys(folder.set_file("test"))
    (maps,) = (out / "maps").iterdir()
    for fold in range(3):
        train, validation = keys(folder.set_file("train", fold)), keys(folder.set_file("validation", fold))
        sides = [{p for p, _ in side} for side in (test, train, validation)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2]), "a subject on two sides"
        for side, members in zip((test, train, validation), sides, strict=True):
            assert len(side) == sessions[sorted(members)].sum(), "each set holds every session of its participants"
        assert keys(maps / "groups" / "train" / f"split-{fold}" / "data.tsv") == train
        prediction = maps / f"split-{fold}" / "best-loss" / "test" / "test_image_level_prediction.tsv"
        assert keys(prediction) == test
    population = pd.read_csv(folder.root / "population.tsv", sep="\t").groupby("set")[["participants", "sessions"]].sum()
    assert population.loc["test", "participants"] == len({p for p, _ in test})
    assert population.loc["test", "sessions"] == len(test) > population.loc["test", "participants"]


def test_a_redrawn_split_binds_the_maps_until_retrained(data, tmp_path):
    """labels split train (3 folds), a split redrawn with 2 folds and --overwrite: training into the old MAPS
    and predicting with it are refused; --overwrite retrains on the new draw, which predict then accepts."""
    out = tmp_path / "out"
    first = group(data, out, stages=("labels", "split", "train"))
    assert first.returncode == 0, first.stderr
    maps = out / "maps" / "diagnosis_image_Conv5_FC3"
    models = {p: p.read_bytes() for p in maps.rglob("*.pth.tar")}
    assert (maps / "split-2").is_dir()

    redraw = group(data, out, "--split_seed", "5", "--n_splits", "2", "--overwrite", stages=("split",))
    assert redraw.returncode == 0, redraw.stderr
    folder = SplitFolder(out / "splits" / "diagnosis")
    assert folder.folds() == [0, 1] and not (folder.root / "split-2").exists(), "no empty fold folder is left"

    refused = group(data, out, stages=("train",))
    assert refused.returncode == ExitCode.USAGE and "another draw" in one_error_line(refused)
    assert "--overwrite" in one_error_line(refused)
    assert {p: p.read_bytes() for p in maps.rglob("*.pth.tar")} == models, "the old models are untouched"

    stale = group(data, out, stages=("predict",))
    assert stale.returncode == ExitCode.LEAKAGE and "redrawn" in one_error_line(stale)
    assert not (maps / "split-0" / "best-loss" / "test").exists()

    retrained = group(data, out, "--overwrite", stages=("train",))
    assert retrained.returncode == 0, retrained.stderr
    assert not (maps / "split-2").exists(), "the models of the old draw are gone"
    assert json.loads((maps / "maps.json").read_text())["split_membership_sha256"] == folder.membership_sha256()
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t")
    train = pd.read_csv(folder.set_file("train"), sep="\t")
    assert set(seen.participant_id) == set(train.participant_id)
    accepted = group(data, out, stages=("predict",))
    assert accepted.returncode == 0, accepted.stderr


def test_a_transfer_source_trained_on_our_validation_subjects_is_refused(data, tmp_path):
    out = tmp_path / "out"
    source = group(data, out, "--split", "1", "--experiment", "source", stages=("labels", "split", "train"))
    assert source.returncode == 0, source.stderr
    # fold 0 has no source model of its own: the source's fold 1 model trained on fold 0's validation subjects
    biased = group(data, out, "--split", "0", "--experiment", "biased", "--transfer_path", out / "maps" / "source",
                   stages=("train",))
    assert biased.returncode == ExitCode.LEAKAGE and "validation set of fold 0" in one_error_line(biased)
    assert not (out / "maps" / "biased" / "split-0").exists()
    # fold by fold on the same split: accepted
    fair = group(data, out, "--split", "1", "--experiment", "fair", "--transfer_path", out / "maps" / "source",
                 stages=("train",))
    assert fair.returncode == 0, fair.stderr
    assert "transfer:" in fair.stderr


DEFAULT_RUN = """
[labels]
column = "diagnosis"
[split]
n_test = 0.25
n_splits = 0
n_validation = 0.25
max_attempts = 3
[train]
epochs = 1
batch_size = 4
[interpret]
methods = ["gradients"]
"""


@pytest.fixture(scope="module")
def data_2mm(tmp_path_factory):
    """16 subjects from 8 brains at 2 mm: parts of a useful size."""
    root = tmp_path_factory.mktemp("default2mm")
    generate_trivial(subset_caps(root / "sources", source_brains()[0][:8]), root / "data",
                     Trivial(n_subjects=16, seed=4))
    (root / "experiment.toml").write_text(DEFAULT_RUN)
    return root


@pytest.mark.parametrize(("case", "extra"), [
    ("roi", ["--mode", "roi"]),  # the default hippocampus ROIs, cropped; patch and slice: test_interpret_modes.py
    ("regression", ["--column", "age", "--task", "regression"]),
    ("reconstruction", ["--network_task", "reconstruction"]),
    ("reconstruction-patch", ["--network_task", "reconstruction", "--mode", "patch", "--patch_size", "42",
                              "--stride_size", "42"]),
    ("no-test-set", ["--n_test", "0"]),
])
def test_the_default_group_run_completes_for_every_mode_and_task(case, extra, data, data_2mm, tmp_path):
    """run.py BIDS OUT group with no --stages: all six stages, whatever the mode and task."""
    root = data_2mm if case in ("roi", "reconstruction-patch") else data
    (tmp_path / "experiment.toml").write_text(DEFAULT_RUN)
    done = run_app(root / "data" / "bids", tmp_path / "out", "group", "--caps_dir", root / "data" / "caps",
                   "--config", tmp_path / "experiment.toml", *extra)
    assert done.returncode == 0, done.stderr
    (maps,) = (tmp_path / "out" / "maps").iterdir()
    page = (maps / "report.html").read_text()
    assert "<h2>Metrics</h2>" in page
    test_metrics = maps / "split-0" / "best-loss" / "test" / "test_image_level_metrics.tsv"
    if case == "no-test-set":
        assert "no test set" in done.stderr and not test_metrics.exists()
        return
    assert test_metrics.is_file() and len(pd.read_csv(test_metrics, sep="\t")) == 1
    mode = "patch" if case == "reconstruction-patch" else "roi" if case == "roi" else "image"
    if case == "reconstruction-patch":  # 4 mm images would be cut into other patches (before: predicted anyway)
        coarse = run_app(data / "data" / "bids", tmp_path / "out", "group", "--caps_dir", data / "data" / "caps",
                         "--config", tmp_path / "experiment.toml", *extra, "--stages", "predict", "--group_name",
                         "coarse", "--maps_dir", maps, "--skip_label_check")  # same names, other brains
        assert coarse.returncode == ExitCode.USAGE, coarse.stderr
        assert "images of shape (42, 52, 45), the MAPS was trained on images of shape (84, 104, 90)" in coarse.stderr
        assert not (maps / "groups" / "coarse").exists(), "a refused group leaves no record"
    if case.startswith("reconstruction"):
        folder = maps / "split-0" / "best-loss" / "test" / "interpret-reconstruction-error"
        (error,) = folder.glob(f"group-test_label-all_mode-{mode}_desc-reconstruction-error_mean.nii.gz")
        values = np.asanyarray(nib.load(str(error)).dataobj)
        assert (values >= 0).all() and values.max() > 0, "absolute reconstruction error, somewhere non-zero"
        assert (folder / f"group-test_mode-{mode}_desc-reconstruction_example.png").stat().st_size > 10_000
        assert "reconstruction_example" in page, "input, output and difference in the report"
    else:
        interpreted = maps / "split-0" / "best-loss" / "test" / "interpret-gradients"
        label = "all" if case == "regression" else "*"
        assert list(interpreted.glob(f"group-test_label-{label}_mode-{mode}_desc-gradients_mean.nii.gz"))
