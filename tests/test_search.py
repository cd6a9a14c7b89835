"""Hyperparameter search on Optuna: jobs started together share one study, a killed job's trial is retried,
the same seed draws the same trials, a random architecture trains and predicts from its record, the test set
is never read, and a bad space is one line. Small real runs at 4 mm, one epoch."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest

from clinicadl_app.core.config import Config, Search
from clinicadl_app.core.errors import ExitCode
from clinicadl_app.generate import Trivial, generate_trivial
from clinicadl_app.group.search_space import parse_space
from clinicadl_app.group.stages.search import _sampler
from clinicadl_app.layouts.maps import Maps

from .conftest import ROOT, run_app, source_brains, subset_caps

pytestmark = pytest.mark.slow

BASE = """
[labels]
column = "diagnosis"
[split]
n_test = 0.25
n_splits = 2
seed = 0
max_attempts = 5
[train]
epochs = 1
batch_size = 4
"""
SPACE = """
[search]
seed = 1
learning_rate = {exponent = [3, 5]}
architecture = {choice = ["random"]}
n_convblocks = {randint = [2, 3]}
network_normalization = {choice = ["BatchNorm", "InstanceNorm", "GroupNorm"]}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 subjects at 4 mm, labelled and split once: every search below starts from the sealed split."""
    root = tmp_path_factory.mktemp("search")
    generate_trivial(subset_caps(root / "sources", source_brains()[0]), root / "data",
                     Trivial(n_subjects=24, seed=5, downsample=2))
    (root / "search.toml").write_text(BASE + SPACE)
    out = root / "out"
    done = command(root, out, "--stages", "labels", "split")
    assert done.returncode == 0, done.stderr
    return root, out


def argv(root, out, *args, config="search.toml") -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), str(root / "data" / "bids"), str(out), "group", "--caps_dir",
            str(root / "data" / "caps"), "--config", str(root / config), *map(str, args)]


def command(root, out, *args, config="search.toml"):
    return run_app(*argv(root, out, *args, config=config)[2:])


def trials_of(out, name="diagnosis"):
    return pd.read_csv(out / "search" / name / "trials.tsv", sep="\t", keep_default_na=False)


def test_two_jobs_share_one_study_and_never_read_the_test_set(data):
    root, out = data
    test_file = out / "splits" / "diagnosis" / "test.tsv"
    hidden = test_file.with_name("test.hidden")
    test_file.rename(hidden)
    test_file.mkdir()  # any attempt to read the test set now fails
    try:
        jobs = [subprocess.Popen(argv(root, out, "--stages", "search", "--n_trials", "2"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [job.communicate(timeout=900) for job in jobs]
    finally:
        test_file.rmdir()
        hidden.rename(test_file)
    for job, (_, stderr) in zip(jobs, results, strict=True):
        assert job.returncode == 0, stderr
        assert "Warning" not in stderr, stderr  # the report's plots say nothing in the jobs' logs
    trials = trials_of(out)
    assert sorted(trials.number) == [0, 1, 2, 3] and set(trials.state) == {"COMPLETE"}, trials
    params = trials[[c for c in trials.columns if c.startswith("param_")]]
    assert len(params.drop_duplicates()) == 4  # four distinct points, whichever job drew them
    folder = out / "search" / "diagnosis"
    for row in trials.itertuples():
        record = json.loads((folder / row.maps / "maps.json").read_text())
        assert record["train"]["architecture"] == "random"
        assert record["train"]["n_convblocks"] == row.param_n_convblocks
        assert record["train"]["learning_rate"] == pytest.approx(row.param_learning_rate)
        assert record["search"]["trial"] == row.number and "optimistic" in record["search"]["note"]
    folds = trials[["BA_split-0", "BA_split-1"]].astype(float)
    assert (folds.mean(axis=1) - trials["BA_mean"].astype(float)).abs().max() < 1e-9
    best = json.loads((folder / "best.json").read_text())
    assert best["complete_trials"] == 4 and "optimistic" in best["note"]
    assert best["validation_BA"] == trials["BA_mean"].astype(float).max()
    assert "Leaderboard" in (folder / "report.html").read_text()
    # the best trial is a MAPS like any other: its random architecture is rebuilt from the record and predicts,
    # twice with the same outputs (eval mode)
    maps = folder / best["maps"]
    predictions = []
    for _ in range(2):
        done = command(root, out, "--stages", "predict", "--maps_dir", maps)
        assert done.returncode == 0, done.stderr
        predictions.append(pd.read_csv(maps / "split-0" / "best-BA" / "test" / "test_image_level_prediction.tsv",
                                       sep="\t"))
    pd.testing.assert_frame_equal(*predictions)
    assert len(predictions[0]) == len(pd.read_csv(test_file, sep="\t"))


@pytest.mark.parametrize("storage", ["journal", "database"])
def test_a_killed_job_leaves_a_failed_trial_that_the_next_job_retries(data, storage, tmp_path):
    """Whatever the storage, the trial's lock tells a dead job from a live one (Optuna's heartbeat only beats
    inside Study.optimize, which a search that asks and tells never calls)."""
    root, out = data
    study = f"killed-{storage}"
    database = f'storage = "sqlite:///{tmp_path / "study.db"}"\n' if storage == "database" else ""
    (root / f"{study}.toml").write_text(BASE.replace("epochs = 1", "epochs = 2") + SPACE + f'study = "{study}"\n'
                                        + database)
    job = subprocess.Popen(argv(root, out, "--stages", "search", config=f"{study}.toml"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    started = out / "search" / study / "trial-0" / "split-0" / "training_logs"
    deadline = time.monotonic() + 300
    while not started.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the trial ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    again = command(root, out, "--stages", "search", config=f"{study}.toml")
    assert again.returncode == 0, again.stderr
    assert "left running by a job that stopped" in again.stderr
    trials = trials_of(out, study)
    assert list(trials.state) == ["FAIL", "COMPLETE"]
    params = [c for c in trials.columns if c.startswith("param_")]
    assert trials.loc[1, params].tolist() == trials.loc[0, params].tolist()  # the same point, run again
    assert str(trials.loc[1, "retried_from"]) == "0"


def test_the_same_seed_and_space_draw_the_same_trials():
    space = {"learning_rate": {"exponent": [3, 5]}, "batch_size": {"choice": [2, 4, 8]},
             "dropout": {"uniform": [0.0, 0.5]}, "n_fcblocks": {"randint": [1, 3]}}
    dimensions = parse_space(space)

    def draw(seed: int) -> list[dict]:
        config = Config(bids_dir=ROOT, output_dir=ROOT, analysis_level="group", search=Search(seed=seed))
        study = optuna.create_study()
        drawn = []
        for _ in range(5):
            trial = study.ask()
            study.sampler = _sampler(config, trial.number)
            drawn.append({d.name: d.suggest(trial) for d in dimensions})
            study.tell(trial, 0.0)
        return drawn

    first, again, other = draw(1), draw(1), draw(2)
    assert first == again and first != other
    assert all(1e-5 <= d["learning_rate"] <= 1e-3 and d["batch_size"] in (2, 4, 8) and 1 <= d["n_fcblocks"] <= 3
               for d in first)
    assert len({d["learning_rate"] for d in first}) == 5


@pytest.mark.parametrize("entry, expected", [
    ("learning_rate = {normal = [3, 5]}", "learning_rate: write one sampler"),
    ("dropout = {uniform = [0.5, 0.5]}", "dropout: the range [0.5, 0.5] is empty"),
    ("batch_size = {choice = []}", "batch_size: an empty choice"),
    ("learning_rat = {exponent = [3, 5]}", "learning_rat: no [train] or [extraction] setting"),
    ("n_splits = {choice = [2, 3]}", "n_splits: no [train] or [extraction] setting"),
    ("optimizer = {choice = ['Adam', 'Adagrad']}", "optimizer must be one of"),
    ("objective = 'AUROC'\ndropout = {uniform = [0.1, 0.5]}", "objective AUROC: not a validation metric"),
])
def test_a_bad_space_is_one_line_naming_the_key(data, tmp_path, entry, expected):
    root, out = data
    (root / "bad.toml").write_text(BASE + "[search]\n" + entry + "\n")
    done = command(root, tmp_path / "out", "--stages", "search", config="bad.toml")
    assert done.returncode == ExitCode.USAGE, done.stderr
    # nothing but the error, apart from log lines (the allocator's, on a machine without mimalloc)
    errors = [line for line in done.stderr.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d \[INFO\] ", line)]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out" / "search").exists() or not list((tmp_path / "out" / "search").rglob("trial-*"))


def test_tpe_on_a_database_minimising_the_loss_with_pruning(data, tmp_path):
    """Non-default settings together: TPE, a database URL, the loss as objective,
    pruning, one fold of two, and a random architecture with strided convolutions and GroupNorm."""
    root, out = data
    database = tmp_path / "study.db"
    (root / "tpe.toml").write_text(
        BASE + 'architecture = "random"\nd_reduction = "stride"\nnetwork_normalization = "GroupNorm"\n'
        + f'[search]\nstudy = "tpe"\nsampler = "tpe"\nobjective = "loss"\npruning = true\nstorage = "sqlite:///{database}"\n'
        + "learning_rate = {exponent = [3, 4]}\nn_fcblocks = {randint = [1, 2]}\n")
    done = command(root, out, "--stages", "search", "--n_trials", "2", "--split", "1", config="tpe.toml")
    assert done.returncode == 0, done.stderr
    folder = out / "search" / "tpe"
    assert database.is_file() and not (folder / "journal.log").exists()
    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{database}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = trials_of(out, "tpe")
    assert len(trials) == 2 and set(trials.state) <= {"COMPLETE", "PRUNED"}
    assert "loss_split-1" in trials and "loss_split-0" not in trials  # the objective over the folds trained
    complete = trials[trials.state == "COMPLETE"]
    assert json.loads((folder / "best.json").read_text())["validation_loss"] == complete.loss_mean.astype(float).min()
    for trial in study.trials:
        assert len(trial.intermediate_values) >= 1  # every evaluation is reported to the pruner
    record = json.loads((folder / complete.maps.iloc[0] / "maps.json").read_text())["train"]
    assert (record["d_reduction"], record["network_normalization"]) == ("stride", "GroupNorm")


def test_pruned_trials_keep_their_curve_and_drop_their_weights(data, tmp_path):
    """A real median pruner (5 complete trials first, then learning rates from 1e-6 to 1e-2): the trials it stops
    keep their training log and lose their checkpoint and best-so-far models, and no stage takes them for
    trained models; complete trials keep theirs."""
    root, out = data
    (root / "prune.toml").write_text(BASE + "deterministic = true\n[search]\nstudy = \"pruned\"\nseed = 3\n"
                                     "pruning = true\nobjective = \"loss\"\nlearning_rate = {exponent = [2, 6]}\n"
                                     "dropout = {uniform = [0.0, 0.9]}\n")
    copy = tmp_path / "out"
    shutil.copytree(out / "splits", copy / "splits")
    done = command(root, copy, "--stages", "search", "--n_trials", "10", "--split", "0", "--epochs", "3",
                   config="prune.toml")
    assert done.returncode == 0, done.stderr
    trials = trials_of(copy, "pruned")
    pruned = trials[trials.state == "PRUNED"].number.tolist()
    assert pruned and (trials.state == "COMPLETE").sum() >= 5, trials
    folder = copy / "search" / "pruned"
    for number in trials.number:
        maps = Maps(folder / f"trial-{number}")
        assert maps.training_log(0).is_file()
        assert bool(list(maps.root.rglob("*.pth.tar"))) == (number not in pruned) == maps.trained(0), number
    refused = command(root, copy, "--stages", "predict", "--maps_dir", folder / f"trial-{pruned[0]}")
    assert refused.returncode == ExitCode.USAGE and "no split finished training; a pruned or stopped search trial: " \
        "choose a complete one" in refused.stderr, refused.stderr


def test_a_study_is_refused_on_a_redrawn_split(data, tmp_path):
    """The same settings, another draw (labels changed and split again with --overwrite): the study refuses,
    so it never mixes trials selected on two draws, whose validation subjects may be the other's test set."""
    root, out = data
    copy = tmp_path / "out"
    shutil.copytree(out / "splits", copy / "splits")
    opened = command(root, copy, "--stages", "search", "--n_trials", "0")  # the study, on the split as drawn
    assert opened.returncode == 0 and (copy / "search" / "diagnosis" / "space.toml").is_file(), opened.stderr
    record = copy / "splits" / "diagnosis" / "split.json"
    split = json.loads(record.read_text())
    split["membership_sha256"] = "0" * 64
    record.write_text(json.dumps(split))
    done = command(root, copy, "--stages", "search")
    assert done.returncode == ExitCode.USAGE and "draw of the split" in done.stderr, done.stderr
    assert not list((copy / "search" / "diagnosis").glob("trial-*"))
