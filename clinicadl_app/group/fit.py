"""A MAPS trained from a sealed split, fold by fold, network by network (the train and search stages).

Everything that shaped the result goes into maps.json before the first epoch; every check that can fail
(a fold with one class, an architecture that does not fit, images missing from the CAPS, a transfer
source that saw a test subject) fails before the first epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import torch

from clinicadl_app import __version__
from clinicadl_app.core.atomic import lock, write_json, write_text, write_tsv
from clinicadl_app.core.config import Config, Train, plain
from clinicadl_app.core.distributed import World
from clinicadl_app.core.errors import UsageError
from clinicadl_app.core.provenance import differing_keys, sha256
from clinicadl_app.group import augment
from clinicadl_app.group.attribution import grad_cam_layer
from clinicadl_app.group.data import ImageStore, PartDataset, image_paths, part_spec
from clinicadl_app.group.evaluation import Evaluator
from clinicadl_app.group.experiment import (
    check_task_settings,
    experiment_name,
    network_task,
    select_rows,
    selection_metrics,
)
from clinicadl_app.group.model_card import write_model_card
from clinicadl_app.group.models import build_model, load_selected, same_weights, task_record
from clinicadl_app.group.results import GroupResult, evaluate_group
from clinicadl_app.group.runtime import Device, seed_everything
from clinicadl_app.group.tasks import Classification, Task, make_task
from clinicadl_app.group.training import Trainer
from clinicadl_app.group.transfer import Transfer
from clinicadl_app.images.extraction import description as extraction_description
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.maps import Maps, environment_text
from clinicadl_app.layouts.output import container
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")

# settings that do not change a result: a MAPS may be continued with other values of these
EXECUTION_ONLY = {"folds", "num_workers", "gpu", "memory_layout"}


@dataclass
class FoldData:
    fold: int
    train: pd.DataFrame
    validation: pd.DataFrame
    task: Task
    spec: object
    train_set: PartDataset
    train_eval: PartDataset
    validation_set: PartDataset


def train_maps(config: Config, folder: SplitFolder, maps: Maps,
               report: Callable[[dict[str, float]], None] | None = None, world: World | None = None) -> Maps:
    """`report` sees the validation metrics after every evaluation (a search's pruner may stop the trial).
    The test set is read only to check a transfer source against it. With several processes (`world`), every
    one prepares and trains; only the main one writes."""
    world = world or World()
    check_task_settings(config)
    settings = config.train
    caps = Caps(config.caps_dir)
    available = folder.folds()
    folds = list(settings.folds) or available
    unknown = sorted(set(folds) - set(available))
    if unknown:
        raise UsageError(f"{folder.root}: no fold {unknown}; this split has folds {available}")
    column, task_name = config.labels.column, network_task(config)
    read = lambda path: select_rows(folder.read(path, column, config.labels.task), config)  # noqa: E731
    all_train = read(folder.set_file("train"))
    transfer = Transfer.open(settings, maps.root) if settings.transfer_path else None

    if not world.main:
        world.barrier()  # the main process extracts any tensors the CAPS lacks first
    prepared = [prepare_fold(config, caps, folder, fold, read, task_name) for fold in folds]
    if world.main:
        world.barrier()
    record = maps_record(config, folder, prepared[0], caps, maps, world)
    if transfer:
        transfer.check_compatible(record)
        for data in prepared:
            transfer.model_path(data.fold, None)
        test = read(folder.set_file("test"))
        transfer.check_leakage(caps, config.bids_dir, test, {data.fold: data.validation for data in prepared})
    if world.main:
        _write_records(config, maps, record, folder, caps, all_train, prepared, transfer)
    world.barrier()  # the others read nothing the main process writes before this point
    for data in prepared:
        if world.broadcast(maps.trained(data.fold, selection_metrics(config, data.task))):
            if not config.execution.overwrite:
                log.info("split-%d: already trained; skipping (--overwrite trains it again)", data.fold)
                continue
            if world.main:  # what the old weights predicted and explained must not outlive them
                log.warning("split-%d: training again (--overwrite); its models, predictions and maps are removed "
                            "first", data.fold)
                shutil.rmtree(maps.fold_dir(data.fold))
            world.barrier()
        train_fold(config, maps, data, transfer, report, world)
    if world.main:
        write_model_card(maps, config.export.card_fingerprints)  # the report stage writes it again with test metrics
    return maps


def _write_records(config: Config, maps: Maps, record: dict, folder: SplitFolder, caps: Caps,
                   all_train: pd.DataFrame, prepared: list[FoldData], transfer) -> None:
    column = config.labels.column
    _write_maps_record(maps, record, config.execution.overwrite)
    own = _write_seen(maps, all_train, caps, transfer)
    for data in prepared:
        write_tsv(maps.fitted_on(data.fold), _fitted_on(own, data, transfer))
        for group, rows in (("train", data.train), ("validation", data.validation)):
            write_tsv(maps.group_data(group, data.fold), rows)
            write_json(maps.group_record(group, data.fold), {
                "caps_directory": maps.relative(caps.root), "split_directory": maps.relative(folder.root),
                "fold": data.fold, "label": column, "origin": "split", "task": task_record(data.task)})


def prepare_fold(config: Config, caps: Caps, folder: SplitFolder, fold: int, read, task_name: str) -> FoldData:
    settings = config.train
    train, validation = read(folder.set_file("train", fold)), read(folder.set_file("validation", fold))
    column = config.labels.column
    if task_name == "classification":
        classes = sorted(set(train[column].astype(str)) | set(validation[column].astype(str)))
        missing = sorted(set(classes) - set(train[column].astype(str)))
        if len(set(train[column])) < 2 or missing:
            raise UsageError(
                f"{folder.set_file('train', fold)}: the training set of fold {fold} holds only "
                f"{', '.join(sorted(set(train[column].astype(str))))}; a classifier needs every class "
                f"({', '.join(classes)}): split again with fewer folds or more subjects"
            )
    else:
        classes = None
    task = make_task(task_name, train, column, settings.loss, settings.class_weights, classes)
    extraction = config.extraction
    paths_train = image_paths(caps, train, extraction)
    paths_validation = image_paths(caps, validation, extraction)
    train_store, validation_store = ImageStore(paths_train), ImageStore(paths_validation)
    shape = train_store.validate()[1:]
    if validation_store.validate()[1:] != shape:
        raise UsageError(f"{folder.root}: validation images differ in shape from training images")
    spec = part_spec(settings.mode, shape, extraction, caps)
    shapes = sorted({tuple(spec.cut(train_store.image(0), part).shape[1:]) for part in spec.ids})
    if len(shapes) > 1:  # ROIs cropped to boxes of different sizes; every network takes one input shape
        raise UsageError(f"[extraction] roi_list {', '.join(extraction.roi_list)}: the ROI boxes differ in shape "
                         f"({', '.join('x'.join(map(str, s)) for s in shapes)}); pass --roi_uncrop_output (each ROI "
                         "masked in the whole image) or use masks whose boxes have one size")
    targets = lambda rows: [task.target(v) for v in rows[column]] if task_name != "reconstruction" \
        else [task.target(None)] * len(rows)  # noqa: E731
    transform = augment.build(settings.data_augmentation)
    train_set = PartDataset(train_store, spec, targets(train), settings.normalize, transform=transform,
                            seed=settings.seed)
    train_eval = PartDataset(train_store, spec, targets(train), settings.normalize)
    validation_set = PartDataset(validation_store, spec, targets(validation), settings.normalize)
    return FoldData(fold, train, validation, task, spec, train_set, train_eval, validation_set)


def input_shape(data: FoldData) -> tuple[int, ...]:
    return tuple(data.train_eval[0]["input"].shape)


def maps_record(config: Config, folder: SplitFolder, data: FoldData, caps: Caps, maps: Maps,
                world: World | None = None) -> dict:
    settings = config.train
    in_shape = input_shape(data)
    model = build_model(settings, in_shape, data.task, pretrained=True)  # a misfit architecture fails now
    if "interpret" in config.execution.stages and "grad-cam" in config.interpret.methods \
            and data.task.name != "reconstruction":
        grad_cam_layer(model, config.interpret.layer)  # and a Grad-CAM layer it lacks, before any epoch
    train = plain(settings)
    weights = settings.pretrained_weights
    return {
        "clinicadl_app_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "experiment": experiment_name(config),
        "task": network_task(config),
        "label": config.labels.column,
        "label_code": data.task.label_code if isinstance(data.task, Classification) else None,
        "classes": data.task.classes if isinstance(data.task, Classification) else None,
        "input_size": list(in_shape),
        "image_size": list(data.train_eval.store.image(0).shape),
        "mode": settings.mode,
        "parts": len(data.spec),
        "part_ids": list(data.spec.ids),
        "selection_metrics": list(selection_metrics(config, data.task)),
        "seed": settings.seed,
        "train": train,
        "pretrained_weights_sha256": sha256(weights) if weights else None,
        "labels": plain(config.labels),
        "split": json.loads(folder.record.read_text()),
        "split_membership_sha256": folder.recorded_membership_sha256(),
        "split_directory": maps.relative(folder.root),
        "caps_directory": maps.relative(caps.root),
        "bids_directory": maps.relative(config.bids_dir),
        "extraction": extraction_description(settings.mode, config.extraction, caps),
        "extraction_settings": plain(config.extraction),
        "preprocessing": "t1-linear",
        "command": sys.argv,
        "command_line": shlex.join(["clinicadl-app", *sys.argv[1:]]),
        "working_directory": os.getcwd(),
        "container": container(),
        "processes": (world or World()).size,
    }


def _comparable(record: dict) -> dict:
    train = {k: v for k, v in record["train"].items() if k not in EXECUTION_ONLY}
    keep = ("task", "label", "label_code", "input_size", "mode", "labels", "extraction", "pretrained_weights_sha256")
    return {"train": train, "split": record["split"].get("labels_sha256"), **{k: record.get(k) for k in keep}}


def _differences(previous: dict, record: dict, shown: int = 4) -> list[str]:
    """What binds a MAPS and changed, as "[section] key old -> new", so the refusal says what to undo."""
    def short(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 24 else text[:20] + "...'"

    before, now = _comparable(previous), _comparable(record)
    found = []
    for key in differing_keys(before, now):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"[{key}] {name} {short(old.get(name))} -> {short(new.get(name))}"
                      for name in differing_keys(old, new)]
        else:
            found.append(f"{key} {short(old)} -> {short(new)}")
    return found[:shown] + ([f"{len(found) - shown} more"] if len(found) > shown else [])


def _write_maps_record(maps: Maps, record: dict, overwrite: bool) -> None:
    """A MAPS is bound to its settings and to the exact membership of the split it was trained on: training
    into it from another draw is refused (its models saw subjects the new draw may hold out), and
    --overwrite removes the old models before anything is trained."""
    with lock(maps.record):
        if maps.record.exists():
            previous = json.loads(maps.record.read_text())
            redrawn = previous.get("split_membership_sha256") != record["split_membership_sha256"]
            if redrawn or _comparable(previous) != _comparable(record):
                if not overwrite:
                    changed = "; ".join(_differences(previous, record))
                    why = ("was trained on another draw of the split (its sets' membership differs); its models saw "
                           "subjects the new draw may put in the test set" if redrawn
                           else f"was trained with other settings or data ({changed})")
                    raise UsageError(f"{maps.root}: this MAPS {why}. Choose another [train] experiment name, or "
                                     "--overwrite to remove its models and train again")
                log.warning("%s: removing the MAPS trained on other settings or another split (--overwrite)",
                            maps.root)
                shutil.rmtree(maps.root)
            else:
                record["created"] = previous["created"]
        write_json(maps.record, record)
        if not maps.environment.exists():
            write_text(maps.environment, environment_text(sys.argv))


def _write_seen(maps: Maps, train: pd.DataFrame, caps: Caps, transfer) -> pd.DataFrame:
    """Every session used for training or selection, with content fingerprints, for later leakage checks.
    Returns this MAPS's own rows (KEYS, maps, source_sha256)."""
    from clinicadl_app.images.fingerprint import Signatures, fingerprint_rows

    keys = train[KEYS].drop_duplicates()
    own = fingerprint_rows(caps, keys)
    own.insert(2, "maps", maps.root.name)
    seen = own
    signatures = Signatures.of(caps, keys)
    if transfer is not None:
        seen = pd.concat([seen, transfer.seen.rows], ignore_index=True)
        if transfer.seen.signatures is not None:
            signatures = signatures + transfer.seen.signatures
    with lock(maps.seen):
        if maps.seen.is_file():  # only ever grows while models trained on it exist
            seen = pd.concat([pd.read_csv(maps.seen, sep="\t", dtype=str, keep_default_na=False), seen],
                             ignore_index=True)
        if maps.seen_signatures.is_file():
            signatures = Signatures.load(maps.seen_signatures) + signatures
        seen = seen.drop_duplicates(KEYS + ["maps"]).sort_values(KEYS).reset_index(drop=True)
        write_tsv(maps.seen, seen)
        signatures.unique().save(maps.seen_signatures)
    return own


def _fitted_on(own: pd.DataFrame, data: FoldData, transfer) -> pd.DataFrame:
    """The fold's training sessions and, when its weights start from a transfer source, what the source's
    model was fitted on: what a later transfer from this fold must keep out of its validation set."""
    trained = set(map(tuple, data.train[KEYS].values.tolist()))
    rows = own[[key in trained for key in map(tuple, own[KEYS].values.tolist())]]
    if transfer is not None:
        rows = pd.concat([rows, transfer.fitted_for(transfer.source_fold(data.fold)).rows], ignore_index=True)
    return rows.drop_duplicates(KEYS + ["maps"]).sort_values(KEYS).reset_index(drop=True)


def train_fold(config: Config, maps: Maps, data: FoldData, transfer, report=None, world: World | None = None) -> None:
    world = world or World()
    settings: Train = config.train
    device = Device.choose(settings, world)
    seed_everything(settings.seed + data.fold, settings.deterministic)
    metrics = selection_metrics(config, data.task)
    networks: list[int | None] = list(range(len(data.spec))) if settings.multi_network else [None]
    in_shape = input_shape(data)
    if world.main:
        write_text(maps.fold_environment(data.fold), environment_text(sys.argv))
    log.info("split-%d: %d training and %d validation images, input %s, %d network(s) on %s",
             data.fold, len(data.train), len(data.validation), in_shape, len(networks), device.device)
    usable = len(os.sched_getaffinity(0))
    if settings.num_workers > usable:  # torch's own UserWarning says it at every epoch; it is filtered in runtime.py
        log.warning("--num_workers %d on %d usable CPU(s): the loading processes take CPU time from training; "
                    "0 loads in the training process", settings.num_workers, usable)
    for network in networks:
        torch.manual_seed(settings.seed * 1000 + data.fold * 100 + (network or 0))
        model = build_model(settings, in_shape, data.task, pretrained=True)
        if transfer:
            transfer.initialise(model, data.fold, network)
        parts = None if network is None else (network,)
        evaluator = Evaluator(data.task, settings.mode, device, settings.batch_size, settings, data.validation,
                              world=world)
        train_evaluator = Evaluator(data.task, settings.mode, device, settings.batch_size, settings, data.train,
                                    world=world)
        trainer = Trainer(model=model, task=data.task, settings=settings, maps=maps, fold=data.fold,
                          network=network, selection=metrics, device=device, evaluator=evaluator,
                          train_evaluator=train_evaluator, report=report, world=world)
        trainer.fit(_restrict(data.train_set, parts), _restrict(data.validation_set, parts),
                    _restrict(data.train_eval, parts))
        # the trained model, its gradients and the optimiser's moments (4x the weights) are on disk now: freed
        # before the next network or the selected models are loaded, which reuse their memory
        del trainer, model, evaluator, train_evaluator
    world.barrier()  # the best models are on disk before the main process reads them back
    if world.main:
        write_results(config, maps, data, metrics, device)
        shutil.rmtree(maps.tmp_dir(data.fold), ignore_errors=True)
    world.barrier()


def _restrict(dataset: PartDataset, parts: tuple[int, ...] | None) -> PartDataset:
    if parts is None:
        return dataset
    copy = PartDataset(dataset.store, dataset.spec, dataset.targets, dataset.normalize, parts, dataset.transform,
                       dataset.seed)
    return copy


def write_results(config: Config, maps: Maps, data: FoldData, metrics: tuple[str, ...], device: Device) -> None:
    """Predictions and metrics of every selected model on its training and validation sets."""
    settings = config.train
    done: list[tuple[list, GroupResult, GroupResult]] = []
    for metric in metrics:
        models = load_selected(maps, data.fold, metric, settings, input_shape(data), data.task, device)
        # several metrics often select the same epoch (always with few epochs): evaluate those weights once
        same = next((results for other, *results in done if same_weights(models, other)), None)
        if same is None:
            validation = evaluate_group(models, data.task, settings, device, data.validation,
                                        data.validation_set, None)
            train = evaluate_group(models, data.task, settings, device, data.train, data.train_eval,
                                   validation.weights)
            done.append((models, validation, train))
        else:
            validation, train = same
        train.write(maps, data.fold, metric, "train")
        validation.write(maps, data.fold, metric, "validation")
