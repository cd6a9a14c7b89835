"""predict, the leakage guards, interpret and report, on a trivial dataset made from 12 real brains; new
datasets are made from the 3 brains the model never saw."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from clinicadl_app.core.errors import ExitCode
from clinicadl_app.generate import TRIVIAL_SPLIT, Trivial, generate_trivial
from clinicadl_app.group.model_card import training_fingerprints
from clinicadl_app.layouts.maps import Maps

from .conftest import run_app, source_brains, subset_caps

CONFIG = TRIVIAL_SPLIT + """
[train]
epochs = 8
batch_size = 4
[interpret]
methods = ["gradients", "grad-cam"]
"""
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def brains() -> tuple[list[str], list[str]]:
    return source_brains()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, brains):
    root = tmp_path_factory.mktemp("predict")
    generate_trivial(subset_caps(root / "sources", brains[0]), root / "data", Trivial(n_subjects=24, seed=2))
    (root / "experiment.toml").write_text(CONFIG)
    done = run_app(root / "data" / "bids", root / "out", "group", "--caps_dir", root / "data" / "caps",
                   "--config", root / "experiment.toml")
    assert done.returncode == 0, done.stderr
    (maps,) = (root / "out" / "maps").iterdir()
    return root, maps


def test_default_group_run_predicts_the_test_set(full_run):
    _, maps = full_run
    for fold in (0, 1):
        metrics = pd.read_csv(maps / f"split-{fold}" / "best-loss" / "test" / "test_image_level_metrics.tsv", sep="\t")
        assert metrics.BA.iloc[0] >= 0.9
        assert {"BA_ci95_low", "BA_ci95_high", "AUC"} <= set(metrics)
        assert metrics.BA_ci95_low.iloc[0] <= metrics.BA.iloc[0] <= metrics.BA_ci95_high.iloc[0]
        prediction = pd.read_csv(maps / f"split-{fold}" / "best-loss" / "test" / "test_image_level_prediction.tsv",
                                 sep="\t")
        assert len(prediction) == 6 and {"proba0", "proba1"} <= set(prediction)
        description = (maps / f"split-{fold}" / "best-loss" / "test" / "description.log").read_text()
        assert "leakage check: passed" in description and "device cpu, float32" in description
    record = json.loads((maps / "groups" / "test" / "maps.json").read_text())
    assert record["leak_check"] == "passed"


def test_saliency_maps_are_nifti_in_mni_space_and_lateralised(full_run):
    root, maps = full_run
    reference = next((root / "data" / "caps" / "subjects").glob("*/ses-M000/t1_linear/*.nii.gz"))
    reference_image = nib.load(str(reference))
    shares = {}
    for label in ("AD", "CN"):
        path = maps / "split-0" / "best-loss" / "test" / "interpret-gradients" / f"group-test_label-{label}_mode-image_desc-gradients_mean.nii.gz"
        image = nib.load(str(path))
        assert image.shape == reference_image.shape
        assert np.allclose(image.affine, reference_image.affine) and not np.allclose(image.affine, np.eye(4))
        data = image.get_fdata()
        x = (image.affine @ np.vstack([np.indices(data.shape).reshape(3, -1), np.ones(data.size)]))[0]
        left, right = data.ravel()[x < 0].sum(), data.ravel()[x > 0].sum()
        shares[label] = left / (left + right)
        assert (path.with_suffix("").with_suffix(".png")).stat().st_size > 10_000
    # AD darkens the left hemisphere, CN the right: the AD map leans further left than the CN map
    assert shares["AD"] > shares["CN"]
    assert (maps / "split-0" / "best-loss" / "test" / "interpret-grad-cam").is_dir()


def test_a_metric_that_selected_equal_weights_shares_their_maps_and_only_then(full_run, tmp_path):
    """Maps are computed once per set of weights. In a copy of the MAPS, fold 0's best-BA model is made
    fold 0's best-loss model (both metrics selected one epoch) and fold 1's differs from its best-loss by one
    layer: fold 0's best-BA maps are best-loss's, their sidecars naming BA; fold 1's are its own."""
    root, maps = full_run
    copy = tmp_path / "maps" / maps.name
    shutil.copytree(maps, copy, ignore=shutil.ignore_patterns("interpret-*"))
    shutil.copyfile(copy / "split-0" / "best-loss" / "model.pth.tar", copy / "split-0" / "best-BA" / "model.pth.tar")
    state = torch.load(copy / "split-1" / "best-loss" / "model.pth.tar", weights_only=True)
    first = next(key for key, value in state["model"].items() if value.dim() > 1)
    state["model"][first] = state["model"][first] * 1.1
    torch.save(state, copy / "split-1" / "best-BA" / "model.pth.tar")
    done = run_app(root / "data" / "bids", tmp_path / "out", "group", "--stages", "interpret", "--maps_dir", copy,
                   "--caps_dir", root / "data" / "caps", "--methods", "gradients")
    assert done.returncode == 0, done.stderr
    reused = [line.split("] ")[1].split(":")[0] for line in done.stderr.splitlines() if "(the weights of" in line]
    assert reused in (["interpret split-0 best-BA gradients"], ["interpret split-0 best-loss gradients"]), done.stderr

    def folder(fold: int, metric: str) -> Path:
        return copy / f"split-{fold}" / f"best-{metric}" / "test" / "interpret-gradients"

    shared, own = folder(0, "loss"), folder(0, "BA")
    assert sorted(p.name for p in own.iterdir()) == sorted(p.name for p in shared.iterdir())
    for path in shared.glob("*.nii.gz"):
        assert (own / path.name).read_bytes() == path.read_bytes()
    for path in shared.glob("*.json"):
        theirs, ours = json.loads(path.read_text()), json.loads((own / path.name).read_text())
        assert theirs["selection_metric"] == "loss" and ours == theirs | {"selection_metric": "BA"}
    for path in folder(1, "loss").glob("*_mean.nii.gz"):
        other = folder(1, "BA") / path.name
        assert not np.array_equal(nib.load(str(path)).get_fdata(), nib.load(str(other)).get_fdata()), path.name


def test_report_renders_in_chromium(full_run, tmp_path):
    _, maps = full_run
    report = maps / "report.html"
    page = report.read_text()
    for section in ("Learning curves", "Metrics", "ROC", "Population", "Attribution and error maps"):
        assert section in page
    assert page.count("data:image/png;base64,") >= 6 and "src='/" not in page, "self-contained"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (tools/test.sh installs it when apt is available)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    report.as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (2400, 1200, 3)
    assert (pixels.mean(2) < 128).mean() > 0.01, "text is drawn"
    colour = np.abs(pixels[..., 0] - pixels[..., 2]) > 60  # matplotlib's blue and orange, the population bars
    assert colour.mean() > 0.005, "the figures are decoded and drawn"


def _new_dataset(root: Path, brains: list[str], prefix: str) -> Path:
    generate_trivial(subset_caps(root / "sources", brains), root / "data", Trivial(n_subjects=2 * len(brains),
                                                                                   seed=5, prefix=prefix))
    return root / "data"


def predict(data: Path, out: Path, maps: Path, group: str, *extra: str):
    return run_app(data / "bids", out, "group", "--stages", "predict", "--maps_dir", maps, "--group_name", group,
                   "--caps_dir", data / "caps", *extra)


def test_truly_new_dataset_is_accepted(full_run, brains, tmp_path):
    _, maps = full_run
    data = _new_dataset(tmp_path, brains[1], "NEW")
    done = predict(data, tmp_path / "out", maps, "external")
    assert done.returncode == 0, done.stderr
    metrics = pd.read_csv(maps / "split-0" / "best-loss" / "external" / "external_image_level_metrics.tsv", sep="\t")
    assert metrics.BA.iloc[0] >= 0.8
    assert json.loads((maps / "groups" / "external" / "maps.json").read_text())["leak_check"] == "passed"

    # --participant_label and --session_label choose what is predicted, and the group's record says so
    everyone = sorted(p.name for p in (data / "caps" / "subjects").iterdir())
    done = predict(data, tmp_path / "out", maps, "external-two", "--participant_label", *everyone[:2],
                   "--session_label", "M000")
    assert done.returncode == 0, done.stderr
    predicted = pd.read_csv(maps / "groups" / "external-two" / "data.tsv", sep="\t")
    assert sorted(predicted.participant_id) == everyone[:2] and set(predicted.session_id) == {"ses-M000"}
    origin = json.loads((maps / "groups" / "external-two" / "maps.json").read_text())["origin"]
    assert origin.endswith(f"chosen by --participant_label {' '.join(everyone[:2])}; --session_label ses-M000")


def test_dataset_with_a_training_subject_is_refused(full_run, tmp_path):
    root, maps = full_run
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t").participant_id.iloc[0]
    data = tmp_path / "data"
    shutil.copytree(root / "data" / "bids", data / "bids")
    (data / "caps" / "subjects").mkdir(parents=True)
    shutil.copytree(root / "data" / "caps" / "subjects" / seen, data / "caps" / "subjects" / seen)
    refused = predict(data, tmp_path / "out", maps, "leaky")
    assert refused.returncode == ExitCode.LEAKAGE and seen in refused.stderr and "--skip_leak_check" in refused.stderr
    assert not (maps / "split-0" / "best-loss" / "leaky").exists()
    forced = predict(data, tmp_path / "out", maps, "leaky", "--skip_leak_check")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((maps / "groups" / "leaky" / "maps.json").read_text())["leak_check"].startswith("skipped")


def test_training_image_copied_under_a_new_name_is_refused(full_run, tmp_path):
    root, maps = full_run
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t").participant_id.iloc[0]
    (source,) = (root / "data" / "caps" / "subjects" / seen / "ses-M000" / "t1_linear").glob("*.nii.gz")
    target = tmp_path / "data" / "caps" / "subjects" / "sub-RENAMED" / "ses-M000" / "t1_linear"
    target.mkdir(parents=True)
    shutil.copyfile(source, target / source.name.replace(seen, "sub-RENAMED"))
    (tmp_path / "data" / "bids").mkdir()
    (tmp_path / "data" / "bids" / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-RENAMED\tAD\n")
    refused = predict(tmp_path / "data", tmp_path / "out", maps, "renamed")
    assert refused.returncode == ExitCode.LEAKAGE
    assert "same scan" in refused.stderr and seen in refused.stderr and "sub-RENAMED" in refused.stderr


def test_near_duplicate_sets_how_alike_a_scan_must_be_to_count_as_seen(full_run, brains, tmp_path):
    """A training image blended 4:1 with an unseen brain: the same scan by default (r >= 0.9), a new one with a
    threshold above its correlation, which the group's record keeps."""
    root, maps = full_run
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t").participant_id.iloc[0]
    (source,) = (root / "data" / "caps" / "subjects" / seen / "ses-M000" / "t1_linear").glob("*.nii.gz")
    unseen = next((_new_dataset(tmp_path / "other", brains[1], "OTHER") / "caps" / "subjects").glob(
        "*/ses-M000/t1_linear/*.nii.gz"))
    image = nib.load(str(source))
    blend = 0.8 * image.get_fdata() + 0.2 * nib.load(str(unseen)).get_fdata()
    target = tmp_path / "data" / "caps" / "subjects" / "sub-BLEND" / "ses-M000" / "t1_linear"
    target.mkdir(parents=True)
    nib.save(nib.Nifti1Image(blend.astype(np.float32), image.affine), target / source.name.replace(seen, "sub-BLEND"))
    (tmp_path / "data" / "bids").mkdir()
    (tmp_path / "data" / "bids" / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-BLEND\tAD\n")
    refused = predict(tmp_path / "data", tmp_path / "out", maps, "blend")
    assert refused.returncode == ExitCode.LEAKAGE and f"sub-BLEND ses-M000 = {seen} ses-M000" in refused.stderr
    r = float(refused.stderr.split("(r ")[1].split(")")[0])
    assert 0.9 <= r < 0.995
    threshold = f"{r + 0.004:.3f}"
    accepted = predict(tmp_path / "data", tmp_path / "out", maps, "blend", "--near_duplicate", threshold)
    assert accepted.returncode == 0, accepted.stderr
    record = json.loads((maps / "groups" / "blend" / "maps.json").read_text())
    assert record["content_check"] == "passed" and record["predict"]["near_duplicate"] == float(threshold)
    below = predict(tmp_path / "data", tmp_path / "out", maps, "blend2", "--near_duplicate", f"{r - 0.004:.3f}")
    assert below.returncode == ExitCode.LEAKAGE


def test_unlabelled_dataset_gets_predictions_without_metrics(full_run, brains, tmp_path):
    _, maps = full_run
    data = _new_dataset(tmp_path, brains[1], "ANON")
    table = pd.read_csv(data / "bids" / "participants.tsv", sep="\t").drop(columns=["diagnosis"])
    table.to_csv(data / "bids" / "participants.tsv", sep="\t", index=False)
    done = predict(data, tmp_path / "out", maps, "unlabelled")
    assert done.returncode == 0, done.stderr
    assert "without metrics" in done.stderr
    prediction = pd.read_csv(maps / "split-0" / "best-loss" / "unlabelled" / "unlabelled_image_level_prediction.tsv",
                             sep="\t")
    assert len(prediction) == 6 and prediction.proba0.notna().all()
    # a group without metrics leaves an empty metrics file: the report and the model card skip it
    report = run_app(data / "bids", tmp_path / "out", "group", "--stages", "report", "--maps_dir", maps)
    assert report.returncode == 0, report.stderr
    assert "unlabelled" not in (maps / "model_card.md").read_text()


def test_bad_maps_are_refused_without_losing_anything(full_run, brains, tmp_path):
    _, maps = full_run
    copy = tmp_path / "maps"
    shutil.copytree(maps, copy)
    data = _new_dataset(tmp_path, brains[1], "BAD")
    record = json.loads((copy / "maps.json").read_text())
    (copy / "maps.json").write_text(json.dumps({**record, "clinicadl_app_version": "9.0.0"}))
    old = predict(data, tmp_path / "out", copy, "damaged")
    assert old.returncode == ExitCode.USAGE and "9.0.0" in old.stderr
    (copy / "maps.json").write_text(json.dumps(record))
    model = copy / "split-0" / "best-loss" / "model.pth.tar"
    model.write_bytes(model.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in copy.rglob("*.tsv")}
    broken = predict(data, tmp_path / "out", copy, "damaged")
    assert broken.returncode == ExitCode.DATA_ERROR and "model.pth.tar" in broken.stderr
    assert "Traceback" not in broken.stderr
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} changed"
    assert torch.load(copy / "split-1" / "best-loss" / "model.pth.tar", weights_only=True)["model"]


def test_exported_archive_predicts_elsewhere_and_still_refuses_a_renamed_training_image(full_run, brains, tmp_path):
    root, maps = full_run
    out = maps.parent.parent
    done = run_app(root / "data" / "bids", out, "group", "--stages", "export", "--maps_dir", maps,
                   "--card_fingerprints")
    assert done.returncode == 0, done.stderr
    archive = out / "exports" / f"{maps.name}.tar.gz"
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t", dtype=str)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        texts = {n: tar.extractfile(n).read().decode() for n in names if n.endswith((".tsv", ".json", ".md", ".txt"))}
    assert not [n for n in names if n.endswith((".nii.gz", ".pt", "_prediction.tsv", "data.tsv"))], "no image, no list"
    assert len([n for n in names if n.endswith("model.pth.tar")]) == 4
    everyone = set(pd.read_csv(root / "data" / "bids" / "participants.tsv", sep="\t").participant_id)
    assert not [(n, p) for n, text in texts.items() for p in everyone if p in text], "participants are pseudonymised"
    card = texts[f"{maps.name}/model_card.md"]
    assert "## Training fingerprints" in card
    assert f"{seen.source_sha256.isna().sum()} image(s) have no recorded source file" in card  # generated data

    # predicted in another output folder from the archive alone: the same probabilities as the MAPS gives
    data = _new_dataset(tmp_path, brains[1], "SHARED")
    elsewhere = tmp_path / "elsewhere"
    direct = predict(data, tmp_path / "direct", maps, "shared-direct")
    shared = predict(data, elsewhere, archive, "shared")
    assert direct.returncode == 0 and shared.returncode == 0, shared.stderr
    unpacked = elsewhere / "maps" / maps.name
    for fold in (0, 1):
        ours = pd.read_csv(unpacked / f"split-{fold}" / "best-loss" / "shared" / "shared_image_level_prediction.tsv",
                           sep="\t")
        theirs = pd.read_csv(maps / f"split-{fold}" / "best-loss" / "shared-direct" /
                             "shared-direct_image_level_prediction.tsv", sep="\t")
        pd.testing.assert_frame_equal(ours, theirs)
    record = json.loads((unpacked / "groups" / "shared" / "maps.json").read_text())
    assert record["content_check"] == "passed" and record["label_check"].startswith("not possible")
    interpreted = run_app(data / "bids", elsewhere, "group", "--stages", "interpret", "--maps_dir", archive,
                          "--group_name", "shared", "--caps_dir", data / "caps", "--methods", "gradients")
    assert interpreted.returncode == 0, interpreted.stderr
    assert list(unpacked.glob("split-0/best-loss/shared/interpret-gradients/group-shared_label-AD_*_mean.nii.gz"))
    test_set = predict(data, elsewhere, archive, "test")
    assert test_set.returncode == ExitCode.MISSING_INPUT and "carries no test set" in test_set.stderr

    # a training image under a new name, checked against the archive's pseudonymised signatures
    (source,) = (root / "data" / "caps" / "subjects" / seen.participant_id.iloc[0] / "ses-M000" / "t1_linear").glob(
        "*.nii.gz")
    renamed = tmp_path / "renamed"
    target = renamed / "caps" / "subjects" / "sub-RENAMED" / "ses-M000" / "t1_linear"
    target.mkdir(parents=True)
    shutil.copyfile(source, target / source.name.replace(seen.participant_id.iloc[0], "sub-RENAMED"))
    (renamed / "bids").mkdir()
    (renamed / "bids" / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-RENAMED\tAD\n")
    refused = predict(renamed, elsewhere, archive, "renamed")
    assert refused.returncode == ExitCode.LEAKAGE, refused.stderr
    assert "same scan" in refused.stderr and "sub-RENAMED" in refused.stderr
    assert seen.participant_id.iloc[0] not in refused.stderr

    # --include_participants: the archive names the training participants, so a leak is reported by name
    named = run_app(root / "data" / "bids", tmp_path / "named", "group", "--stages", "export", "--maps_dir", maps,
                    "--include_participants")
    assert named.returncode == 0, named.stderr
    with tarfile.open(tmp_path / "named" / "exports" / f"{maps.name}.tar.gz") as tar:
        seen_file = next(n for n in tar.getnames() if n.endswith("train+validation.tsv"))
        listed = pd.read_csv(tar.extractfile(seen_file), sep="\t", dtype=str)
        exported = json.loads(tar.extractfile(f"{maps.name}/maps.json").read())["exported"]
    assert set(listed.participant_id) == set(seen.participant_id) and exported["participants"] == "included"
    refused_by_name = predict(renamed, tmp_path / "fourth", tmp_path / "named" / "exports" / f"{maps.name}.tar.gz",
                              "renamed")
    assert refused_by_name.returncode == ExitCode.LEAKAGE and seen.participant_id.iloc[0] in refused_by_name.stderr

    # an edited archive: one line, nothing unpacked
    edited = tmp_path / "edited.tar.gz"
    with tarfile.open(archive) as tar, tarfile.open(edited, "w:gz") as copy:
        for member in tar.getmembers():
            content = tar.extractfile(member).read()
            if member.name.endswith("split-0/best-loss/model.pth.tar"):
                content = content[:-8] + bytes(8)
            member.size = len(content)
            copy.addfile(member, io.BytesIO(content))
    damaged = predict(data, tmp_path / "third", edited, "shared")
    assert damaged.returncode == ExitCode.DATA_ERROR and "changed since export" in damaged.stderr
    assert damaged.stderr.count("\n") == 1 and not (tmp_path / "third" / "maps" / maps.name).exists()


def test_model_card_fingerprints_list_source_digests_without_names(tmp_path):
    maps = Maps(tmp_path / "maps" / "experiment")
    maps.seen.parent.mkdir(parents=True)
    digests = ["b" * 64, "a" * 64]
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "session_id": ["ses-M000"] * 3,
                  "source_sha256": [*digests, ""]}).to_csv(maps.seen, sep="\t", index=False)
    lines = training_fingerprints(maps)
    assert lines[lines.index("```") + 1:-1] == sorted(digests), "sorted, one per line"
    assert "1 image(s) have no recorded source file" in "\n".join(lines)
    assert not [line for line in lines if "sub-0" in line]
