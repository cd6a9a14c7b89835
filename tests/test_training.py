"""Training on data with a known answer, made from real brains (tests/data/caps2mm, 2 mm): every task and
mode learns; BatchNorm recalibration makes early evaluations honest; runs are reproducible and resumable;
transfer learning refuses a source that saw a test subject; bad input fails before the first epoch."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clinicadl_app.core.errors import ExitCode
from clinicadl_app.core.provenance import sha256
from clinicadl_app.generate import TRIVIAL_SPLIT, Trivial, generate_trivial
from clinicadl_app.group.networks import build_network
from clinicadl_app.layouts.caps import Caps

from .conftest import CAPS2MM, ROOT, run_app, torchvision_names

EXPERIMENT = TRIVIAL_SPLIT + """
[train]
mode = "image"
architecture = "Conv5_FC3"
epochs = 4
batch_size = 4
learning_rate = 1e-4
"""
pytestmark = pytest.mark.slow


def _trivial(tmp_path_factory, downsample: int) -> Path:
    root = tmp_path_factory.mktemp(f"trivial{2 * downsample}mm")
    generate_trivial(Caps(CAPS2MM), root, Trivial(n_subjects=30, seed=0, downsample=downsample))
    (root / "experiment.toml").write_text(EXPERIMENT)
    return root


@pytest.fixture(scope="module")
def trivial(tmp_path_factory) -> Path:
    return _trivial(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def trivial4(tmp_path_factory) -> Path:
    """The same subjects at 4 mm (42x52x45), for the tests of what runs do with files and processes (resuming,
    reproducing, transfer, refusals), not of what networks learn: an epoch costs an eighth."""
    return _trivial(tmp_path_factory, 2)


def group(root: Path, out: Path, *args: str, stages=("labels", "split", "train")):
    return run_app(root / "bids", out, "group", "--caps_dir", root / "caps", "--config", root / "experiment.toml",
                   "--stages", *stages, *args)


def maps_of(out: Path) -> Path:
    (maps,) = (out / "maps").iterdir()
    return maps


def metric(maps: Path, fold: int, selection: str, group_name: str, name: str, level: str = "image") -> float:
    table = pd.read_csv(maps / f"split-{fold}" / f"best-{selection}" / group_name /
                        f"{group_name}_{level}_level_metrics.tsv", sep="\t")
    return float(table[name].iloc[0])


@pytest.fixture(scope="module")
def image_run(trivial, tmp_path_factory):
    out = tmp_path_factory.mktemp("image")
    done = group(trivial, out)
    assert done.returncode == 0, done.stderr
    return out, done.stderr


def test_image_mode_learns_the_trivial_task_in_every_fold(image_run):
    out, _ = image_run
    maps = maps_of(out)
    for fold in (0, 1):
        assert metric(maps, fold, "BA", "validation", "BA") >= 0.9


def test_every_maps_file_exists_and_parses(image_run):
    out, log = image_run
    maps = maps_of(out)
    record = json.loads((maps / "maps.json").read_text())
    assert record["label_code"] == {"AD": 0, "CN": 1} and record["input_size"] == [1, 84, 104, 90]
    assert record["train"]["architecture"] == "Conv5_FC3" and record["extraction"]["mode"] == "image"
    assert record["split"]["split"]["seed"] == 0 and record["seed"] == 0
    environment = (maps / "environment.txt").read_text()
    assert "torch " in environment and "cpu " in environment and "packages:" in environment
    from importlib.metadata import version

    for package in ("torch", "numpy", "clinicadl-app", "cmeel-mimalloc"):  # each installed package, pinned
        assert f"\n  {package}=={version(package)}\n" in environment.lower(), package
    assert "\nallocator mimalloc\n" in environment, "the pip-installed allocator was not preloaded for training"
    seen = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t")
    train = pd.read_csv(out / "splits" / "diagnosis_AD_CN" / "train.tsv", sep="\t")
    assert set(seen.participant_id) == set(train.participant_id)
    for fold in (0, 1):
        for group_name in ("train", "validation"):
            data = pd.read_csv(maps / "groups" / group_name / f"split-{fold}" / "data.tsv", sep="\t")
            split_set = pd.read_csv(out / "splits" / "diagnosis_AD_CN" / f"split-{fold}" / f"{group_name}.tsv", sep="\t")
            assert list(data.participant_id) == list(split_set.participant_id)
            group_record = json.loads((maps / "groups" / group_name / f"split-{fold}" / "maps.json").read_text())
            assert group_record["fold"] == fold and group_record["task"]["classes"] == ["AD", "CN"]
        log_table = pd.read_csv(maps / f"split-{fold}" / "training_logs" / "training.tsv", sep="\t")
        assert list(log_table.epoch) == [0, 1, 2, 3]
        assert {"loss_train", "loss_validation", "BA_validation", "data_wait_share", "images_per_second"} <= set(log_table)
        assert list((maps / f"split-{fold}" / "training_logs" / "tensorboard").glob("events.out.tfevents.*"))
        assert not (maps / f"split-{fold}" / "tmp").exists(), "checkpoints are removed when a fold finishes"
        for selection in ("loss", "BA"):
            state = torch.load(maps / f"split-{fold}" / f"best-{selection}" / "model.pth.tar", weights_only=True)
            assert state["name"] == "Conv5_FC3" and "convolutions.0.weight" in state["model"]
            for group_name in ("train", "validation"):
                prediction = pd.read_csv(maps / f"split-{fold}" / f"best-{selection}" / group_name /
                                         f"{group_name}_image_level_prediction.tsv", sep="\t")
                assert {"participant_id", "session_id", "true_label", "predicted_label", "proba0", "proba1"} <= set(prediction)
                assert len(prediction) == len(pd.read_csv(maps / "groups" / group_name / f"split-{fold}" / "data.tsv",
                                                          sep="\t"))
            # the validation loss of the selected model is the one logged at its epoch
            epoch = torch.load(maps / f"split-{fold}" / f"best-{selection}" / "model.pth.tar", weights_only=True)["epoch"]
            logged = log_table[log_table.epoch == epoch].loss_validation.iloc[-1]
            assert metric(maps, fold, selection, "validation", "loss") == pytest.approx(logged, rel=1e-4)
    assert "extracting the image tensors" in log, "a CAPS without tensors is extracted first, and says so"


@pytest.mark.parametrize(
    ("mode", "extra"),
    [  # patch and slice learn in tests/test_interpret_modes.py's full runs
        ("roi", ["--roi_list", "leftHippocampusBox", "rightHippocampusBox"]),
        ("roi", ["--roi_list", "leftHippocampusBox", "rightHippocampusBox", "--multi_network"]),
    ],
    ids=["roi", "roi-multi"],
)
def test_part_modes_learn(trivial, tmp_path, mode, extra):
    done = group(trivial, tmp_path, "--mode", mode, "--split", "0", "--epochs", "6", *extra)
    assert done.returncode == 0, done.stderr
    maps = maps_of(tmp_path)
    assert metric(maps, 0, "BA", "validation", "BA") >= 0.8
    part = {"patch": "patch_id", "roi": "roi_id", "slice": "slice_id"}[mode]
    parts = pd.read_csv(maps / "split-0" / "best-BA" / "validation" / f"validation_{mode}_level_prediction.tsv",
                        sep="\t")
    assert part in parts and parts[part].nunique() > 1
    if "--multi_network" in extra:
        assert (maps / "split-0" / "best-BA" / "network-1_model.pth.tar").exists(), "ClinicaDL 1.6.1's file name"


def test_regression_learns_a_quantity_the_images_encode(tmp_path):
    """30 subjects from 15 distinct brains (4 mm), a random left-hemisphere atrophy fraction as the target.
    With so few brains a CNN trained from scratch reaches a validation R2 of about 0.5-0.9 depending on the
    draw, so the claim is checked against a control: the same images with the targets shuffled between
    subjects, where nothing can be learnt and the validation R2 stays at or below zero."""
    data = tmp_path / "data"
    table = generate_trivial(Caps(CAPS2MM), data, Trivial(n_subjects=30, seed=1, continuous=True, downsample=2))
    shuffled = data / "shuffled"
    shuffled.mkdir()
    (shuffled / "dataset_description.json").write_text((data / "bids" / "dataset_description.json").read_text())
    table.assign(atrophy=table.atrophy.sample(frac=1, random_state=0).to_numpy()).to_csv(
        shuffled / "participants.tsv", sep="\t", index=False)
    r2 = {}
    for name, bids in (("real", data / "bids"), ("shuffled", shuffled)):
        out = tmp_path / name
        done = run_app(bids, out, "group", "--caps_dir", data / "caps", "--stages", "labels", "split", "train",
                       "--column", "atrophy", "--task", "regression", "--n_test", "0.1", "--n_splits", "0",
                       "--n_validation", "0.3", "--max_attempts", "5", "--epochs", "40", "--batch_size", "4",
                       "--learning_rate", "3e-4", "--dropout", "0.2")
        assert done.returncode == 0, done.stderr
        r2[name] = metric(maps_of(out), 0, "loss", "validation", "R2")
    assert r2["real"] > 0.4 and r2["shuffled"] < 0.1, r2
    record = json.loads((maps_of(tmp_path / "real") / "maps.json").read_text())
    assert record["task"] == "regression" and record["label_code"] is None


def test_reconstruction_loss_falls(trivial, tmp_path):
    done = group(trivial, tmp_path, "--network_task", "reconstruction", "--split", "0", "--epochs", "3",
                 "--learning_rate", "1e-3")
    assert done.returncode == 0, done.stderr
    maps = maps_of(tmp_path)
    losses = pd.read_csv(maps / "split-0" / "training_logs" / "training.tsv", sep="\t").loss_validation.tolist()
    assert losses[-1] < 0.8 * losses[0]
    assert metric(maps, 0, "loss", "validation", "SSIM") > 0
    assert math.isfinite(metric(maps, 0, "loss", "validation", "PSNR"))


def test_batchnorm_recalibration_makes_early_evaluation_reflect_the_model(trivial, tmp_path):
    """Without it, eval-mode outputs stay constant (loss ln 2, BA 0.5) although training already separates
    the classes; with it, the same weights classify the validation set."""
    runs = {}
    for recompute in (0, 64):
        out = tmp_path / f"bn{recompute}"
        done = group(trivial, out, "--split", "1", "--epochs", "4", "--batchnorm_recompute", str(recompute))
        assert done.returncode == 0, done.stderr
        runs[recompute] = pd.read_csv(maps_of(out) / "split-1" / "training_logs" / "training.tsv", sep="\t")
    stale, fresh = runs[0], runs[64]
    assert (stale.loss_train.to_numpy() == fresh.loss_train.to_numpy()).all(), "same training, only evaluation differs"
    assert fresh.BA_validation.max() >= 0.9, "the trained weights separate the validation classes"
    assert stale.BA_validation.max() <= fresh.BA_validation.max() - 0.3, "lagging statistics hide it"
    assert stale.loss_validation.min() > fresh.loss_validation.min() + 0.05


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_accumulated_batches_train_as_one_batch_and_workers_load_the_same_inputs(trivial4, tmp_path):
    """A batch of 4 equals two accumulated batches of 2 (a network without BatchNorm or dropout, the epoch's last
    short group included) and evaluating after every update leaves training unchanged; data loading processes
    give bit-identical weights, augmentation included. Also checks the random architecture's widths."""
    args = ["--split", "0", "--epochs", "1", "--deterministic", "--architecture", "random", "--n_convblocks", "2",
            "--first_conv_width", "6", "--channels_limit", "8", "--network_normalization", "InstanceNorm",
            "--dropout", "0", "--learning_rate", "1e-3", "--data_augmentation", "Noise", "Flip"]
    runs = {"batch": [], "accumulated": ["--batch_size", "2", "--accumulation_steps", "2", "--evaluation_steps", "1"],
            "workers": ["--num_workers", "2"]}
    logs = {}
    for name, extra in runs.items():
        done = group(trivial4, tmp_path / name, *args, *extra)
        assert done.returncode == 0, done.stderr
        if name == "workers" and len(os.sched_getaffinity(0)) < 2:  # the suite pins each worker to one core
            assert done.stderr.count("--num_workers 2 on 1 usable CPU(s)") == 1, done.stderr
        logs[name] = pd.read_csv(maps_of(tmp_path / name) / "split-0" / "training_logs" / "training.tsv", sep="\t")
    n_train = len(pd.read_csv(next((tmp_path / "batch").glob("splits/*/split-0/train.tsv")), sep="\t"))
    assert n_train % 4, "the last group must be short for this test"
    updates = math.ceil(n_train / 4)
    assert list(logs["batch"].step) == [updates] and list(logs["accumulated"].step) == list(range(1, updates + 1))
    assert logs["accumulated"].loss_validation.iloc[-1] == pytest.approx(logs["batch"].loss_validation.iloc[0],
                                                                         rel=1e-5, abs=1e-7)
    assert logs["accumulated"].loss_validation.iloc[0] != pytest.approx(logs["batch"].loss_validation.iloc[0],
                                                                         rel=1e-5, abs=1e-7)
    batch, workers = (_weights(maps_of(tmp_path / name) / "split-0" / "best-loss" / "model.pth.tar")
                      for name in ("batch", "workers"))
    assert all(torch.equal(batch[key], workers[key]) for key in batch)
    widths = [value.shape[0] for key, value in batch.items() if key.startswith("convolutions") and value.dim() == 5]
    assert widths == [6, 8]


def _kill_at_first_checkpoint(command: list[str], out: Path, fold: int) -> None:
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and job.poll() is None:
        found = list(out.glob(f"maps/*/split-{fold}/tmp/checkpoint.pth.tar"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None, "the run ended before its first checkpoint"
    job.send_signal(signal.SIGKILL)
    job.wait()


def test_a_killed_fold_is_not_predicted_exported_or_transferred_until_it_resumes(trivial4, tmp_path):
    """The best models of a training killed at its first epoch are only the best so far: predict and interpret
    leave that fold out with a warning (refuse it when asked by --split), export and transfer refuse it, and
    after the resume it is predicted like the other."""
    trained = group(trivial4, tmp_path, "--split", "0", "--epochs", "3", stages=("labels", "split", "train", "report"))
    assert trained.returncode == 0, trained.stderr
    assert "split-0; not trained, of the split&#x27;s 2: split-1" in (maps_of(tmp_path) / "report.html").read_text()
    command = [sys.executable, str(ROOT / "run.py"), str(trivial4 / "bids"), str(tmp_path), "group", "--caps_dir",
               str(trivial4 / "caps"), "--config", str(trivial4 / "experiment.toml"), "--split", "1", "--epochs", "3",
               "--stages", "train"]
    _kill_at_first_checkpoint(command, tmp_path, 1)
    maps = maps_of(tmp_path)
    predicted = group(trivial4, tmp_path, stages=("predict", "interpret", "report"))
    assert predicted.returncode == 0, predicted.stderr
    assert "split-0; training did not finish: split-1" in (maps / "report.html").read_text()
    assert predicted.stderr.count("training of split-1 did not finish: left out (resume with --stages train "
                                  "--split 1)") == 1, predicted.stderr  # once, though predict and interpret ask
    assert (maps / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv").is_file()
    assert (maps / "split-0" / "best-loss" / "test" / "interpret-gradients").is_dir()
    assert not (maps / "split-1" / "best-loss" / "test").exists()
    for stage, extra in (("predict", ["--split", "1"]), ("export", []),
                         ("train", ["--transfer_path", str(maps), "--experiment", "transferred", "--epochs", "3"])):
        refused = group(trivial4, tmp_path, *extra, stages=(stage,))
        assert refused.returncode == ExitCode.USAGE, refused.stderr
        assert "did not finish" in refused.stderr and "--split 1" in refused.stderr.splitlines()[-1], refused.stderr
    assert not (tmp_path / "exports").exists() and not (tmp_path / "maps" / "transferred" / "split-0").exists()
    unpredicted = group(trivial4, tmp_path, "--epochs", "3", stages=("train", "interpret"))  # resumed, not predicted
    assert unpredicted.returncode == ExitCode.USAGE and "resuming after epoch" in unpredicted.stderr
    assert "was not predicted by split-1" in unpredicted.stderr, unpredicted.stderr
    done = group(trivial4, tmp_path, "--split", "1", stages=("predict", "interpret"))
    assert done.returncode == 0 and "did not finish" not in done.stderr, done.stderr
    assert (maps / "split-1" / "best-loss" / "test" / "interpret-gradients").is_dir()


def test_deterministic_runs_and_kill_resume_give_identical_weights(trivial4, tmp_path):
    """A run, and another one killed after its first checkpoint then resumed, end with equal weights and logs:
    runs are deterministic and resuming changes nothing."""
    args = ["--split", "0", "--epochs", "3", "--deterministic", "--evaluate_train"]
    first = group(trivial4, tmp_path / "a", *args)
    assert first.returncode == 0, first.stderr
    a = maps_of(tmp_path / "a")

    # kill a second run after its first checkpoint, then start it again
    out = tmp_path / "c"
    setup = group(trivial4, out, *args, stages=("labels", "split"))
    assert setup.returncode == 0
    command = [sys.executable, str(ROOT / "run.py"), str(trivial4 / "bids"), str(out), "group", "--caps_dir",
               str(trivial4 / "caps"), "--config", str(trivial4 / "experiment.toml"), "--stages", "train", *args]
    _kill_at_first_checkpoint(command, out, 0)
    resumed = run_app(trivial4 / "bids", out, "group", "--caps_dir", trivial4 / "caps", "--config",
                      trivial4 / "experiment.toml", "--stages", "train", *args)
    assert resumed.returncode == 0 and "resuming after epoch" in resumed.stderr, resumed.stderr
    c = maps_of(out)
    for selection in ("loss", "BA"):
        for name, tensor in _weights(a / "split-0" / f"best-{selection}" / "model.pth.tar").items():
            assert torch.equal(tensor, _weights(c / "split-0" / f"best-{selection}" / "model.pth.tar")[name]), name
    columns = ["epoch", "loss_train", "BA_train", "loss_validation", "BA_validation"]  # --evaluate_train
    log_a = pd.read_csv(a / "split-0" / "training_logs" / "training.tsv", sep="\t")[columns]
    log_c = pd.read_csv(c / "split-0" / "training_logs" / "training.tsv", sep="\t")[columns]
    pd.testing.assert_frame_equal(log_a, log_c)

    # a complete fold is skipped by a rerun, and trained again from scratch with --overwrite, without what its old
    # weights predicted
    skipped = group(trivial4, out, *args, stages=("train",))
    assert skipped.returncode == 0 and "split-0: already trained; skipping" in skipped.stderr, skipped.stderr
    stale = c / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv"
    stale.parent.mkdir(parents=True)
    stale.write_text("made by the old weights\n")
    again = group(trivial4, out, *args, "--overwrite", stages=("train",))
    assert again.returncode == 0 and "split-0: training again (--overwrite)" in again.stderr, again.stderr
    assert "resuming" not in again.stderr and not stale.exists()
    for name, tensor in _weights(a / "split-0" / "best-loss" / "model.pth.tar").items():
        assert torch.equal(tensor, _weights(c / "split-0" / "best-loss" / "model.pth.tar")[name]), name
    pd.testing.assert_frame_equal(log_a, pd.read_csv(c / "split-0" / "training_logs" / "training.tsv",
                                                     sep="\t")[columns])


def test_transfer_learning(trivial4, tmp_path):
    source_out = tmp_path / "source"
    source = group(trivial4, source_out, "--network_task", "reconstruction", "--epochs", "1", "--split", "0")
    assert source.returncode == 0, source.stderr
    source_maps = maps_of(source_out)
    # same split: the source saw only training subjects -> accepted, autoencoder -> CNN
    target = run_app(trivial4 / "bids", source_out, "group", "--caps_dir", trivial4 / "caps", "--config",
                     trivial4 / "experiment.toml", "--stages", "train", "--split", "0", "--epochs", "1",
                     "--transfer_path", source_maps, "--experiment", "from_ae")
    assert target.returncode == 0, target.stderr
    assert "transfer:" in target.stderr
    seen = pd.read_csv(source_out / "maps" / "from_ae" / "groups" / "train+validation.tsv", sep="\t")
    assert set(seen.maps) == {"from_ae", source_maps.name}
    # what fold 0's weights were fitted on: both MAPS's training sessions, never fold 0's validation sessions
    fitted = pd.read_csv(source_out / "maps" / "from_ae" / "groups" / "train" / "split-0" / "fitted_on.tsv", sep="\t")
    fold0 = source_out / "splits" / "diagnosis_AD_CN" / "split-0"
    train0, validation0 = (set(pd.read_csv(fold0 / f"{s}.tsv", sep="\t").participant_id) for s in ("train", "validation"))
    assert set(fitted.maps) == {"from_ae", source_maps.name}
    assert set(fitted.participant_id) == train0 and not set(seen.participant_id) <= train0
    # CNN -> CNN: every tensor of the classifier carries over; a swapped label code is refused
    common = ("group", "--caps_dir", trivial4 / "caps", "--config", trivial4 / "experiment.toml", "--stages", "train",
              "--split", "0", "--epochs", "1", "--transfer_path", source_out / "maps" / "from_ae")
    cnn = run_app(trivial4 / "bids", source_out, *common, "--experiment", "cnn_to_cnn")
    assert cnn.returncode == 0, cnn.stderr
    copied = int(cnn.stderr.split("transfer: ")[1].split()[0])
    assert copied == len(_weights(source_out / "maps" / "cnn_to_cnn" / "split-0" / "best-loss" / "model.pth.tar"))
    source_model = source_out / "maps" / "from_ae" / "split-0"
    assert f"from {source_model / 'best-loss' / 'model.pth.tar'}" in cnn.stderr
    by_ba = run_app(trivial4 / "bids", source_out, *common, "--experiment", "cnn_from_ba",
                    "--transfer_selection_metric", "BA")
    assert by_ba.returncode == 0 and f"from {source_model / 'best-BA' / 'model.pth.tar'}" in by_ba.stderr, by_ba.stderr
    no_such = run_app(trivial4 / "bids", source_out, *common, "--experiment", "cnn_from_f1",
                      "--transfer_selection_metric", "F1_score")
    assert no_such.returncode == ExitCode.MISSING_INPUT and "transfer_selection_metric" in no_such.stderr
    assert "Traceback" not in no_such.stderr and not (source_out / "maps" / "cnn_from_f1" / "maps.json").exists()
    # another label (no test set, so nothing leaks): the classes differ -> refused before training
    sex = run_app(trivial4 / "bids", tmp_path / "sex", *common[:5], "--stages", "labels", "split", "train",
                  *common[7:], "--column", "sex", "--values", "F", "M", "--n_test", "0")
    assert sex.returncode == ExitCode.USAGE and "label code" in sex.stderr, sex.stderr
    assert not list((tmp_path / "sex").glob("maps/*/split-*/best-*"))
    # another split whose test set holds subjects the source trained on -> refused
    other = run_app(trivial4 / "bids", tmp_path / "other", "group", "--caps_dir", trivial4 / "caps", "--config",
                    trivial4 / "experiment.toml", "--stages", "labels", "split", "train", "--split_seed", "5",
                    "--transfer_path", source_maps)
    assert other.returncode == ExitCode.LEAKAGE, other.stderr
    assert "biased transfer learning" in other.stderr and "sub-TRIV" in other.stderr
    assert not list((tmp_path / "other").glob("maps/*/split-*/best-*"))


def test_bad_input_fails_before_the_first_epoch(trivial4, tmp_path):
    wrong = group(trivial4, tmp_path / "a", "--architecture", "resnet18")
    assert wrong.returncode == ExitCode.USAGE and "resnet18" in wrong.stderr
    assert not list((tmp_path / "a").glob("maps/*/split-*"))
    custom = group(trivial4, tmp_path / "b", "--architecture", "no.such:Net")
    assert custom.returncode == ExitCode.USAGE and "no.such:Net" in custom.stderr
    one_class = group(trivial4, tmp_path / "c", "--classes", "AD")
    assert one_class.returncode == ExitCode.USAGE and "needs every class" in one_class.stderr
    metric_name = group(trivial4, tmp_path / "d", "--selection_metrics", "loss", "Accuracy")
    assert metric_name.returncode == ExitCode.USAGE and "selection_metrics Accuracy" in metric_name.stderr
    too_large = group(trivial4, tmp_path / "e", "--mode", "patch", "--patch_size", "60")
    assert too_large.returncode == ExitCode.USAGE and "patch_size" in too_large.stderr
    resnet = ("--mode", "slice", "--architecture", "resnet18")
    no_file = group(trivial4, tmp_path / "f", *resnet, "--pretrained_weights", str(tmp_path / "absent.pth"))
    assert no_file.returncode == ExitCode.USAGE and f"{tmp_path / 'absent.pth'}: no such file" in no_file.stderr
    not_resnet = group(trivial4, tmp_path / "g", "--pretrained_weights", str(tmp_path / "absent.pth"))
    assert not_resnet.returncode == ExitCode.USAGE and "resnet18 only" in not_resnet.stderr
    layer = group(trivial4, tmp_path / "h", "--layer", "5", stages=("labels", "split", "train", "interpret"))
    assert layer.returncode == ExitCode.USAGE and "--layer 5: the network has 5 convolution" in layer.stderr
    words = group(trivial4, tmp_path / "i", "--network_task", "regression")  # classes are no numbers to regress on
    assert words.returncode == ExitCode.USAGE and "column 'diagnosis' holds AD, CN: a regression" in words.stderr
    regression = tmp_path / "regression.toml"
    regression.write_text(EXPERIMENT.replace('values = ["AD", "CN"]', "").replace('"diagnosis"', '"age"')
                          .replace("[labels]", '[labels]\ntask = "regression"'))
    numbers = run_app(trivial4 / "bids", tmp_path / "j", "group", "--caps_dir", trivial4 / "caps", "--config",
                      regression, "--stages", "labels", "split", "train", "--network_task", "classification")
    assert numbers.returncode == ExitCode.USAGE and "'age' is a regression label" in numbers.stderr, numbers.stderr
    for refused in (metric_name, too_large, no_file, not_resnet, layer, words, numbers):
        errors = [line for line in refused.stderr.splitlines() if "error" in line.lower()]
        assert "Traceback" not in refused.stderr and errors == refused.stderr.splitlines()[-1:], refused.stderr
    assert not list(tmp_path.glob("*/maps/*/split-*"))


def test_resnet18_slices_start_from_an_imagenet_file(trivial4, tmp_path):
    """A ResNet-18 file with torchvision's layer names (its ImageNet download) starts the network: the run says
    how much it loaded, the MAPS records the file's hash, Grad-CAM explains the last residual stage, and the same
    name with other content cannot resume into that MAPS."""
    source = build_network("resnet18", (3, 52, 42), 1000)
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision_names(source.state_dict()), weights)
    args = ("--mode", "slice", "--architecture", "resnet18", "--pretrained_weights", str(weights), "--split", "0",
            "--epochs", "1", "--methods", "grad-cam")
    done = group(trivial4, tmp_path / "out", *args, stages=("labels", "split", "train", "predict", "interpret"))
    assert done.returncode == 0, done.stderr
    loaded = len(torchvision_names(source.state_dict()))
    assert f"pretrained weights: {loaded} of the network's {loaded + 2} tensors from {weights}" in done.stderr
    maps = maps_of(tmp_path / "out")
    assert json.loads((maps / "maps.json").read_text())["pretrained_weights_sha256"] == sha256(weights)
    assert list(maps.glob("split-0/best-loss/test/interpret-grad-cam/group-test_label-*_mean.nii.gz"))
    torch.save(torchvision_names(build_network("resnet18", (3, 52, 42), 1000).state_dict()), weights)
    changed = group(trivial4, tmp_path / "out", *args, "--split", "1", stages=("train",))
    assert changed.returncode == ExitCode.USAGE and "Traceback" not in changed.stderr, changed.stderr
    assert "other settings or data (pretrained_weights_sha256 '" in changed.stderr, "the refusal says what changed"
    assert not (maps / "split-1").exists()
    reproduce = run_app(trivial4 / "bids", tmp_path / "again", "group", "--caps_dir", trivial4 / "caps",
                        "--reproduce", maps, "--stages", "labels", "split")
    assert reproduce.returncode == 0, reproduce.stderr
    assert f"pretrained_weights {weights}: other content than the recorded file's" in reproduce.stderr


def test_patience_stops_after_that_many_evaluations_without_a_large_enough_decrease(trivial4, tmp_path):
    """No loss falls by 10 in one evaluation, so with --patience 2 training stops at the third evaluation."""
    done = group(trivial4, tmp_path, "--split", "0", "--epochs", "6", "--patience", "2", "--tolerance", "10")
    assert done.returncode == 0, done.stderr
    log = pd.read_csv(maps_of(tmp_path) / "split-0" / "training_logs" / "training.tsv", sep="\t")
    assert list(log.epoch) == [0, 1, 2]
    lines = done.stderr.splitlines()
    stop = next(i for i, line in enumerate(lines) if "split-0: early stop at epoch 2" in line)
    assert "split-0 epoch 2 step" in lines[stop - 1], "the evaluation that stops training is logged before the stop"


def test_mixed_precision_trains_and_predicts_in_bfloat16_and_says_so(trivial4, tmp_path):
    """--amp end to end on the CPU: the model trained in bfloat16 predicts in bfloat16 (the precision is the
    MAPS's), twice with the same outputs, and each prediction's description.log names the device and precision."""
    done = group(trivial4, tmp_path, "--split", "0", "--epochs", "1", "--amp", "--no-gpu",
                 stages=("labels", "split", "train", "predict"))
    assert done.returncode == 0, done.stderr
    maps = maps_of(tmp_path)
    assert json.loads((maps / "maps.json").read_text())["train"]["amp"] is True
    result = maps / "split-0" / "best-loss" / "test"
    assert "device cpu, bfloat16" in (result / "description.log").read_text()
    first = (result / "test_image_level_prediction.tsv").read_text()
    again = group(trivial4, tmp_path, stages=("predict",))  # no --amp now: the MAPS's precision holds
    assert again.returncode == 0, again.stderr
    assert (result / "test_image_level_prediction.tsv").read_text() == first
    assert "device cpu, bfloat16" in (result / "description.log").read_text()


def test_missing_images_and_corrupt_tensors(trivial4, tmp_path):
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(trivial4), str(copy)], check=True)
    out = tmp_path / "out"
    assert group(copy, out, stages=("labels", "split")).returncode == 0
    subject = pd.read_csv(out / "splits" / "diagnosis_AD_CN" / "split-0" / "train.tsv", sep="\t").participant_id[0]
    image_dir = copy / "caps" / "subjects" / subject
    image_dir.rename(tmp_path / "moved")
    missing = group(copy, out, stages=("train",))
    assert missing.returncode == ExitCode.MISSING_INPUT and subject in missing.stderr
    assert not list(out.glob("maps/*/split-*/best-*"))
    (tmp_path / "moved").rename(image_dir)
    caps = Caps(copy / "caps")
    images, _ = caps.index()
    (image,) = [i for i in images if i.participant_id == subject]
    tensor = caps.image_tensor(image)
    tensor.parent.mkdir(parents=True, exist_ok=True)
    tensor.write_bytes(b"not a tensor")
    corrupt = group(copy, out, "--epochs", "1", "--split", "0", stages=("train",))
    assert corrupt.returncode == ExitCode.DATA_ERROR and "corrupt tensor" in corrupt.stderr
    assert tensor.name in corrupt.stderr and "Traceback" not in corrupt.stderr
    assert not list(out.glob("maps/*/split-*/best-*")), "nothing may be trained on a corrupt input"


def test_a_full_disk_stops_cleanly_and_the_rerun_resumes(trivial, tmp_path):
    """A file size limit makes writes past 8 MB fail as on a full disk (EFBIG rather than ENOSPC, no root
    needed): the tensors (3 MB) fit, a model (25 MB) does not. One error line, exit 73, no model or temporary
    file left in the MAPS; the rerun with space trains."""
    args = ["--split", "0", "--epochs", "1"]
    assert group(trivial, tmp_path, *args, stages=("labels", "split")).returncode == 0
    command = [sys.executable, str(ROOT / "run.py"), str(trivial / "bids"), str(tmp_path), "group", "--caps_dir",
               str(trivial / "caps"), "--config", str(trivial / "experiment.toml"), "--stages", "train", *args]
    limit = 8 << 20
    full = subprocess.run(command, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == ExitCode.CANNOT_WRITE, full.stderr
    errors = [line for line in full.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot write" in errors[0] and ".pth.tar" in errors[0], full.stderr
    assert "Traceback" not in full.stderr
    maps = maps_of(tmp_path)
    assert not list(maps.rglob("*.pth.tar")) and not list(maps.rglob(".*.tmp-*")), "nothing half-written"
    assert json.loads((maps / "maps.json").read_text())["task"] == "classification"
    again = run_app(*command[2:])
    assert again.returncode == 0, again.stderr
    reference = _weights(maps / "split-0" / "best-BA" / "model.pth.tar")
    resumed = _weights(maps / "split-0" / "best-loss" / "model.pth.tar")
    assert resumed.keys() == reference.keys() and all(torch.isfinite(t.float()).all() for t in resumed.values())


def test_transfer_single_to_multi_and_multi_to_multi_network(trivial, tmp_path):
    """Each network of a multi-network target starts from the source's network for the same part, or from the
    single network when the source has one."""
    roi = ["--mode", "roi", "--roi_list", "leftHippocampusBox", "rightHippocampusBox", "--split", "0", "--epochs", "1"]
    single = group(trivial, tmp_path, *roi, "--experiment", "single")
    assert single.returncode == 0, single.stderr
    maps = tmp_path / "maps"
    common = (*roi, "--multi_network")
    multi = group(trivial, tmp_path, *common, "--experiment", "multi", "--transfer_path", maps / "single",
                  stages=("train",))
    assert multi.returncode == 0, multi.stderr
    sources = [line.split(" from ")[1] for line in multi.stderr.splitlines() if "transfer:" in line]
    assert len(sources) == 2 and all("single/split-0/best-loss/model.pth.tar" in s for s in sources), sources
    again = group(trivial, tmp_path, *common, "--experiment", "multi_again", "--transfer_path", maps / "multi",
                  stages=("train",))
    assert again.returncode == 0, again.stderr
    sources = [line.split(" from ")[1] for line in again.stderr.splitlines() if "transfer:" in line]
    assert sorted(s.split("/")[-1] for s in sources) == ["network-0_model.pth.tar", "network-1_model.pth.tar"], sources


def test_reproduce_draws_the_recorded_split_and_retrains_identical_weights(trivial4, tmp_path):
    out = tmp_path / "out"
    everyone = pd.read_csv(trivial4 / "bids" / "participants.tsv", sep="\t").participant_id.tolist()
    chosen = everyone[:-4]  # recorded in the split: the reproduction must choose them again, or its split differs
    first = group(trivial4, out, "--split", "1", "--epochs", "2", "--deterministic", "--participant_label", *chosen)
    assert first.returncode == 0, first.stderr
    original = maps_of(out)
    assert json.loads((original / "maps.json").read_text())["split"]["labels"]["participant_label"] == chosen
    card = (original / "model_card.md").read_text()  # one fold trained: its mean, and no spread
    assert re.search(r"\| validation \| best-loss \| 1 \| \d\.\d{3} \|", card) and not re.search(r"\d ± ", card)
    untouched = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and p.suffix in (".json", ".tsv")}
    reproduce = lambda bids, target, *extra: run_app(bids, target, "group", "--caps_dir", trivial4 / "caps",  # noqa: E731
                                                     "--reproduce", original, *extra)

    # a dataset that lost a participant draws another split: refused before training, with the reason
    bids = tmp_path / "bids"
    shutil.copytree(trivial4 / "bids", bids)
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table.iloc[1:].to_csv(bids / "participants.tsv", sep="\t", index=False)
    refused = reproduce(bids, out)
    assert refused.returncode == ExitCode.NOT_REPRODUCED
    assert refused.stderr.count("clinicadl-app: error:") == 1 and "split drawn again differs" in refused.stderr
    failed = out / "maps" / f"{original.name}-reproduced"
    assert json.loads((failed / "reproduction.json").read_text())["verdict"].startswith("not reproduced")
    assert not list(failed.glob("split-*")) and not list((out / "splits").glob("*-reproduced"))

    # the right data, into the same output folder: the same split files, bit-identical weights and metrics
    done = reproduce(trivial4 / "bids", out)
    assert done.returncode == 0, done.stderr
    copy = out / "maps" / f"{original.name}-reproduced"
    (split,) = [p for p in (out / "splits").iterdir() if not p.name.endswith("-reproduced")]
    again = out / "splits" / f"{split.name}-reproduced"
    for path in [*split.glob("*.tsv"), *split.glob("split-*/*.tsv")]:
        if path.name != "dropped.tsv":
            assert path.read_bytes() == (again / path.relative_to(split)).read_bytes(), path
    models = sorted(original.glob("split-*/best-*/*.pth.tar"))
    assert [p.relative_to(original) for p in models] == [p.relative_to(copy) for p in sorted(copy.glob(
        "split-*/best-*/*.pth.tar"))] and [p.parts[-3] for p in models] == ["split-1", "split-1"]
    for path in models:
        for name, tensor in _weights(path).items():
            assert torch.equal(tensor, _weights(copy / path.relative_to(original))[name]), name
    result = json.loads((copy / "reproduction.json").read_text())
    assert result["verdict"].startswith("identical") and result["split"]["identical"]
    assert result["environment_differences"] == [] and "differ" not in done.stderr
    assert set(pd.read_csv(again / "labels.tsv", sep="\t").participant_id) == set(chosen)
    assert all(m["identical"] for m in result["models"]) and len(result["models"]) == 2
    assert result["metrics"] and all(m["difference"] == 0 for m in result["metrics"])
    assert "identical" in (copy / "reproduction.md").read_text()
    assert all(p.read_bytes() == text for p, text in untouched.items()), "the original MAPS is never touched"

    # the MAPS alone, somewhere else, under other software: the differences are named, the split still matches
    published = tmp_path / "published" / original.name
    shutil.copytree(original, published)
    environment = published / "environment.txt"
    environment.write_text(environment.read_text().replace(f"torch {torch.__version__}", "torch 2.0.0"))
    stranger = run_app(trivial4 / "bids", tmp_path / "stranger", "group", "--caps_dir", trivial4 / "caps",
                       "--reproduce", published, "--stages", "labels", "split", "--batch_size", "2")
    assert stranger.returncode == 0, stranger.stderr
    assert f"torch {torch.__version__} (recorded 2.0.0)" in stranger.stderr
    assert "[train] batch_size = 2 (recorded 4)" in stranger.stderr
    assert (tmp_path / "stranger" / "splits" / f"{split.name}-reproduced" / "split.json").is_file()

    # an exported archive is a recorded MAPS too: unpacked, its split drawn again and matched by its hash
    exported = run_app(trivial4 / "bids", out, "group", "--stages", "export", "--maps_dir", original)
    assert exported.returncode == 0, exported.stderr
    archive = out / "exports" / f"{original.name}.tar.gz"
    # the participants chosen by --participant_label travel as a number: no text of the archive names them
    with tarfile.open(archive) as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()
                 if m.name.endswith((".json", ".md", ".txt", ".tsv"))}
    assert not [(name, p) for name, text in texts.items() for p in chosen if p in text]
    shared = json.loads(texts[f"{original.name}/maps.json"])
    assert shared["split"]["labels"]["participant_label_withheld"] == len(chosen)
    assert "participant_label" not in shared["split"]["labels"] and shared["command"].count("withheld") == len(chosen)
    assert "--participant_label withheld withheld" in texts[f"{original.name}/environment.txt"]
    assert "--participant_label withheld withheld" in texts[f"{original.name}/model_card.md"]
    unnamed = run_app(trivial4 / "bids", tmp_path / "unnamed", "group", "--caps_dir", trivial4 / "caps",
                      "--reproduce", archive, "--stages", "labels", "split")
    assert unnamed.returncode == ExitCode.NOT_REPRODUCED and "whose names the export withheld" in unnamed.stderr
    from_archive = run_app(trivial4 / "bids", tmp_path / "receiver", "group", "--caps_dir", trivial4 / "caps",
                           "--reproduce", archive, "--stages", "labels", "split", "--participant_label", *chosen)
    assert from_archive.returncode == 0, from_archive.stderr
    assert "withheld" not in from_archive.stderr and "settings differ" not in from_archive.stderr
    assert (tmp_path / "receiver" / "maps" / original.name / "export.json").is_file()

    both = run_app(trivial4 / "bids", tmp_path / "x", "group", "--reproduce", original, "--config",
                   trivial4 / "experiment.toml")
    assert both.returncode == ExitCode.USAGE and both.stderr.count("\n") == 1


def _small_trainer(tmp_path: Path, amp_dtype: torch.dtype | None = None):
    """A Conv5_FC3 Trainer on 24x28x24 CPU inputs with no evaluator: for tests of its steps and checkpoints."""
    from clinicadl_app.core.config import Train
    from clinicadl_app.group.networks import build_network
    from clinicadl_app.group.runtime import Device
    from clinicadl_app.group.tasks import Classification
    from clinicadl_app.group.training import Trainer
    from clinicadl_app.layouts.maps import Maps

    torch.manual_seed(0)
    return Trainer(model=build_network("Conv5_FC3", (1, 24, 28, 24), 2), task=Classification(["AD", "CN"]),
                   settings=Train(), maps=Maps(tmp_path / "maps" / "experiment"), fold=0, network=None,
                   selection=("loss",), device=Device(torch.device("cpu"), amp_dtype), evaluator=None)


def test_a_checkpoint_written_in_the_background_holds_its_epoch_and_the_next_step_waits(tmp_path, monkeypatch):
    """The checkpoint's write overlaps the next batch: what that batch changes (BatchNorm's buffers in its
    forward; the weights and Adam's moments at the optimiser's step, which waits for the write) never reaches
    the file, however slow the disk."""
    import copy
    import threading

    from clinicadl_app.core import atomic
    from clinicadl_app.group.runtime import memory_format

    trainer = _small_trainer(tmp_path)
    inputs, target = torch.rand(2, 1, 24, 28, 24), torch.tensor([0, 1])

    def batch() -> None:
        trainer.model.train()
        out = trainer.model(inputs.contiguous(memory_format=memory_format(trainer.model)))
        trainer.criterion(out, target).backward()

    batch()
    trainer.step()  # Adam has moments to save
    weights = copy.deepcopy(trainer.model.state_dict())
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    disk = threading.Event()
    write = atomic.save_torch
    monkeypatch.setattr(atomic, "save_torch", lambda *args, **kwargs: disk.wait() and write(*args, **kwargs))
    try:
        trainer.save_checkpoint()
        batch()
        stepping = threading.Thread(target=trainer.step)
        stepping.start()
        stepping.join(timeout=2)
        waited = stepping.is_alive()
    finally:
        disk.set()
    stepping.join(timeout=60)
    trainer.saves.close()
    assert waited, "the optimiser's step did not wait for the checkpoint's write"
    saved = torch.load(trainer.maps.checkpoint(0, None), weights_only=False)
    now = trainer.model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(saved["model"][name], tensor), name
    assert not torch.equal(now["convolutions.1.running_mean"], weights["convolutions.1.running_mean"])
    assert not torch.equal(now["convolutions.0.weight"], weights["convolutions.0.weight"])
    for index, state in moments.items():
        for key, tensor in state.items():
            assert torch.equal(saved["optimizer"]["state"][index][key], tensor), key
    assert saved["state"]["step"] == 1 and trainer.state.step == 2


def test_a_float16_run_resumes_with_its_loss_scale(tmp_path):
    """float16 autocast (GPUs without bfloat16) scales the loss; the scale and its growth counter are training
    state: a resumed run must not restart them (at 65536, it would skip steps until the scale backs off)."""
    from clinicadl_app.group.runtime import memory_format

    first = _small_trainer(tmp_path, torch.float16)
    inputs, target = torch.rand(2, 1, 24, 28, 24), torch.tensor([0, 1])
    with first.device.autocast():
        out = first.model(inputs.contiguous(memory_format=memory_format(first.model)))
    first.scaler.scale(first.criterion(out.float(), target)).backward()
    first.step()  # one finite step: the scale's growth counter is at 1
    saved = first.scaler.state_dict()
    assert saved["_growth_tracker"] == 1
    first.save_checkpoint()
    first.saves.close()
    resumed = _small_trainer(tmp_path, torch.float16)
    assert resumed.scaler.state_dict() != saved  # a fresh scaler, before resuming
    assert resumed.resume()
    assert resumed.scaler.state_dict() == saved


def test_metrics_share_an_evaluation_only_when_they_selected_equal_weights():
    """write_results and predict evaluate once for metrics whose selected models are equal: equal tensors, not
    equal epochs."""
    from clinicadl_app.group.models import same_weights

    def selection(*states):
        return [(network, None, state) for network, state in states]

    state = {"epoch": 3, "model": {"w": torch.ones(3), "b": torch.zeros(2)}}
    copy = {"epoch": 3, "model": {k: v.clone() for k, v in state["model"].items()}}
    changed = {"epoch": 3, "model": {**copy["model"], "w": torch.tensor([1.0, 1.0, 1.5])}}
    assert same_weights(selection((None, state)), selection((None, copy)))
    assert not same_weights(selection((None, state)), selection((None, changed))), "same epoch number, other weights"
    assert not same_weights(selection((0, state)), selection((1, copy))), "another network of a part-based model"
    assert not same_weights(selection((0, state), (1, state)), selection((0, copy)))
