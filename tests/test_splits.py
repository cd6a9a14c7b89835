"""labels and split stages: leakage-safe subject-level splits, reproducible to the byte, with clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from clinicadl_app.core.config import Split
from clinicadl_app.core.errors import ExitCode, UsageError
from clinicadl_app.group.splitting import baseline, make_split, subject_table
from clinicadl_app.images import templates
from clinicadl_app.layouts.caps import Caps, CapsImage
from clinicadl_app.layouts.splits import SplitFolder

from .conftest import run_app
from .group_data import make_longitudinal

CONFIG = """
[labels]
column = "diagnosis"
values = ["AD", "CN", "MCI"]
subgroups = ["MCI=sMCI,pMCI"]
[split]
n_test = 0.2
n_splits = 3
seed = 42
max_attempts = 200
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("longitudinal")
    bids, caps = make_longitudinal(root)
    config = root / "experiment.toml"
    config.write_text(CONFIG)
    return bids, caps, config


def run_split(dataset, out: Path, *extra: str):
    bids, caps, config = dataset
    return run_app(bids, out, "group", "--caps_dir", caps, "--config", config, "--stages", "labels", "split", *extra)


@pytest.fixture(scope="module")
def split_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    done = run_split(dataset, out)
    assert done.returncode == 0, done.stderr
    return out / "splits" / "diagnosis_AD_CN_MCI"


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str)


def test_files_and_subject_level_invariants(split_dir):
    labels, train, test = (read(split_dir / f) for f in ("labels.tsv", "train.tsv", "test.tsv"))
    assert list(labels.columns) == ["participant_id", "session_id", "diagnosis", "age", "sex"]
    assert set(labels.diagnosis) == {"AD", "CN", "MCI", "sMCI", "pMCI"}
    keys = ["participant_id", "session_id"]
    assert len(train.merge(labels, on=keys)) == len(train) and len(test.merge(labels, on=keys)) == len(test)
    assert len(train) + len(test) == len(labels)
    assert not set(train.participant_id) & set(test.participant_id)
    validation_subjects = []
    for fold in range(3):
        fold_train = read(split_dir / f"split-{fold}" / "train.tsv")
        validation = read(split_dir / f"split-{fold}" / "validation.tsv")
        assert not set(fold_train.participant_id) & set(validation.participant_id)
        assert not (set(fold_train.participant_id) | set(validation.participant_id)) & set(test.participant_id)
        assert len(fold_train) + len(validation) == len(train)
        validation_subjects += list(validation.participant_id.unique())
    assert sorted(validation_subjects) == sorted(train.participant_id.unique()), "validation sets partition train"
    record = json.loads((split_dir / "split.json").read_text())
    assert record["split"]["seed"] == 42 and "p_values" in record["draws"]["test"]
    population = read(split_dir / "population.tsv")
    assert {"set", "label", "participants", "sessions", "age_mean", "age_sd", "female", "male"} <= set(population)
    assert (split_dir / "population.png").stat().st_size > 5000


def test_nested_subgroups_are_split_first(split_dir):
    test, train = read(split_dir / "test.tsv"), read(split_dir / "train.tsv")
    for child in ("sMCI", "pMCI"):
        assert (test.diagnosis == child).any(), f"no {child} subject in the test set"
        test_children = set(test.participant_id[test.diagnosis == child])
        assert not test_children & set(train.participant_id), "a parent-task model would see a child test subject"


def test_same_seed_gives_byte_identical_files(dataset, split_dir, tmp_path):
    assert run_split(dataset, tmp_path).returncode == 0
    again = tmp_path / "splits" / split_dir.name
    for path in split_dir.rglob("*.tsv"):
        assert (again / path.relative_to(split_dir)).read_bytes() == path.read_bytes(), path.name


def test_age_and_sex_columns_of_other_names_balance_the_same_split(dataset, split_dir, tmp_path):
    """The same table with its age and sex columns renamed gives the same files with --age_column and
    --sex_column, and no balancing on them without."""
    bids, caps, config = dataset
    renamed = tmp_path / "bids"
    shutil.copytree(bids, renamed, symlinks=True)
    table = read(bids / "participants.tsv").rename(columns={"age": "AgeYears", "sex": "Gender"})
    table.to_csv(renamed / "participants.tsv", sep="\t", index=False)
    named = run_app(renamed, tmp_path / "named", "group", "--caps_dir", caps, "--config", config, "--stages",
                    "labels", "split", "--age_column", "AgeYears", "--sex_column", "Gender")
    assert named.returncode == 0, named.stderr
    again = tmp_path / "named" / "splits" / split_dir.name
    for path in split_dir.rglob("*.tsv"):
        assert (again / path.relative_to(split_dir)).read_bytes() == path.read_bytes(), path.name
    unnamed = run_app(renamed, tmp_path / "unnamed", "group", "--caps_dir", caps, "--config", config, "--stages",
                      "labels", "split")
    assert unnamed.returncode == 0, unnamed.stderr
    labels = read(tmp_path / "unnamed" / "splits" / split_dir.name / "labels.tsv")
    assert "age" not in labels.columns and "sex" not in labels.columns


def test_baseline_sets_hold_each_participants_first_session(dataset, tmp_path):
    bids, caps, config = dataset
    done = run_app(bids, tmp_path, "group", "--caps_dir", caps, "--config", config, "--stages", "labels", "split",
                   "--baseline_sets", "--name", "with_baseline")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "splits" / "with_baseline"
    for name in ("train", "test", "split-0/train", "split-0/validation"):
        full, first = read(folder / f"{name}.tsv"), read(folder / f"{name}_baseline.tsv")
        assert list(first.participant_id) == sorted(full.participant_id.unique())
        assert (first.session_id == first.participant_id.map(full.groupby("participant_id").session_id.min())).all()


def test_existing_split_is_sealed(dataset, split_dir):
    out = split_dir.parents[1]
    changed = run_split(dataset, out, "--split_seed", "7")
    assert changed.returncode == ExitCode.USAGE and "already exists" in changed.stderr
    assert "([split] seed 42 -> 7)" in changed.stderr, changed.stderr  # says what to undo
    same = run_split(dataset, out)
    assert same.returncode == 0


def test_a_changed_label_is_named_when_the_sealed_split_refuses(dataset, split_dir, tmp_path):
    """A label corrected in participants.tsv after the draw keeps the same sessions, so the labels stage accepts
    it; the split then refuses and says that labels.tsv changed, not only that something did."""
    bids, caps, config = dataset
    corrected = tmp_path / "bids"
    shutil.copytree(bids, corrected, symlinks=True)
    table = read(bids / "participants.tsv")
    table.loc[table.index[table.diagnosis == "AD"][0], "diagnosis"] = "CN"
    table.to_csv(corrected / "participants.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    shutil.copytree(split_dir.parents[1], out)
    refused = run_app(corrected, out, "group", "--caps_dir", caps, "--config", config, "--stages", "labels", "split")
    assert refused.returncode == ExitCode.USAGE, refused.stderr
    assert "(labels.tsv: a label, age, sex or session date of its sessions)" in refused.stderr, refused.stderr


def test_a_sealed_split_is_kept_not_drawn_again(dataset, split_dir, tmp_path):
    """A rerun with the same settings and labels keeps the files: a version that draws otherwise (as this one
    orders sessions otherwise than the last) must not move a sealed split's subjects and orphan its models."""
    out = tmp_path / "out"
    shutil.copytree(split_dir.parents[1], out)
    folder = SplitFolder(out / "splits" / split_dir.name)
    test, validation = read(folder.set_file("test")), read(folder.set_file("validation", 0))
    one, other = test.participant_id.iloc[0], validation.participant_id.iloc[0]
    for path in folder.root.rglob("*.tsv"):  # as an older version might have drawn it: the two swap sets
        if path.name not in ("labels.tsv", "dropped.tsv", "population.tsv"):
            path.write_text(path.read_text().replace(one, "SWAP").replace(other, one).replace("SWAP", other))
    record = json.loads(folder.record.read_text())
    record["membership_sha256"] = folder.membership_sha256()
    folder.record.write_text(json.dumps(record))
    before = {p: p.read_bytes() for p in folder.root.rglob("*.tsv")}
    kept = run_split(dataset, out)
    assert kept.returncode == 0 and "split: kept as drawn" in kept.stderr, kept.stderr
    counts = record["counts"]["test"]
    assert f"({counts['participants']} test participants ({counts['sessions']} images)" in kept.stderr
    assert {p: p.read_bytes() for p in folder.root.rglob("*.tsv")} == before
    assert other in read(folder.set_file("test")).participant_id.values
    for report in ("population.png", "population.tsv"):  # a deleted report is made again from the kept sets
        (folder.root / report).unlink()
    again = run_split(dataset, out)
    assert again.returncode == 0 and "kept as drawn" in again.stderr, again.stderr
    assert (folder.root / "population.png").is_file() and (folder.root / "population.tsv").is_file()
    assert {p: p.read_bytes() for p in folder.root.rglob("*.tsv") if p.name != "population.tsv"} == {
        p: data for p, data in before.items() if p.name != "population.tsv"}
    redrawn = run_split(dataset, out, "--overwrite")
    assert redrawn.returncode == 0 and one in read(folder.set_file("test")).participant_id.values



def test_participant_and_session_labels_choose_the_images_at_the_group_level(dataset, tmp_path):
    """The BIDS Apps convention: --participant_label (and --session_label) restrict the group level too. The
    others are listed in dropped.tsv with the option that left them out, the split records the choice, and a
    later run that chooses otherwise meets the sealed split."""
    bids, caps, _ = dataset
    everyone = sorted(p.name for p in bids.glob("sub-*"))
    chosen = everyone[:36]
    out = tmp_path / "out"
    done = run_split(dataset, out, "--participant_label", *[c.removeprefix("sub-") for c in chosen[:15]],
                     *chosen[15:], "--session_label", "M000", "ses-M012", "--n_splits", "2")
    assert done.returncode == 0, done.stderr
    folder = out / "splits" / "diagnosis_AD_CN_MCI"
    labels, dropped = read(folder / "labels.tsv"), read(folder / "dropped.tsv")
    assert set(labels.participant_id) <= set(chosen) and set(labels.session_id) <= {"ses-M000", "ses-M012"}
    images = {(p.parents[2].name, p.parents[1].name) for p in caps.glob("subjects/*/*/t1_linear/*.nii.gz")}
    left_out = {k for k in images if k[0] not in chosen or k[1] == "ses-M024"}
    assert left_out and any(k[1] == "ses-M024" for k in left_out) and any(k[0] not in chosen for k in left_out)
    why = {(r.participant_id, r.session_id): r.reason for r in dropped.itertuples()}
    for key in left_out:
        option = "--participant_label" if key[0] not in chosen else "--session_label"
        assert why[key] == f"not chosen by {option}", (key, why.get(key))
    assert not [k for k, reason in why.items() if "no t1-linear image" in reason and k[0] not in chosen]
    record = json.loads((folder / "split.json").read_text())["labels"]
    assert record["participant_label"] == chosen and record["session_label"] == ["ses-M000", "ses-M012"]

    another = run_split(dataset, out, "--participant_label", *chosen[:30], "--n_splits", "2")
    assert another.returncode == ExitCode.USAGE and another.stderr.count("error:") == 1, another.stderr
    assert "drawn from other labels" in another.stderr
    typo = run_split(dataset, tmp_path / "typo", "--participant_label", "999")
    assert typo.returncode == ExitCode.USAGE and "sub-999" in typo.stderr and "--participant_label" in typo.stderr
    assert typo.stderr.count("\n") == 1 and not (tmp_path / "typo" / "splits").exists()


# --- property-based invariants --------------------------------------------------------------------------

@st.composite
def tables(draw):
    n = draw(st.integers(8, 40))
    classes = draw(st.lists(st.sampled_from(["A", "B", "C"]), min_size=n, max_size=n))
    if len(set(classes)) < 2 or min(classes.count(c) for c in set(classes)) < 4:
        classes = ["A", "B"] * (n // 2) + ["A"] * (n % 2)
    rows = []
    for i, label in enumerate(classes):
        age = draw(st.one_of(st.none(), st.floats(40, 90)))
        sex = draw(st.sampled_from(["M", "F", None]))
        for k in range(draw(st.integers(1, 10))):
            rows.append({"participant_id": f"sub-{i:03d}", "session_id": f"ses-{k:02d}", "dx": label,
                         "age": np.nan if age is None else age, "sex": sex})
    return pd.DataFrame(rows)


@given(tables(), st.sampled_from([0, 2, 3]), st.sampled_from([0.0, 0.2, 0.25]), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_split_invariants(rows, n_splits, n_test, seed):
    config = Split(n_test=n_test, n_splits=n_splits, seed=seed, max_attempts=3)
    subjects_per_class = rows.groupby("participant_id").dx.first().value_counts()
    held = int(round(n_test * subjects_per_class.sum()))
    try:
        result = make_split(rows, "dx", "classification", config)
    except UsageError as error:
        if "rounds to no test subject" in error.message:  # a fraction of so few subjects that it holds none out
            assert held == 0 < n_test
            return
        # refused only when some class cannot give every fold a subject once the test set is drawn
        assert "too few" in error.message or "left after" in error.message
        assert n_splits >= 2 and (subjects_per_class - held).min() < n_splits, (subjects_per_class, held)
        return
    subjects = set(rows.participant_id)
    test = set(result.test)
    train = subjects - test
    validations = [set(f) for f in result.folds]
    assert test <= subjects and not test & train
    assert len(test) == round(n_test * len(subjects)), "the test set is the fraction asked, not a sum of roundings"
    if n_splits:
        assert len(validations) == n_splits and set().union(*validations) == train
        assert sum(map(len, validations)) == len(train), "folds overlap"
    else:
        assert len(validations) == 1 and validations[0] <= train and validations[0] != train
    again = make_split(rows, "dx", "classification", config)
    assert again.test == result.test and again.folds == result.folds


def _reference_balance(subjects: pd.DataFrame, held: set[str]) -> tuple[float, float]:
    """The smallest p-values over classes, straight from scipy: Welch's t-test on age, Fisher's test on sex."""
    p_age = p_sex = 1.0
    for _, group in subjects.groupby("cls"):
        inside = group.index.isin(list(held))
        ages_in, ages_out = group.age[inside].dropna(), group.age[~inside].dropna()
        if len(ages_in) >= 2 and len(ages_out) >= 2 and (ages_in.nunique() > 1 or ages_out.nunique() > 1):
            with warnings.catch_warnings():  # scipy warns of a set of equal ages, whose variance is 0 to us
                warnings.simplefilter("ignore", RuntimeWarning)
                p_age = min(p_age, float(stats.ttest_ind(ages_in, ages_out, equal_var=False).pvalue))
        sexes = group.sex.dropna()
        levels = sorted(sexes.unique())
        held_sex, rest_sex = sexes[sexes.index.isin(list(held))], sexes[~sexes.index.isin(list(held))]
        table = [[int((held_sex == lv).sum()) for lv in levels], [int((rest_sex == lv).sum()) for lv in levels]]
        if len(levels) == 2 and min(map(sum, table)) > 0:
            p_sex = min(p_sex, float(stats.fisher_exact(table).pvalue))
    return p_age, p_sex


@given(tables(), st.integers(0, 2**16))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_recorded_balance_is_scipys_welch_and_fisher_tests(rows, seed):
    """The draws' p-values (computed on arrays for speed) are those of scipy's tests on the sets drawn."""
    result = make_split(rows, "dx", "classification", Split(n_test=0.25, n_splits=0, seed=seed, max_attempts=5))
    subjects = subject_table(rows, "dx", "classification", 1)
    rest = subjects.drop(index=result.test)
    for draw, table, held in ((result.draws[0], subjects, result.test), (result.draws[1], rest, result.folds[0])):
        p_age, p_sex = _reference_balance(table, set(held))
        assert draw.balance[0].p_age == pytest.approx(p_age, rel=1e-9, abs=1e-12)
        assert draw.balance[0].p_sex == pytest.approx(p_sex, rel=1e-9, abs=1e-12)


def test_a_participants_first_session_counts_numbers_as_numbers():
    """BIDS does not pad session labels: ses-9 comes before ses-10, and ses-M6 before ses-M12."""
    rows = pd.DataFrame({"participant_id": ["sub-a", "sub-a", "sub-b", "sub-b", "sub-b"],
                         "session_id": ["ses-10", "ses-9", "ses-M12", "ses-M6", "ses-M24"],
                         "dx": ["AD", "CN", "AD", "MCI", "AD"], "age": [71.0, 70.0, 81.0, 80.5, 82.0]})
    first = baseline(rows)
    assert first.session_id.tolist() == ["ses-9", "ses-M6"]
    subjects = subject_table(rows, "dx", "classification", 1)
    assert subjects.stratum.tolist() == ["CN", "MCI"] and subjects.age.tolist() == [70.0, 80.5]


def _named_sessions(root: Path, dated: bool) -> tuple[Path, Path]:
    """Participants scanned at ses-pre then ses-post (a name order that puts the follow-up first), whose class
    changes between the two: CN before, AD after."""
    bids, caps = make_longitudinal(root, n=16)
    for participant in sorted(p for p in bids.glob("sub-*") if p.is_dir()):
        for folder in participant.glob("ses-*"):
            shutil.rmtree(folder)
        for session_id in ("ses-pre", "ses-post"):
            (participant / session_id / "anat").mkdir(parents=True)
        shutil.rmtree(caps / "subjects" / participant.name)
        for session_id in ("ses-pre", "ses-post"):
            target = Caps(caps).t1_linear(CapsImage(participant.name, session_id, f"{participant.name}_{session_id}"))
            target.parent.mkdir(parents=True)
            os.symlink(templates.path(templates.MNI_T1), target)
        table = pd.DataFrame({"session_id": ["ses-post", "ses-pre"], "dx": ["AD", "CN"]})
        if dated:
            table["acq_time"] = ["2012-03-01T10:00:00", "2010-02-11T09:30:00"]
        table.to_csv(participant / f"{participant.name}_sessions.tsv", sep="\t", index=False)
    return bids, caps


@pytest.mark.parametrize("dated", [True, False], ids=["acq_time", "names"])
def test_named_sessions_are_ordered_by_their_acquisition_time(tmp_path, dated):
    """ses-post sorts before ses-pre by name: acq_time in sessions.tsv puts ses-pre first, so each participant's
    baseline row and stratum are the pre-scan's (CN); without it, a warning names the file to date."""
    bids, caps = _named_sessions(tmp_path / "data", dated)
    done = group(bids, caps, tmp_path / "out", "--column", "dx", "--n_splits", "2", "--n_test", "0.25",
                 "--baseline_sets", "--max_attempts", "3")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "out" / "splits" / "dx"
    for name in ("train", "test", "split-1/validation"):
        first = read(folder / f"{name}_baseline.tsv")
        assert set(first.session_id) == ({"ses-pre"} if dated else {"ses-post"}), name
        assert set(first.dx) == ({"CN"} if dated else {"AD"})
    assert "4 test participants (8 images) and 12 training (24 images), 2 fold(s)" in done.stderr  # 2 sessions each
    warned = "sessions named without a number" in done.stderr
    assert warned != dated and (dated or "Add acq_time to sub-000_sessions.tsv" in done.stderr), done.stderr
    assert (read(folder / "labels.tsv").acq_time.notna().all()) if dated else "acq_time" not in read(
        folder / "labels.tsv")
    if dated:  # a split sealed before labels.tsv kept acq_time (its hash without the column) is kept, not refused
        labels = read(folder / "labels.tsv").drop(columns="acq_time")
        record = json.loads((folder / "split.json").read_text())
        record["labels_sha256"] = hashlib.sha256(labels.to_csv(sep="\t", index=False).encode()).hexdigest()
        (folder / "split.json").write_text(json.dumps(record))
        before = {p: p.read_bytes() for p in folder.rglob("*.tsv")}
        kept = group(bids, caps, tmp_path / "out", "--column", "dx", "--n_splits", "2", "--n_test", "0.25",
                     "--baseline_sets", "--max_attempts", "3")
        assert kept.returncode == 0 and "split: kept as drawn" in kept.stderr, kept.stderr
        assert {p: p.read_bytes() for p in folder.rglob("*.tsv")} == before
    if dated:  # a value that is no date is named, and its participant falls back to the label order
        path = bids / "sub-003" / "sub-003_sessions.tsv"
        path.write_text(path.read_text().replace("2010-02-11T09:30:00", "last spring"))
        again = run_app(bids, tmp_path / "bad", "group", "--caps_dir", caps, "--column", "dx", "--stages", "labels")
        assert again.returncode == 0, again.stderr
        assert "sub-003_sessions.tsv: acq_time 'last spring' of ses-pre is not a date" in again.stderr, again.stderr
        firsts = baseline(read(tmp_path / "bad" / "splits" / "dx" / "labels.tsv")).set_index("participant_id")
        assert firsts.session_id["sub-003"] == "ses-post" and firsts.session_id["sub-004"] == "ses-pre"


def test_equal_ages_are_not_compared_on_rounding_noise():
    """A class whose participants all have one age (57.3) has nothing to balance: numpy's variance of such ages
    is ~1e-29, not 0, and made a t statistic of rounding errors that rejected draws."""
    rows = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(24)], "session_id": "ses-M000",
                         "dx": ["AD", "CN"] * 12, "age": 57.3, "sex": ["F", "F", "M", "M"] * 6})
    result = make_split(rows, "dx", "classification", Split(n_test=0.25, n_splits=3, p_sex=0, max_attempts=1))
    assert all(draw.met for draw in result.draws)
    assert [b.p_age for draw in result.draws for b in draw.balance] == [1.0] * 4


def test_an_unmet_balance_names_each_fold(caplog):
    rows = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(30)], "session_id": "ses-M000",
                         "dx": ["AD", "CN"] * 15, "age": np.arange(30) * 1.5 + 50, "sex": ["F", "M", "M"] * 10})
    with caplog.at_level(logging.WARNING):
        make_split(rows, "dx", "classification", Split(n_test=0.2, n_splits=3, p_age=1, p_sex=1, max_attempts=2))
    (test, folds) = (r.getMessage() for r in caplog.records)
    assert test.startswith("test: no draw in 2") and "split-" not in test
    assert folds.startswith("folds: no draw in 2") and all(f"split-{i} p_age" in folds for i in range(3))


def test_regression_split_stratifies_on_bins():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(50)], "session_id": "ses-M000",
                         "age_label": rng.uniform(20, 80, 50)})
    result = make_split(rows, "age_label", "regression", Split(n_test=0.2, n_splits=0, max_attempts=2))
    test_ages = rows.set_index("participant_id").loc[result.test, "age_label"]
    assert len(result.test) == 10 and test_ages.min() < 35 and test_ages.max() > 65


def test_small_strata_do_not_inflate_the_held_out_fraction():
    """5 bins of 6 subjects at 10%: rounding each bin (0.6 -> 1) would hold out 5 subjects, not 3."""
    rows = pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(30)], "session_id": "ses-M000",
                         "score": np.linspace(0, 1, 30)})
    result = make_split(rows, "score", "regression", Split(n_test=0.1, n_splits=0, n_validation=0.3,
                                                           max_attempts=1))
    assert len(result.test) == 3 and len(result.folds[0]) == round(0.3 * 27)


# --- bad input -------------------------------------------------------------------------------------------

def group(bids, caps, out, *args):
    return run_app(bids, out, "group", "--caps_dir", caps, "--stages", "labels", "split", *args)


def test_missing_column_and_absent_value(dataset, tmp_path):
    bids, caps, _ = dataset
    missing = group(bids, caps, tmp_path / "a", "--column", "diagnosys")
    assert missing.returncode == ExitCode.USAGE
    assert "participants.tsv" in missing.stderr and "diagnosis" in missing.stderr  # names what exists
    absent = group(bids, caps, tmp_path / "b", "--column", "diagnosis", "--values", "AD", "FTD")
    assert absent.returncode == ExitCode.USAGE and "FTD" in absent.stderr


def test_a_numeric_column_taken_as_classes_says_how_to_regress(dataset, tmp_path):
    bids, caps, _ = dataset
    done = group(bids, caps, tmp_path, "--column", "age", "--n_splits", "0", "--n_test", "0")
    assert "column 'age' holds" in done.stderr and "give --task regression" in done.stderr
    regression = group(bids, caps, tmp_path / "r", "--column", "age", "--task", "regression", "--n_splits", "0")
    assert regression.returncode == 0 and "give --task regression" not in regression.stderr, regression.stderr
    ages = pd.read_csv(bids / "participants.tsv", sep="\t").age
    assert f"kept (age {ages.min():g} to {ages.max():g}, mean " in regression.stderr, regression.stderr


def test_a_set_size_that_is_no_count_of_subjects_or_leaves_none_to_train_is_refused(dataset, tmp_path):
    """1.5 subjects, a test set of everyone, 1 % of 24 subjects: each used to pass (rounded, or refused as
    "asks for 24 subjects but only 24 are available"); --n_validation beside folds was dropped in silence."""
    with pytest.raises(ValueError, match="n_test 1.5: give a fraction below 1 or a whole number"):
        Split(n_test=1.5)
    rows = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(24)], "session_id": "ses-M000",
                         "dx": ["AD", "CN"] * 12})
    for asked, message in (
            (Split(n_test=24), "n_test 24 asks for 24 test subjects of the 24, which leaves none to train on"),
            (Split(n_test=0.99), "n_test 0.99 asks for 24 test subjects of the 24"),
            (Split(n_test=0.01), "n_test 0.01 of 24 subjects rounds to no test subject; raise n_test (or 0 for"),
            (Split(n_test=4, n_splits=0, n_validation=20),
             "n_validation 20 asks for 20 validation subjects of the 20 left after the test set")):
        with pytest.raises(UsageError, match=re.escape(message)):
            make_split(rows, "dx", "classification", asked)
    bids, caps, _ = dataset
    folds = group(bids, caps, tmp_path / "folds", "--column", "diagnosis", "--n_splits", "2", "--n_validation", "3")
    assert folds.returncode == 0, folds.stderr
    assert "--n_validation: read with --n_splits 0 only; the 2 folds choose the validation subjects" in folds.stderr
    single = group(bids, caps, tmp_path / "single", "--column", "diagnosis", "--n_splits", "0", "--n_validation", "3")
    assert single.returncode == 0 and "--n_validation" not in single.stderr, single.stderr


def test_too_few_subjects_for_the_folds(dataset, tmp_path):
    bids, caps, _ = dataset
    done = group(bids, caps, tmp_path, "--column", "diagnosis", "--values", "AD", "pMCI", "--n_splits", "10")
    assert done.returncode == ExitCode.USAGE and "too few" in done.stderr and "pMCI" in done.stderr


def test_duplicate_rows_and_bad_ages(tmp_path):
    bids, caps = make_longitudinal(tmp_path / "d", n=20)
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    table.loc[3, "age"] = "sixty"
    table.loc[5, "age"] = "n/a"
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    done = group(bids, caps, tmp_path / "o1", "--column", "diagnosis", "--n_splits", "2", "--max_attempts", "5")
    assert done.returncode == 0, done.stderr
    assert "non-numeric age" in done.stderr and table.participant_id[3] in done.stderr
    pd.concat([table, table.iloc[[2]]]).to_csv(bids / "participants.tsv", sep="\t", index=False)
    duplicated = group(bids, caps, tmp_path / "o2", "--column", "diagnosis")
    assert duplicated.returncode == ExitCode.USAGE
    assert "participants.tsv" in duplicated.stderr and table.participant_id[2] in duplicated.stderr


def test_sessions_tsv_disagreeing_with_folders(tmp_path):
    bids, caps = make_longitudinal(tmp_path / "s", n=12)
    path = bids / "sub-000" / "sub-000_sessions.tsv"
    path.write_text(path.read_text() + "ses-M999\t9\n")
    done = group(bids, caps, tmp_path / "o", "--column", "diagnosis", "--n_splits", "0", "--max_attempts", "3")
    assert done.returncode == 0, "a session listed without a folder is warned about, not fatal"
    assert "sub-000_sessions.tsv" in done.stderr and "ses-M999" in done.stderr


def test_regression_label_must_be_numeric(dataset, tmp_path):
    bids, caps, _ = dataset
    done = group(bids, caps, tmp_path, "--column", "diagnosis", "--task", "regression")
    assert done.returncode == ExitCode.USAGE and "non-numeric" in done.stderr


def test_stage_needs_labels_first(dataset, tmp_path):
    bids, caps, config = dataset
    done = run_app(bids, tmp_path, "group", "--caps_dir", caps, "--config", config, "--stages", "split")
    assert done.returncode == ExitCode.USAGE and "labels stage first" in done.stderr
