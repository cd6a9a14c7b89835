"""The predict stage: the selected models of every fold evaluated on a group, after the leakage guards.

A group is the split's test set ('test') or the images of another dataset (any other name). Refused, with
exit code 20, unless --skip_leak_check (recorded in the group's files):
- a participant of groups/train+validation.tsv (which holds the transfer sources' subjects too);
- an image whose BIDS source has the SHA-256 of a training image's, or whose signature matches one (the
  same scan under another name).
Image-level votes of part-based models are weighted by validation results only.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from . import __version__
from .atomic import write_json, write_tsv
from .caps import Caps
from .config import Config, Extraction, Labels, Train, plain, section_from
from .data import ImageStore, PartDataset, image_paths, part_spec
from .errors import LeakageError, MissingInputError, UsageError
from .experiment import experiment_name, load_selected, select_rows, task_from_record
from .fingerprint import KEYS, Signatures, fingerprint_rows
from .maps import Maps
from .results import evaluate_group
from .splits import SplitFolder
from .tasks import PART
from .training import Device

log = logging.getLogger("clinicadl_app")


def open_maps(path: Path) -> tuple[Maps, dict]:
    maps = Maps(path)
    if not maps.record.is_file():
        raise MissingInputError(f"{maps.root}: not a MAPS (no maps.json); check --maps_dir or train first")
    try:
        record = json.loads(maps.record.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{maps.record}: damaged ({error}); the MAPS cannot be used") from None
    made_by = str(record.get("clinicadl_app_version", ""))
    if made_by.split(".")[:2] != __version__.split(".")[:2]:
        raise UsageError(f"{maps.record}: made by clinicadl-app {made_by or 'unknown'}; this is {__version__}. "
                         f"Use the container image of version {made_by} to predict with it")
    if record.get("preprocessing") != "t1-linear":
        raise UsageError(f"{maps.record}: trained on {record.get('preprocessing')} images; this version "
                         "predicts on t1-linear images only")
    return maps, record


def group_rows(config: Config, maps: Maps, record: dict, caps: Caps) -> tuple[pd.DataFrame, bool, str]:
    """(rows, labelled, origin) of the group to predict."""
    column = record["label"]
    group = config.predict.group_name
    labels = section_from(Labels, record["labels"])
    shadow = Config(config.bids_dir, config.output_dir, "group", labels=labels,
                    train=section_from(Train, record["train"]))
    if group == "test" and config.predict.maps_dir is None:
        folder = SplitFolder(Path(record["split_directory"]))
        rows = select_rows(folder.read(folder.set_file("test"), column, labels.task), shadow)
        return rows, True, f"test set of {folder.root}"
    from .labels import build_labels

    try:
        table = build_labels(config.bids_dir, caps, labels, every_class=False)
        rows, labelled = select_rows(table.rows, shadow), True
    except UsageError as error:
        if "no column" not in error.message:
            raise
        log.warning("%s: no column '%s': predictions without metrics", config.bids_dir, column)
        images, _ = caps.index()
        rows = pd.DataFrame([(i.participant_id, i.session_id) for i in images], columns=KEYS)
        rows[column] = None
        labelled = False
    return rows.sort_values(KEYS).reset_index(drop=True), labelled, f"images of {config.bids_dir} in {caps.root}"


def check_leakage(maps: Maps, caps: Caps, rows: pd.DataFrame, threshold: float) -> list[str]:
    """Every reason this group overlaps what the MAPS was trained or selected on."""
    if not maps.seen.is_file():
        raise MissingInputError(f"{maps.seen}: missing; the MAPS does not say what it was trained on")
    seen = pd.read_csv(maps.seen, sep="\t", dtype=str, keep_default_na=False)
    problems = []
    shared = sorted(set(rows.participant_id) & set(seen.participant_id))
    if shared:
        problems.append(f"{len(shared)} participant(s) seen in training: " + ", ".join(shared[:10])
                        + (" ..." if len(shared) > 10 else ""))
    ours = fingerprint_rows(caps, rows[KEYS].drop_duplicates())
    copies = ours[(ours.source_sha256 != "") & ours.source_sha256.isin(set(seen.source_sha256) - {""})]
    if len(copies):
        problems.append("source file identical to a training image's for "
                        + ", ".join(f"{p} {s}" for p, s in copies[KEYS].itertuples(index=False)))
    if maps.seen_signatures.is_file():
        try:
            matches = Signatures.of(caps, rows[KEYS].drop_duplicates()).matches(
                Signatures.load(maps.seen_signatures), threshold)
        except ValueError:
            matches = pd.DataFrame()
            log.warning("%s: images on another grid than the training images: signatures not compared", caps.root)
        if len(matches):
            problems.append("the same scan as a training image under another name: " + ", ".join(
                f"{r.participant_id} {r.session_id} = {r.seen_participant_id} {r.seen_session_id} (r {r.correlation})"
                for r in matches.itertuples()))
    return problems


def run_predict(config: Config, maps_dir: Path) -> Maps:
    settings = config.predict
    maps, record = open_maps(settings.maps_dir or maps_dir / experiment_name(config))
    caps = Caps(config.caps_dir)
    rows, labelled, origin = group_rows(config, maps, record, caps)
    if rows.empty:
        raise MissingInputError(f"{caps.root}: no image to predict for group {settings.group_name}")
    problems = check_leakage(maps, caps, rows, settings.near_duplicate)
    if problems and not settings.skip_leak_check:
        raise LeakageError(f"group '{settings.group_name}' overlaps the data of {maps.root}: " + "; ".join(problems)
                           + ". Predicting on it would report training performance as test performance; "
                           "remove these images, or pass --skip_leak_check to do it anyway (it is recorded)")
    leak_check = ("skipped by --skip_leak_check: " + "; ".join(problems)) if problems else "passed"
    if problems:
        log.warning("leakage check skipped on request: %s", "; ".join(problems))
    _record_group(maps, rows, settings.group_name, origin, leak_check, caps, config)

    train = section_from(Train, record["train"])
    extraction = section_from(Extraction, record["extraction_settings"])
    device = Device.choose(train)
    paths = image_paths(caps, rows, extraction)
    store = ImageStore(paths)
    shape = store.validate()
    if list(shape) != list(record["input_size"])[-len(shape):] and train.mode == "image":
        raise UsageError(f"{caps.root}: images of shape {shape[1:]}, the MAPS was trained on {record['input_size']}")
    spec = part_spec(train.mode, shape[1:], extraction, caps)
    for fold in maps.folds():
        task = task_from_record(json.loads(maps.group_record("train", fold).read_text())["task"])
        if labelled or task.name == "reconstruction":
            targets = [task.target(v) for v in rows[record["label"]]]
        else:  # a stand-in the loss can read; true labels are reported as missing
            stand_in = torch.zeros((), dtype=torch.long) if task.name == "classification" else torch.zeros(1)
            targets = [stand_in] * len(rows)
        dataset = PartDataset(store, spec, targets, train.normalize)
        for metric in maps.selection_metrics(fold):
            models = load_selected(maps, fold, metric, train, tuple(record["input_size"]), task, device)
            weights = _validation_weights(maps, fold, metric, train, task)
            result = evaluate_group(models, task, train, device, rows, dataset, weights)
            if not labelled:
                result.image_metrics, result.intervals = {}, {}
                for table in (result.images, result.parts):
                    if table is not None and "true_label" in table:
                        table["true_label"] = None
                if result.parts is not None:
                    result.part_metrics = {}
            result.write(maps, fold, metric, settings.group_name, note=f"leakage check: {leak_check}")
            log.info("predict split-%d best-%s on %s: %s", fold, metric, settings.group_name,
                     ", ".join(f"{k} {v:.3f}" for k, v in result.image_metrics.items() if k in ("BA", "MAE", "loss"))
                     or "no labels")
    return maps


def _validation_weights(maps: Maps, fold: int, metric: str, train: Train, task) -> dict[int, float] | None:
    column = PART[train.mode]
    if not column:
        return None
    path = maps.prediction(fold, metric, "validation", train.mode)
    if not path.is_file():
        raise MissingInputError(f"{path}: the validation results that weigh the parts are missing; train again")
    parts = pd.read_csv(path, sep="\t")
    return task.part_weights(parts, column, train.selection_threshold)


def _record_group(maps: Maps, rows: pd.DataFrame, group: str, origin: str, leak_check: str, caps: Caps,
                  config: Config) -> None:
    data = maps.group_data(group)
    if data.is_file():
        previous = pd.read_csv(data, sep="\t", dtype=str, keep_default_na=False)
        if previous[KEYS].values.tolist() != rows[KEYS].astype(str).values.tolist() and not config.execution.overwrite:
            raise UsageError(f"{data}: group '{group}' already exists with other images; choose another "
                             "--group_name, or --overwrite")
    write_tsv(data, rows)
    write_json(maps.group_record(group), {
        "origin": origin, "caps_directory": str(caps.root), "bids_directory": str(config.bids_dir),
        "leak_check": leak_check, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "clinicadl_app_version": __version__, "predict": plain(config.predict)})

