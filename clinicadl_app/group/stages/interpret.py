"""The interpret stage: voxel maps of the selected models on a predicted group, for every mode and task.

Classification and regression get attribution maps (captum: gradients, Grad-CAM, integrated gradients,
occlusion) of the image-level decision; autoencoders get their absolute reconstruction error. Part-based
models are explained part by part and stitched back into the image (attribution.py, images/stitching.py).
Maps are NIfTI files with the true affine of the CAPS images (ClinicaDL writes an identity affine), so they
overlay on MNI space in any viewer, each with a JSON sidecar saying how it was made; per image (optional),
and mean per group and class. File names: group-<group>_label-<class|all>_mode-<mode>_desc-<method>_mean.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from clinicadl_app import __version__
from clinicadl_app.core.atomic import atomic_path, write_json
from clinicadl_app.core.config import Config, Extraction, Train
from clinicadl_app.core.config_file import section_from
from clinicadl_app.core.errors import UsageError
from clinicadl_app.core.figures import save_png
from clinicadl_app.group import map_figures
from clinicadl_app.group.attribution import RECONSTRUCTION, RECONSTRUCTION_ERROR, image_map, vote_factors
from clinicadl_app.group.data import ImageStore, PartDataset, image_paths, part_spec
from clinicadl_app.group.experiment import experiment_name
from clinicadl_app.group.models import load_selected, open_maps, same_weights, task_from_record, trained_folds
from clinicadl_app.group.results import validation_weights
from clinicadl_app.group.runtime import Device
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.maps import Maps

log = logging.getLogger("clinicadl_app")


def run_interpret(config: Config, maps_dir: Path) -> Maps | None:
    maps, record = open_maps(config.predict.maps_dir or maps_dir / experiment_name(config))
    folds = trained_folds(maps, config.train.folds)
    group = config.predict.group_name
    settings = config.interpret
    train = section_from(Train, record["train"])
    reconstruction = record["task"] == "reconstruction"
    methods = (RECONSTRUCTION_ERROR,) if reconstruction else settings.methods
    if reconstruction:
        log.info("interpret: an autoencoder explains nothing; writing its reconstruction error maps instead of %s",
                 ", ".join(settings.methods))
    if not maps.group_data(group).is_file():
        no_test = group == "test" and record["split"].get("counts", {}).get("test", {}).get("participants") == 0
        if no_test:
            log.info("interpret: the split has no test set (n_test = 0); nothing to interpret")
            return None
        raise UsageError(f"{maps.group_data(group)}: group '{group}' was not predicted; run the predict stage first "
                         "(its leakage checks guard interpretation too)")
    unpredicted = [fold for fold in folds if not all(maps.prediction(fold, metric, group, "image").is_file()
                                                     for metric in maps.selection_metrics(fold))]
    if unpredicted:
        raise UsageError(f"{maps.root}: group '{group}' was not predicted by split-{unpredicted[0]}; run the predict "
                         f"stage with it first (--stages predict interpret --split {' '.join(map(str, unpredicted))})")
    label = record["label"]
    text = {"participant_id": str, "session_id": str} | ({label: str} if record["task"] == "classification" else {})
    rows = pd.read_csv(maps.group_data(group), sep="\t", dtype=text)
    extraction = section_from(Extraction, record["extraction_settings"])
    group_record = json.loads(maps.group_record(group).read_text())
    caps = Caps(maps.resolve(group_record["caps_directory"], "CAPS of the predicted group"))
    store = ImageStore(image_paths(caps, rows, extraction))
    shape = store.validate()
    spec = part_spec(train.mode, shape[1:], extraction, caps)
    reference = _reference_image(caps, rows, extraction)
    device = Device.choose(replace(train, gpu=config.train.gpu))  # where: this job's; precision: the MAPS's
    dataset = PartDataset(store, spec, [torch.zeros(())] * len(rows), train.normalize)
    for fold in folds:
        task = task_from_record(json.loads(maps.group_record("train", fold).read_text())["task"])
        done: list[tuple[list, dict | None, list[int | None], str, dict[str, list[Path]]]] = []
        for metric in maps.selection_metrics(fold):
            models = load_selected(maps, fold, metric, train, tuple(record["input_size"]), task, device)
            classes = _explained_classes(maps, fold, metric, group, rows, task, settings.target, label)
            weights = validation_weights(maps, fold, metric, train, task) if task.name == "classification" else None
            same = next(((m, files) for other, w, c, m, files in done
                         if w == weights and c == classes and same_weights(models, other)), None)
            if same is not None:  # another metric selected these weights: its maps are these maps
                for method in methods:
                    folder = maps.interpretation(fold, metric, group, method)
                    _copy_maps(same[1][method], folder, metric)
                    log.info("interpret split-%d best-%s %s: %s (the weights of best-%s)", fold, metric, method,
                             folder, same[0])
                continue
            factors = vote_factors(weights)
            about = {"mode": train.mode, "fold": fold, "selection_metric": metric, "group": group,
                     "target": {"classification": "the true class (the image-level prediction where unknown)"
                                if settings.target == "true" else "the class of the image-level prediction",
                                "regression": "the predicted value", "reconstruction": "the input itself"}[task.name],
                     "part_weighting": _weighting(train.mode, factors), "factors": factors,
                     "clinicadl_app_version": __version__}
            written = {}
            for method in methods:
                folder = maps.interpretation(fold, metric, group, method)
                written[method] = _write_maps(models, dataset, rows, classes, task, method, folder, about,
                                              reference, settings, device.device, max(1, train.batch_size))
                log.info("interpret split-%d best-%s %s: %s", fold, metric, method, folder)
            done.append((models, weights, classes, metric, written))
    return maps


def _copy_maps(files: list[Path], folder: Path, metric: str) -> None:
    """Another metric's maps of equal weights (same_weights), each sidecar naming this metric."""
    for path in files:
        target = folder / path.name
        if path.suffix == ".json":
            write_json(target, json.loads(path.read_text()) | {"selection_metric": metric})
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)


def _write_maps(models, dataset: PartDataset, rows: pd.DataFrame, classes: list[int | None], task, method: str,
                folder: Path, about: dict, reference: nib.Nifti1Image, settings, device: torch.device,
                batch: int) -> list[Path]:
    """One method's maps of one model: per image on request, mean per class, and their pictures (the files
    written)."""
    written: list[Path] = []
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    covered = None
    mode, group = about["mode"], about["group"]
    for index in range(len(rows)):
        canvas = image_map(models, dataset, index, method, classes[index], settings.layer,
                           about["factors"], device, batch)
        values, covered = canvas.result(), canvas.covered
        key = task.classes[classes[index]] if classes[index] is not None else "all"
        sums[key] = sums.get(key, 0) + values
        counts[key] = counts.get(key, 0) + 1
        if settings.save_individual:
            participant, session = rows.iloc[index][KEYS]
            written += _save(values, reference,
                             folder / f"{participant}_{session}_mode-{mode}_desc-{method}_map.nii.gz",
                             _sidecar(about, covered, method, key, 1))
    background = np.asanyarray(reference.dataobj, dtype=np.float32)
    for key, total in sums.items():
        mean = total / counts[key]
        stem = f"group-{group}_label-{key}_mode-{mode}_desc-{method}_mean"
        written += _save(mean, reference, folder / f"{stem}.nii.gz",
                         _sidecar(about, covered, method, key, counts[key]))
        figure = map_figures.overlay_rows(background, [("", mean)], map_figures.scale_of([mean]),
                                          f"{method}, {mode}, {group}, {key} (n={counts[key]})")
        save_png(figure, folder / f"{stem}.png", dpi=80, facecolor="black")
        written.append(folder / f"{stem}.png")
    if method == RECONSTRUCTION_ERROR:
        example = folder / f"group-{group}_mode-{mode}_desc-reconstruction_example.png"
        _example(models, dataset, example, rows, settings.layer, device, batch)
        written.append(example)
    return written


def _sidecar(about: dict, covered: np.ndarray | None, method: str, label: str, n_images: int) -> dict:
    share = float(covered.mean()) if covered is not None else 0.0
    return {key: value for key, value in about.items() if key != "factors"} | {
        "method": method, "label": label, "n_images": n_images, "covered_fraction": round(share, 6),
        "uncovered_voxels": "0: no part covers them (not 'no attribution')" if share < 1 else "none",
        "overlaps": "averaged over the parts covering a voxel"}


def _explained_classes(maps: Maps, fold: int, metric: str, group: str, rows: pd.DataFrame, task, target: str,
                       label: str) -> list[int | None]:
    """The class each image's map explains: its true class where asked and known to the model, else the
    class the image-level decision (for parts, the weighted vote) gave it; None without classes."""
    if task.name != "classification":
        return [None] * len(rows)
    predicted = pd.read_csv(maps.prediction(fold, metric, group, "image"), sep="\t", dtype={k: str for k in KEYS})
    decided = {(p, s): int(c) for p, s, c in predicted[KEYS + ["predicted_label"]].itertuples(index=False)}
    return [task.classes.index(v) if target == "true" and isinstance(v, str) and v in task.classes
            else decided[(p, s)] for p, s, v in rows[KEYS + [label]].itertuples(index=False)]


def _weighting(mode: str, factors: dict[int, float] | None) -> str | dict:
    if mode == "image":
        return "none (image mode)"
    if factors is None:
        return "none: the image-level result is the plain mean of its parts"
    return {"rule": "each part's map times its validation-based vote weight divided by the mean weight "
                    "(0: the part does not vote)", "factors": {str(k): round(v, 4) for k, v in factors.items()}}


def _example(models, dataset: PartDataset, path: Path, rows: pd.DataFrame, layer: int, device: torch.device,
             batch: int) -> None:
    """Input, output and absolute difference of the group's first image: what the report shows."""
    given = dataset.image(0)[0].numpy()
    output = image_map(models, dataset, 0, RECONSTRUCTION, None, layer, None, device, batch).result()
    participant, session = rows.iloc[0][KEYS]
    figure = map_figures.panels([("input", given), ("output", output), ("difference", np.abs(output - given))],
                                f"reconstruction of {participant} {session}")
    save_png(figure, path, dpi=70, facecolor="black")


def _reference_image(caps: Caps, rows: pd.DataFrame, extraction: Extraction) -> nib.Nifti1Image:
    """The first image of the group: its affine places the maps in MNI space, its voxels under the overlay."""
    first = caps.by_session(cropped=not extraction.use_uncropped_image)[tuple(rows.iloc[0][KEYS])]
    return nib.load(str(caps.t1_linear(first, cropped=not extraction.use_uncropped_image)))


def _save(values: np.ndarray, reference: nib.Nifti1Image, path: Path, sidecar: dict) -> list[Path]:
    image = nib.Nifti1Image(values.astype(np.float32), reference.affine)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    json_path = path.with_name(path.name.replace(".nii.gz", ".json"))
    write_json(json_path, sidecar)
    return [path, json_path]
