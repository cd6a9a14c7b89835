"""Many jobs into one OUTPUT_DIR at once, some killed with SIGKILL at random moments, then one rerun: the result is
a serial run's, nothing temporary is left, and no session or fold is processed twice to completion. This is what a
SLURM array (one subject or one fold per task, tasks preempted and requeued) does to the output folder."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from clinicadl_app.generate import TRIVIAL_SPLIT, Trivial, generate_trivial
from clinicadl_app.images.extraction import read_image
from clinicadl_app.layouts.caps import Caps

from .conftest import CAPS2MM, RAW2MM, ROOT, make_bids

pytestmark = pytest.mark.slow

SUBJECTS = {"a": "sub-child3y_T1w.nii.gz", "b": "sub-chris_T1w.nii.gz"}
LISTS = (["a"], ["b"], ["a", "b"], ["b", "a"], ["a"], ["a", "b"])
"""Six jobs on overlapping participant lists: each subject is in four of them."""


def _participant(bids: Path, out: Path, labels: list[str], cpus: int = 1) -> list[str]:
    """One array job (one core); the serial run and the rerun take both cores (two workers of one thread)."""
    return [sys.executable, str(ROOT / "run.py"), str(bids), str(out), "participant", "--n_cpus", str(cpus),
            "--skip_bids_validator", "--participant_label", *labels]


def _temporary(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith("tmp")]


def _files(out: Path) -> set[str]:
    """What a run leaves, but for its own logs and the empty lock files jobs coordinate with."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "logs" not in p.parts
            and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concurrency")
    return make_bids(root / "bids", {f"sub-{s}/anat/sub-{s}_T1w.nii.gz": RAW2MM / f for s, f in SUBJECTS.items()},
                     participants="participant_id\tage\nsub-a\t3\nsub-b\t30\n")


def test_six_participant_jobs_some_killed_then_a_rerun_equal_a_serial_run(bids, tmp_path):
    serial = tmp_path / "serial"
    done = subprocess.run(_participant(bids, serial, ["a", "b"], cpus=2), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "shared"
    chance = random.Random(0)
    jobs = [subprocess.Popen(_participant(bids, out, labels), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for labels in LISTS]
    doomed = {index: time.time() + chance.uniform(5, 60) for index in chance.sample(range(len(jobs)), 2)}
    while any(job.poll() is None for job in jobs):
        for index, when in list(doomed.items()):
            if time.time() >= when:
                jobs[index].send_signal(signal.SIGKILL)
                del doomed[index]
        time.sleep(0.2)
    killed = [job for job in jobs if job.returncode == -signal.SIGKILL]
    assert killed, "the test killed jobs while they ran"
    for job in jobs:
        if job.returncode != -signal.SIGKILL:
            assert job.returncode == 0, job.stderr.read()
    rerun = subprocess.run(_participant(bids, out, ["a", "b"], cpus=2), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr

    assert not _temporary(out), _temporary(out)
    assert _files(out) == _files(serial)
    finished = Counter(re.findall(r"(sub-\w+ ses-\w+): done in", "".join(
        p.read_text() for p in (out / "logs").glob("participant-*.log"))))
    assert finished and max(finished.values()) == 1, f"a session processed twice to completion: {finished}"

    caps, reference = Caps(out / "caps"), Caps(serial / "caps")
    images, problems = caps.index()
    assert not problems and len(images) == 2
    for image in images:
        ours, theirs = (np.asanyarray(nib.load(c.t1_linear(image)).dataobj) for c in (caps, reference))
        brain = theirs > np.percentile(theirs, 60)
        # ANTs is not bit-reproducible between two runs (docs/design.md), so compare the anatomy, not the bytes
        assert np.corrcoef(ours[brain], theirs[brain])[0, 1] > 0.98, image.name
        tensor = torch.load(caps.image_tensor(image), weights_only=True)
        assert torch.equal(tensor, read_image(caps.t1_linear(image))), "the tensor is this image's, not a killed job's"
    qc, qc_serial = (pd.read_csv(c.qc_table, sep="\t") for c in (caps, reference))
    pd.testing.assert_frame_equal(qc[["participant_id", "session_id", "image", "pass"]],
                                  qc_serial[["participant_id", "session_id", "image", "pass"]])
    for shared in ["caps/dataset_description.json", "dataset_description.json",
                   *[str(p.relative_to(serial)) for p in (serial / "caps").glob("tensor_extraction/*.json")]]:
        ours, theirs = (re.sub(r'"Date": "[^"]*"', "", (root / shared).read_text()) for root in (out, serial))
        assert ours == theirs, shared  # the same content, but for when it was written


EXPERIMENT = TRIVIAL_SPLIT + """
[train]
mode = "image"
architecture = "Conv5_FC3"
epochs = 3
batch_size = 4
deterministic = true
"""


@pytest.fixture(scope="module")
def trivial(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trivial")
    generate_trivial(Caps(CAPS2MM), root, Trivial(n_subjects=24, seed=1, downsample=2))  # 4 mm: files, not learning
    (root / "experiment.toml").write_text(EXPERIMENT)
    return root


def _group(trivial: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), str(trivial / "bids"), str(out), "group", "--caps_dir",
            str(trivial / "caps"), "--config", str(trivial / "experiment.toml"), *args]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_two_fold_jobs_one_killed_then_rerun_equal_a_serial_training_and_predict_jobs_run_at_once(
        trivial, tmp_path):
    serial = tmp_path / "serial"
    _run(_group(trivial, serial, "--stages", "labels", "split", "train"))
    out = tmp_path / "shared"
    _run(_group(trivial, out, "--stages", "labels", "split"))

    jobs = [subprocess.Popen(_group(trivial, out, "--stages", "train", "--split", str(fold)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for fold in (0, 1)]
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("maps/*/split-1/tmp/checkpoint.pth.tar")):
        time.sleep(0.05)
    time.sleep(random.Random(1).uniform(0, 2))
    jobs[1].send_signal(signal.SIGKILL)
    assert jobs[0].wait() == 0, jobs[0].stderr.read()
    jobs[1].wait()
    reruns = [subprocess.Popen(_group(trivial, out, "--stages", "train", "--split", str(fold)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for fold in (0, 1)]
    logs = [(job.wait(), job.stderr.read()) for job in reruns]
    assert all(code == 0 for code, _ in logs), logs
    assert "split-0: already trained; skipping" in logs[0][1], "fold 0 is not trained twice"
    assert "resuming after epoch" in logs[1][1] or "already trained" in logs[1][1]

    (maps,) = (out / "maps").iterdir()
    reference = serial / "maps" / maps.name
    for fold in (0, 1):
        for selection in ("loss", "BA"):
            ours = torch.load(maps / f"split-{fold}/best-{selection}/model.pth.tar", weights_only=True)["model"]
            theirs = torch.load(reference / f"split-{fold}/best-{selection}/model.pth.tar", weights_only=True)["model"]
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (fold, selection)
        columns = ["epoch", "loss_train", "loss_validation", "BA_validation"]
        logs = [pd.read_csv(m / f"split-{fold}/training_logs/training.tsv", sep="\t")[columns] for m in (maps, reference)]
        pd.testing.assert_frame_equal(*logs)
    for table in ("groups/train+validation.tsv", "groups/train/split-0/data.tsv", "groups/validation/split-1/data.tsv"):
        assert (maps / table).read_bytes() == (reference / table).read_bytes(), table
    assert not _temporary(out)

    # predict two groups at once (the test set; everyone, training subjects waived), one job per group and fold
    # (an array of --split jobs), then one job per group, all folds, on a copy
    copy = maps.with_name(maps.name + "-copy")
    shutil.copytree(maps, copy)
    groups = {"test": [], "everyone": ["--skip_leak_check"]}

    def predict(target: Path, group: str, *folds: str) -> list[str]:
        return _group(trivial, out, "--stages", "predict", "--maps_dir", str(target), "--group_name", group,
                      *groups[group], *(["--split", *folds] if folds else []))

    jobs = [subprocess.Popen(predict(maps, group, fold), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for group in groups for fold in ("0", "1")]
    assert [job.wait() for job in jobs] == [0] * 4, [job.stderr.read() for job in jobs]
    for group in groups:
        _run(predict(copy, group))
    tables = sorted(p.relative_to(copy) for group in groups for p in copy.glob(f"split-*/best-*/{group}/*.tsv"))
    assert len(tables) == 2 * 2 * 2 * 2, tables  # groups x folds x selections x (predictions, metrics)
    for table in [*tables, *(Path("groups") / group / "data.tsv" for group in groups)]:
        assert (maps / table).read_bytes() == (copy / table).read_bytes(), table
    assert not _temporary(out)
