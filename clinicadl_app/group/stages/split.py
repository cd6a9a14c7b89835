"""The split stage: a subject-level test set and folds, drawn once and sealed before any training.

Drawing again with other settings or labels is refused unless --overwrite; a MAPS trained on the old draw
is then refused by its membership hash (train and predict).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pandas as pd

from clinicadl_app import __version__
from clinicadl_app.core.atomic import tsv_text, write_json, write_tsv
from clinicadl_app.core.config import Config, Labels
from clinicadl_app.core.errors import UsageError
from clinicadl_app.core.provenance import differing_keys, sha256
from clinicadl_app.group.label_table import Chosen, parse_subgroups
from clinicadl_app.group.splitting import baseline, make_split, population, select
from clinicadl_app.layouts.bids import ACQ_TIME
from clinicadl_app.layouts.caps import KEYS
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")


def run_split(config: Config, folder: SplitFolder) -> None:
    labels = config.labels
    if not folder.labels.is_file():
        raise UsageError(f"{folder.labels}: no labels yet; run the labels stage first (--stages labels split)")
    rows = folder.read(folder.labels, labels.column, labels.task)
    settings = config.split
    record = {
        "labels": {"column": labels.column, "task": labels.task, "values": list(labels.values),
                   "subgroups": {k: v for k, v in parse_subgroups(labels.subgroups).items()},
                   **Chosen.of(config.execution).record()},
        "split": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
        "labels_sha256": sha256(folder.labels),
        "generated_by": {"name": "clinicadl-app", "version": __version__},
    }
    if folder.record.is_file():
        previous = json.loads(folder.record.read_text())
        if previous.get("labels_sha256") == _sha256_without_acq_time(folder.labels):
            record["labels_sha256"] = previous["labels_sha256"]  # drawn before labels.tsv kept acq_time
        same = {k: previous.get(k) for k in ("labels", "split", "labels_sha256")} == {
            k: record[k] for k in ("labels", "split", "labels_sha256")}
        if not same and not config.execution.overwrite:
            raise UsageError(
                f"{folder.record}: this split already exists with other settings or labels "
                f"({_changes(previous, record)}); a new draw could put subjects seen in training into the test set. "
                "Undo the change, use another [labels] name, or --overwrite if no model was trained on the old split"
            )
        if same and not config.execution.overwrite and previous.get("membership_sha256") == folder.membership_sha256():
            # kept, not drawn again: a later version that draws otherwise must not move a sealed split's subjects
            if not (folder.population_table.is_file() and folder.population_figure.is_file()):
                _write_population(_kept_sets(folder, labels), labels, folder)  # a deleted report, made again
            counts = previous.get("counts", {})
            test, train = (counts.get(name, {}) for name in ("test", "train"))
            log.info("split: kept as drawn (%s test participants (%s images) and %s training (%s images), %d fold(s)); "
                     "files in %s", test.get("participants", "?"), test.get("sessions", "?"),
                     train.get("participants", "?"), train.get("sessions", "?"), len(folder.folds()), folder.root)
            return
    result = make_split(rows, labels.column, labels.task, settings)
    test = select(rows, result.test)
    train = rows[~rows.participant_id.isin(result.test)].reset_index(drop=True)
    sets = {"test": test, "train": train}
    files = {folder.set_file("test"): test, folder.set_file("train"): train}
    for i, validation_ids in enumerate(result.folds):
        validation = select(train, validation_ids)
        fold_train = train[~train.participant_id.isin(validation_ids)].reset_index(drop=True)
        files[folder.set_file("train", i)] = fold_train
        files[folder.set_file("validation", i)] = validation
        sets[f"split-{i}/train"], sets[f"split-{i}/validation"] = fold_train, validation
    if settings.baseline_sets:
        for path, table in list(files.items()):
            files[path.with_name(path.stem + "_baseline.tsv")] = baseline(table)
    for path, table in files.items():
        write_tsv(path, table[[c for c in rows.columns if c in table.columns]].sort_values(KEYS))
    for fold in folder.folds():
        if fold >= len(result.folds):  # a redrawn split with fewer folds: no empty split-N may remain
            shutil.rmtree(folder.set_file("train", fold).parent)
    _write_population(sets, labels, folder)
    record["membership_sha256"] = folder.membership_sha256()
    record["draws"] = {draw.name: draw.record() for draw in result.draws}
    record["counts"] = {name: {"participants": int(t.participant_id.nunique()), "sessions": len(t)}
                        for name, t in sets.items()}
    write_json(folder.record, record)
    log.info("split: %d test participants (%d images) and %d training (%d images), %d fold(s); files in %s",
             test.participant_id.nunique(), len(test), train.participant_id.nunique(), len(train), len(result.folds),
             folder.root)


def _sha256_without_acq_time(path) -> str | None:
    """The hash labels.tsv had before it kept the sessions' acq_time (0.2.0): a split sealed then, with the same
    labels, is kept like any other, not refused for a column it never read."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if ACQ_TIME not in table:
        return None
    return hashlib.sha256(tsv_text(table.drop(columns=ACQ_TIME)).encode()).hexdigest()


def _changes(previous: dict, record: dict) -> str:
    """What differs from the sealed draw, as "[split] n_splits 3 -> 5", so the refusal says what to undo."""
    found = [f"[{section}] {key} {previous.get(section, {}).get(key)!r} -> {record[section].get(key)!r}"
             for section in ("labels", "split") for key in differing_keys(previous.get(section, {}), record[section])]
    if previous.get("labels_sha256") != record["labels_sha256"]:
        found.append("labels.tsv: a label, age, sex or session date of its sessions")
    return "; ".join(found)


def _kept_sets(folder: SplitFolder, labels: Labels) -> dict[str, pd.DataFrame]:
    return {name: folder.read(path, labels.column, labels.task) for name, path in folder.set_files().items()}


def _write_population(sets: dict[str, pd.DataFrame], labels: Labels, folder: SplitFolder) -> None:
    report = population(sets, labels.column, labels.task)
    write_tsv(folder.population_table, report)
    _population_figure(report, folder)


def _population_figure(report: pd.DataFrame, folder: SplitFolder) -> None:
    from clinicadl_app.core.figures import pyplot, save_png

    plt = pyplot()
    sets = list(dict.fromkeys(report["set"]))
    labels = list(dict.fromkeys(report["label"]))
    fig, axes = plt.subplots(1, 2 if "age_mean" in report else 1, figsize=(11, 4), squeeze=False)
    bottom = [0] * len(sets)
    for label in labels:
        counts = [int(report[(report["set"] == s) & (report["label"] == label)].participants.sum()) for s in sets]
        axes[0, 0].bar(sets, counts, bottom=bottom, label=str(label))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axes[0, 0].set_ylabel("participants")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].tick_params(axis="x", rotation=45, labelsize=7)
    if "age_mean" in report:
        for i, label in enumerate(labels):
            part = report[report["label"] == label]
            axes[0, 1].errorbar([sets.index(s) + i * 0.1 for s in part["set"]], part.age_mean, yerr=part.age_sd,
                                fmt="o", label=str(label), capsize=3)
        axes[0, 1].set_xticks(range(len(sets)), sets, rotation=45, fontsize=7)
        axes[0, 1].set_ylabel("age (mean ± sd)")
    fig.suptitle(f"population of the split in {folder.root.name}")
    fig.tight_layout()
    save_png(fig, folder.population_figure, dpi=90)
