"""Group level: named stages run in order; each reads what the previous ones wrote to disk.

labels -> split -> train -> predict -> interpret -> report. A split folder is sealed once split.json
exists: labels or a split made again with other settings would be refused, because a model trained on
the old split could then be evaluated on its own training subjects.
"""

from __future__ import annotations

import json
import logging
import shutil

import pandas as pd

from . import __version__
from .atomic import write_json, write_text, write_tsv
from .caps import Caps
from .config import STAGES, Config
from .errors import ExitCode, UsageError
from .labels import build_labels, parse_subgroups
from .layout import OutputLayout
from .logs import log_to_file
from .splits import KEYS, SplitFolder, baseline, make_split, population, select

log = logging.getLogger("clinicadl_app")

IMPLEMENTED = ("labels", "split", "train", "predict", "interpret", "report")


def run(config: Config) -> ExitCode:
    stages = config.execution.stages
    missing = [stage for stage in stages if stage not in IMPLEMENTED]
    if missing:
        raise UsageError(
            f"stage(s) {', '.join(missing)} are not implemented yet in this version; "
            f"run --stages {' '.join(s for s in stages if s in IMPLEMENTED) or 'labels split'}"
        )
    layout = OutputLayout(config.output_dir)
    layout.prepare(config.bids_dir)
    log_to_file(layout.run_record("group", ".log"))
    write_text(layout.run_record("group", ".toml"), config.to_toml())
    folder = SplitFolder(layout.splits_dir / config.labels.folder)
    if {"train", "predict", "interpret"} & set(stages):
        import torch

        from .allocator import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(config.execution.cpus)
    if "labels" in stages:
        labels_stage(config, folder)
    if "split" in stages:
        split_stage(config, folder)
    if "train" in stages:
        from .experiment import run_training

        run_training(config, layout.splits_dir, layout.maps_dir)
    if "predict" in stages:
        from .predict import run_predict

        run_predict(config, layout.maps_dir)
    if "interpret" in stages:
        from .interpret import run_interpret

        run_interpret(config, layout.maps_dir, asked=tuple(stages) != STAGES)
    if "report" in stages:
        from .experiment import experiment_name
        from .maps import Maps
        from .report import write_report

        maps = Maps(config.predict.maps_dir or layout.maps_dir / experiment_name(config))
        if not maps.record.is_file():
            raise UsageError(f"{maps.root}: no MAPS to report on; train first or give --maps_dir")
        write_report(maps)
    return ExitCode.OK


def labels_stage(config: Config, folder: SplitFolder) -> None:
    table = build_labels(config.bids_dir, Caps(config.caps_dir), config.labels)
    _refuse_if_sealed(folder, folder.labels, table.rows, config)
    write_tsv(folder.labels, table.rows)
    write_tsv(folder.dropped, table.dropped)
    counts = (table.rows.groupby(table.column).size().to_dict() if table.task == "classification"
              else {"sessions": len(table.rows)})
    log.info("labels: %d sessions of %d participants kept (%s); %d dropped (see %s)",
             len(table.rows), table.rows.participant_id.nunique(),
             ", ".join(f"{k} {v}" for k, v in counts.items()), len(table.dropped), folder.dropped)
    for reason, group in table.dropped.groupby("reason"):
        log.info("  dropped %d: %s", len(group), reason)


def split_stage(config: Config, folder: SplitFolder) -> None:
    labels = config.labels
    if not folder.labels.is_file():
        raise UsageError(f"{folder.labels}: no labels yet; run the labels stage first (--stages labels split)")
    rows = folder.read(folder.labels, labels.column, labels.task)
    settings = config.split
    record = {
        "labels": {"column": labels.column, "task": labels.task, "values": list(labels.values),
                   "subgroups": {k: v for k, v in parse_subgroups(labels.subgroups).items()}},
        "split": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
        "labels_sha256": _sha(folder.labels),
        "generated_by": {"name": "clinicadl-app", "version": __version__},
    }
    if folder.record.is_file():
        previous = json.loads(folder.record.read_text())
        same = {k: previous.get(k) for k in ("labels", "split", "labels_sha256")} == {
            k: record[k] for k in ("labels", "split", "labels_sha256")}
        if not same and not config.execution.overwrite:
            raise UsageError(
                f"{folder.record}: this split already exists with other settings or labels; a new draw could put "
                "subjects seen in training into the test set. Use another [labels] name, or --overwrite if no "
                "model was trained on the old split"
            )
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
    report = population(sets, labels.column, labels.task)
    write_tsv(folder.population_table, report)
    _population_figure(report, folder)
    record["membership_sha256"] = folder.membership_sha256()
    record["draws"] = {draw.name: draw.record() for draw in result.draws}
    record["counts"] = {name: {"participants": int(t.participant_id.nunique()), "sessions": len(t)}
                        for name, t in sets.items()}
    write_json(folder.record, record)
    log.info("split: %d test and %d training participants, %d fold(s); files in %s",
             test.participant_id.nunique(), train.participant_id.nunique(), len(result.folds), folder.root)


def _refuse_if_sealed(folder: SplitFolder, path, rows: pd.DataFrame, config: Config) -> None:
    if not folder.record.is_file() or not path.is_file() or config.execution.overwrite:
        return
    previous = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    current = rows.astype(str).replace({"nan": "n/a", "<NA>": "n/a", "None": "n/a"})
    if previous[KEYS].values.tolist() != current[KEYS].values.tolist():
        raise UsageError(
            f"{path}: the split in {folder.root} was drawn from other labels; a new draw could leak training "
            "subjects into the test set. Use another [labels] name, or --overwrite if no model used this split"
        )


def _sha(path) -> str:
    from .provenance import sha256

    return sha256(path)


def _population_figure(report: pd.DataFrame, folder: SplitFolder) -> None:
    from .figures import pyplot, save_png

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
