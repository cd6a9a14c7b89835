"""The interpret stage: attribution maps of the selected models on a predicted group (captum).

Maps are NIfTI files with the true affine of the CAPS images (ClinicaDL writes an identity affine), so
they overlay on MNI space in any viewer, plus PNG overlays. Grad-CAM is computed in 3D at a convolution
block and upsampled trilinearly to the input grid. Per image (optional), and mean per group and class.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from clinicadl_app.core.atomic import atomic_path
from clinicadl_app.core.config import Config, Extraction, Train
from clinicadl_app.core.config_file import section_from
from clinicadl_app.core.errors import UsageError
from clinicadl_app.core.figures import pyplot, save_png
from clinicadl_app.group.data import ImageStore, PartDataset, image_paths, part_spec
from clinicadl_app.group.experiment import experiment_name
from clinicadl_app.group.models import load_selected, open_maps, task_from_record
from clinicadl_app.group.training import Device
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.maps import Maps

log = logging.getLogger("clinicadl_app")


def _conv_layer(model: nn.Module, block: int) -> nn.Module:
    convolutions = [m for m in model.convolutions if isinstance(m, nn.Conv3d | nn.Conv2d)]
    try:
        return convolutions[block]
    except IndexError:
        raise UsageError(f"--layer {block}: the network has {len(convolutions)} convolution blocks") from None


def attribute(model: nn.Module, method: str, inputs: torch.Tensor, target: torch.Tensor | None,
              layer: int) -> torch.Tensor:
    """Attribution of each input voxel, same shape as `inputs`, non-negative."""
    from captum import attr

    model.eval()
    inputs = inputs.clone().requires_grad_(True)
    if method == "gradients":
        return attr.Saliency(model).attribute(inputs, target=target, abs=True).detach()
    if method == "grad-cam":
        grad_cam = attr.LayerGradCam(model, _conv_layer(model, layer))
        cam = grad_cam.attribute(inputs, target=target, relu_attributions=True)
        mode = "trilinear" if inputs.dim() == 5 else "bilinear"
        up = attr.LayerAttribution.interpolate(cam.detach(), tuple(inputs.shape[2:]), interpolate_mode=mode)
        return up.expand_as(inputs).clamp(min=0)
    if method == "integrated-gradients":
        values = attr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=16,
                                                            internal_batch_size=max(1, len(inputs)))
        return values.detach().abs()
    if method == "occlusion":
        window = tuple([inputs.shape[1]] + [max(1, s // 6) for s in inputs.shape[2:]])
        stride = tuple([1] + [max(1, s // 6) for s in inputs.shape[2:]])
        values = attr.Occlusion(model).attribute(inputs.detach(), target=target, sliding_window_shapes=window,
                                                 strides=stride, baselines=0)
        return values.abs()
    raise UsageError(f"unknown interpretation method {method}")


def run_interpret(config: Config, maps_dir: Path, asked: bool = True) -> Maps | None:
    """`asked`: the stage was named on the command line; otherwise (the default run of every stage) what
    cannot be interpreted is skipped with one line instead of refused."""
    maps, record = open_maps(config.predict.maps_dir or maps_dir / experiment_name(config))
    group = config.predict.group_name
    settings = config.interpret
    train = section_from(Train, record["train"])
    unsupported = ("interpretation explains a prediction: not available for reconstruction"
                   if record["task"] == "reconstruction" else
                   "interpretation maps are written for image-mode MAPS only in this version"
                   if train.mode != "image" else None)
    if unsupported:
        if asked:
            raise UsageError(unsupported)
        log.info("interpret: skipped (%s)", unsupported)
        return None
    if not maps.group_data(group).is_file():
        no_test = group == "test" and record["split"].get("counts", {}).get("test", {}).get("participants") == 0
        if no_test:
            log.info("interpret: the split has no test set (n_test = 0); nothing to interpret")
            return None
        raise UsageError(f"{maps.group_data(group)}: group '{group}' was not predicted; run the predict stage first "
                         "(its leakage checks guard interpretation too)")
    text = {"participant_id": str, "session_id": str} | ({record["label"]: str} if record["task"] == "classification"
                                                         else {})
    rows = pd.read_csv(maps.group_data(group), sep="\t", dtype=text)
    extraction = section_from(Extraction, record["extraction_settings"])
    group_record = json.loads(maps.group_record(group).read_text())
    caps = Caps(maps.resolve(group_record["caps_directory"], "CAPS of the predicted group"))
    paths = image_paths(caps, rows, extraction)
    store = ImageStore(paths)
    shape = store.validate()
    spec = part_spec("image", shape[1:], extraction, caps)
    reference = _reference_image(caps, rows, extraction)
    device = Device.choose(train)
    label = record["label"]
    for fold in maps.folds():
        task = task_from_record(json.loads(maps.group_record("train", fold).read_text())["task"])
        # explain the true class where the model knows it; else (or on request) the predicted one
        known = ([settings.target == "true" and isinstance(v, str) and v in task.classes for v in rows[label]]
                 if task.name == "classification" else [False] * len(rows))
        targets = [task.target(v) if ok else torch.tensor(0) for v, ok in zip(rows[label], known, strict=True)] \
            if task.name == "classification" else [task.target(0.0)] * len(rows)
        dataset = PartDataset(store, spec, targets, train.normalize)
        for metric in maps.selection_metrics(fold):
            (_, model, _), = load_selected(maps, fold, metric, train, tuple(record["input_size"]), task, device)
            for method in settings.methods:
                folder = maps.interpretation(fold, metric, group, method)
                sums: dict[str, np.ndarray] = {}
                counts: dict[str, int] = {}
                for index in range(len(dataset)):
                    item = dataset[index]
                    inputs = item["input"].unsqueeze(0).to(device.device)
                    target = None
                    if task.name == "classification":
                        if not known[index]:
                            with torch.no_grad():  # the model is in eval mode (load_selected)
                                target = model(inputs).argmax(1)[0].cpu()
                        else:
                            target = item["target"]
                        target = int(target)
                    values = attribute(model, method, inputs, target, settings.layer)[0, 0].cpu().numpy()
                    key = task.classes[target] if task.name == "classification" else "all"
                    sums[key] = sums.get(key, 0) + values
                    counts[key] = counts.get(key, 0) + 1
                    if settings.save_individual:
                        participant, session = rows.iloc[index][KEYS]
                        _save(values, reference, folder / f"{participant}_{session}_desc-{method}_saliency.nii.gz")
                for key, total in sums.items():
                    mean = total / counts[key]
                    stem = f"group-{group}_label-{key}_desc-{method}_mean"
                    _save(mean, reference, folder / f"{stem}.nii.gz")
                    _overlay(mean, reference, folder / f"{stem}.png", f"{method}, {group}, {key} (n={counts[key]})")
                log.info("interpret split-%d best-%s %s: %s", fold, metric, method, folder)
    return maps


def _reference_image(caps: Caps, rows: pd.DataFrame, extraction: Extraction) -> nib.Nifti1Image:
    """The first image of the group: its affine places the maps in MNI space, its voxels under the overlay."""
    first = caps.by_session(cropped=not extraction.use_uncropped_image)[tuple(rows.iloc[0][KEYS])]
    return nib.load(str(caps.t1_linear(first, cropped=not extraction.use_uncropped_image)))


def _save(values: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    image = nib.Nifti1Image(values.astype(np.float32), reference.affine)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def _overlay(values: np.ndarray, reference: nib.Nifti1Image, path: Path, title: str) -> None:
    plt = pyplot()

    background = np.asanyarray(reference.dataobj, dtype=np.float32)
    centre = [s // 2 for s in values.shape]
    cuts = {"sagittal": np.s_[centre[0], :, :], "coronal": np.s_[:, centre[1], :], "axial": np.s_[:, :, centre[2]]}
    high = float(np.percentile(values, 99.5)) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (plane, cut) in zip(axes, cuts.items(), strict=True):
        ax.imshow(np.rot90(background[cut]), cmap="gray")
        shown = np.rot90(values[cut])
        ax.imshow(np.ma.masked_less(shown, 0.2 * high), cmap="hot", vmin=0.2 * high, vmax=high, alpha=0.8)
        ax.set_title(plane, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(title + "  (neurological orientation: left on the left)", color="white", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=80, facecolor="black")
