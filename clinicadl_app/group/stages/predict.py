"""The predict stage: the selected models of every fold evaluated on a group, after the leakage guards.

A group is the split's test set ('test') or the images of another dataset (any other name). First, the
MAPS must still match its split (membership hash in maps.json). Then leakage.py's rule: refused, with exit
code 20, for images that match a seen image by content, and for seen participant labels from the dataset
trained on (or whose images match); --skip_label_check and --skip_content_check waive each (both:
--skip_leak_check), and what was waived is recorded in the group's maps.json and description.log.
Images of a class the model never saw are predicted and left out of the metrics; each prediction says
whether the image passed the t1-linear quality check. Image-level votes of part-based models are weighted
by validation results only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from clinicadl_app import __version__
from clinicadl_app.core.atomic import write_json, write_tsv
from clinicadl_app.core.config import Config, Extraction, Labels, Train, plain
from clinicadl_app.core.config_file import section_from
from clinicadl_app.core.errors import LeakageError, MissingInputError, UsageError
from clinicadl_app.group.archive import exported, pseudonymised
from clinicadl_app.group.data import ImageStore, PartDataset, image_paths, part_spec
from clinicadl_app.group.experiment import experiment_name, select_rows
from clinicadl_app.group.label_table import Chosen, build_labels, chosen_images
from clinicadl_app.group.leakage import Overlap, Seen, overlap, same_place
from clinicadl_app.group.models import load_selected, open_maps, same_weights, task_from_record, trained_folds
from clinicadl_app.group.results import GroupResult, evaluate_group, validation_weights
from clinicadl_app.group.runtime import Device
from clinicadl_app.group.tasks import PART
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")


def check_split(maps: Maps, record: dict) -> SplitFolder | None:
    """The MAPS's split folder, refused when its sets are no longer those the models were trained on (a split
    redrawn with --overwrite could put training subjects in the test set). None when it is not at hand (an
    exported MAPS carries no split)."""
    if not record.get("split_directory"):
        return None
    folder = SplitFolder(maps.recorded(record["split_directory"]))
    if not folder.record.is_file():
        return None
    if folder.membership_sha256() != record.get("split_membership_sha256"):
        raise LeakageError(
            f"{folder.root}: the split was redrawn after the models of {maps.root} were trained (its membership "
            "no longer matches maps.json); its test set may hold subjects these models trained on. Train again "
            "(--stages train --overwrite), or restore the split the MAPS was trained on")
    return folder


def group_rows(config: Config, maps: Maps, record: dict, caps: Caps) -> tuple[pd.DataFrame, bool, str]:
    """(rows, labelled, origin) of the group to predict."""
    column = record["label"]
    group = config.predict.group_name
    labels = section_from(Labels, record["labels"])
    shadow = Config(config.bids_dir, config.output_dir, "group", labels=labels,
                    train=section_from(Train, record["train"]))
    chosen = Chosen.of(config.execution)
    if group == "test":  # the MAPS's own split's test set, wherever the MAPS is
        if exported(record):
            raise MissingInputError(f"{maps.root}: unpacked from an exported archive, which carries no test set; "
                                    "predict a dataset with --group_name NAME")
        folder = check_split(maps, record)
        if folder is None:
            raise MissingInputError(f"{maps.resolve(record['split_directory'], 'split folder')}: no split.json; "
                                    "the test set of this MAPS is not at hand")
        rows = select_rows(folder.read(folder.set_file("test"), column, labels.task), shadow)
        if chosen and chosen != Chosen.recorded(record["split"]["labels"]):  # check_split: the same draw
            log.warning("%s: the test set is the split's, drawn without %s; those options choose the images of "
                        "the labels stage and of new datasets", folder.root, chosen)
        return rows, True, f"test set of {folder.root}"
    try:  # a new dataset: every chosen image is predicted, those that failed QC marked in the prediction table
        table = build_labels(config.bids_dir, caps, replace(labels, keep_failed_qc=True), every_class=False,
                             chosen=chosen)
        rows, labelled = select_rows(table.rows, shadow), True
    except UsageError as error:
        if "no column" not in error.message:
            raise
        log.warning("%s: no column '%s': predictions without metrics", config.bids_dir, column)
        images, _ = chosen_images(caps, chosen)
        rows = pd.DataFrame([(i.participant_id, i.session_id) for i in images], columns=KEYS)
        rows[column] = None
        labelled = False
    origin = f"images of {config.bids_dir} in {caps.root}" + (f" chosen by {chosen}" if chosen else "")
    return rows.sort_values(KEYS).reset_index(drop=True), labelled, origin


def check_leakage(maps: Maps, record: dict, caps: Caps, rows: pd.DataFrame, config: Config) -> Overlap:
    """How this group overlaps what the MAPS was trained or selected on (leakage.py has the rule)."""
    if not maps.seen.is_file():
        raise MissingInputError(f"{maps.seen}: missing; the MAPS does not say what it was trained on")
    same_dataset = config.predict.group_name == "test" or any(
        same_place(place, mine) for place in maps.trained_on(record) for mine in (caps.root, config.bids_dir))
    return overlap(caps, rows, Seen.load(maps.seen, maps.seen_signatures), same_dataset,
                   config.predict.near_duplicate)


def run_predict(config: Config, maps_dir: Path) -> Maps | None:
    settings = config.predict
    maps, record = open_maps(settings.maps_dir or maps_dir / experiment_name(config))
    check_split(maps, record)
    folds = trained_folds(maps, config.train.folds)
    caps = Caps(config.caps_dir)
    rows, labelled, origin = group_rows(config, maps, record, caps)
    if rows.empty:
        if settings.group_name == "test" and settings.maps_dir is None:
            log.info("predict: the split has no test set (n_test = 0); nothing to predict")
            return None
        raise MissingInputError(f"{caps.root}: no image to predict for group {settings.group_name}")
    found = check_leakage(maps, record, caps, rows, config)
    skip_labels, skip_content = settings.waived
    for warning in found.warnings:
        log.warning("%s", warning)
    refused = found.unwaived(skip_labels, skip_content)
    if refused:
        waiver = found.waiver(skip_labels, skip_content)
        raise LeakageError(f"group '{settings.group_name}' overlaps the data of {maps.root}: " + "; ".join(refused)
                           + ". Predicting on it would report training performance as test performance; "
                           f"remove these images, or pass {waiver} to do it anyway (it is recorded)")
    checks = found.record(skip_labels, skip_content)
    if pseudonymised(record):
        checks["labels"] = "not possible: the exported MAPS names no participant (pseudonyms); content was checked"
        log.warning("%s: exported without participant labels; images were checked by content only", maps.root)
    leak_check = "passed" if not found else "skipped by request: " + "; ".join(found.labels + found.content)
    if found:
        log.warning("leakage check waived on request: %s", "; ".join(found.labels + found.content))
    train = section_from(Train, record["train"])
    extraction = section_from(Extraction, record["extraction_settings"])
    paths = image_paths(caps, rows, extraction)
    spec = _part_spec(record, train, extraction, caps, ImageStore(paths).validate())
    _record_group(maps, rows, settings.group_name, origin, leak_check, checks, caps, config)
    device = Device.choose(replace(train, gpu=config.train.gpu))  # where: this job's; precision: the MAPS's
    quality = _quality(caps, rows)
    for fold in folds:
        task = task_from_record(json.loads(maps.group_record("train", fold).read_text())["task"])
        known = _known_labels(task, rows, record["label"]) if labelled else pd.Series(False, index=rows.index)
        if labelled and not known.all():
            unknown = rows[~known]
            log.warning("%d image(s) of group %s have a class the model never saw (%s): predicted, but left out of "
                        "the metrics: %s", len(unknown), settings.group_name,
                        ", ".join(sorted(set(unknown[record["label"]].astype(str)))),
                        ", ".join(f"{p} {s}" for p, s in unknown[KEYS].itertuples(index=False)))
        # images with a label the model knows are scored; the others are predicted without metrics
        subsets = [(rows[mask], scored) for mask, scored in ((known, True), (~known, False)) if mask.any()]
        done: list[tuple[list, dict | None, GroupResult]] = []
        for metric in maps.selection_metrics(fold):
            models = load_selected(maps, fold, metric, train, tuple(record["input_size"]), task, device)
            weights = validation_weights(maps, fold, metric, train, task)
            result = next((r for other, w, r in done if w == weights and same_weights(models, other)), None)
            if result is None:
                results = []
                for subset, scored in subsets:
                    dataset = PartDataset(ImageStore([paths[i] for i in subset.index]), spec,
                                          _targets(task, subset[record["label"]], scored), train.normalize)
                    result = evaluate_group(models, task, train, device, subset.reset_index(drop=True), dataset,
                                            weights)
                    results.append(result if scored else _without_labels(result))
                result = _merge(results)
                result.images.insert(2, "qc_passed", [quality[key] for key in map(tuple, result.images[KEYS].values)])
                done.append((models, weights, result))
            note = f"device {device}\nleakage check: {leak_check}"
            if labelled and not known.all():
                note += f"\nimages with a class the model never saw (left out of the metrics): {int((~known).sum())}"
            result.write(maps, fold, metric, settings.group_name, note=note)
            log.info("predict split-%d best-%s on %s: %s", fold, metric, settings.group_name,
                     ", ".join(f"{k} {v:.3f}" for k, v in result.image_metrics.items() if k in ("BA", "MAE", "loss"))
                     or "no labels")
    return maps


def _part_spec(record: dict, train: Train, extraction: Extraction, caps: Caps, shape: tuple[int, ...]):
    """How the group's images are cut, refused unless they are those the MAPS was trained on: parts of another
    grid would be other parts, or more or fewer (a MAPS without `image_size` is checked on its part count)."""
    trained_on = record.get("image_size") or (record["input_size"] if train.mode == "image" else None)
    if trained_on and list(shape) != list(trained_on):
        raise UsageError(f"{caps.root}: images of shape {tuple(shape[1:])}, the MAPS was trained on images of shape "
                         f"{tuple(trained_on[1:])}; preprocess them as its training images were")
    spec = part_spec(train.mode, shape[1:], extraction, caps)
    if len(spec) != record.get("parts", len(spec)):
        raise UsageError(f"{caps.root}: images of shape {tuple(shape[1:])} give {len(spec)} parts ({train.mode}), "
                         f"the MAPS was trained on {record['parts']}; preprocess them as its training images were")
    return spec


def _targets(task, labels: pd.Series, scored: bool) -> list[torch.Tensor]:
    if scored or task.name == "reconstruction":
        return [task.target(v) for v in labels]
    # a stand-in the loss can read; the true labels are reported as missing
    stand_in = torch.zeros((), dtype=torch.long) if task.name == "classification" else torch.zeros(1)
    return [stand_in] * len(labels)


def _without_labels(result: GroupResult) -> GroupResult:
    result.image_metrics, result.intervals = {}, {}
    for table in (result.images, result.parts):
        if table is not None and "true_label" in table:
            table["true_label"] = None
    if result.parts is not None:
        result.part_metrics = {}
    return result


def _merge(results: list[GroupResult]) -> GroupResult:
    """One result from the scored images and the unscored ones: metrics are the scored images' alone."""
    first = results[0]
    if len(results) == 1:
        return first
    part_sort = KEYS + ([PART[first.level]] if first.parts is not None else [])
    first.images = pd.concat([r.images for r in results], ignore_index=True).sort_values(KEYS).reset_index(drop=True)
    if first.parts is not None:
        first.parts = pd.concat([r.parts for r in results], ignore_index=True).sort_values(part_sort) \
            .reset_index(drop=True)
    return first


def _known_labels(task, rows: pd.DataFrame, column: str) -> pd.Series:
    """Rows whose label the model can score (classification: a class it was trained on)."""
    if task.name == "classification":
        return rows[column].astype(str).isin(task.classes) & rows[column].notna()
    return rows[column].notna() if task.name == "regression" else pd.Series(True, index=rows.index)


def _quality(caps: Caps, rows: pd.DataFrame) -> dict[tuple[str, str], object]:
    """(participant, session) -> whether its registration passed QC ("n/a" for images made by another tool)."""
    found = caps.by_session()
    marks = {}
    for key in map(tuple, rows[KEYS].values.tolist()):
        quality = caps.quality(found[key]) if key in found else None
        marks[key] = bool(quality["passed"]) if quality else "n/a"
    return marks


def _record_group(maps: Maps, rows: pd.DataFrame, group: str, origin: str, leak_check: str,
                  checks: dict[str, str], caps: Caps, config: Config) -> None:
    data = maps.group_data(group)
    if data.is_file():
        previous = pd.read_csv(data, sep="\t", dtype=str, keep_default_na=False)
        if previous[KEYS].values.tolist() != rows[KEYS].astype(str).values.tolist() and not config.execution.overwrite:
            raise UsageError(f"{data}: group '{group}' already exists with other images; choose another "
                             "--group_name, or --overwrite")
    write_tsv(data, rows)
    write_json(maps.group_record(group), {
        "origin": origin, "caps_directory": maps.relative(caps.root), "bids_directory": maps.relative(config.bids_dir),
        "leak_check": leak_check, "label_check": checks["labels"], "content_check": checks["content"],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "clinicadl_app_version": __version__, "predict": plain(config.predict)})

