"""Tensor extraction: the .pt files and the extraction JSON that ClinicaDL 1.x's prepare-data writes.

Each mode's JSON name is derived from its parameters, so concurrent jobs write identical content and
extractions with other parameters sit beside it instead of replacing it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from clinicadl_app import __version__
from clinicadl_app.core.atomic import atomic_path, save_torch, write_json
from clinicadl_app.core.config import Extraction
from clinicadl_app.core.errors import InputDataError, MissingInputError, UsageError
from clinicadl_app.images import modes
from clinicadl_app.layouts.caps import TEMPLATE, Caps, CapsImage

log = logging.getLogger(__name__)

_AXES = {0: "sag", 1: "cor", 2: "axi"}


def json_name(mode: str, settings: Extraction) -> str:
    parts = [f"extract_{mode}"]
    if mode == "patch":
        parts.append(f"size-{settings.patch_size}_stride-{settings.stride_size}")
    elif mode == "slice":
        first, last = settings.discard
        parts.append(f"axis-{_AXES[settings.slice_direction]}_channel-{settings.slice_mode}_discard-{first}-{last}")
    elif mode == "roi":
        parts.append("roi-" + "-".join(settings.roi_list) + ("_uncroppedroi" if settings.roi_uncrop_output else ""))
    if settings.use_uncropped_image:
        parts.append("uncropped")
    return "_".join(parts) + ".json"


def description(mode: str, settings: Extraction, caps: Caps) -> dict[str, object]:
    """The extraction JSON: ClinicaDL's keys first, then what we add for provenance."""
    cropped = not settings.use_uncropped_image
    data: dict[str, object] = {
        "preprocessing": "t1-linear",
        "mode": mode,
        "use_uncropped_image": settings.use_uncropped_image,
        "prepare_dl": True,
        "extract_json": json_name(mode, settings),
        "file_type": {
            "pattern": caps.file_pattern(cropped),
            "description": "T1w image registered in MNI152NLin2009cSym space with t1-linear"
            + (" and cropped (matrix size 169x208x179, 1 mm isotropic voxels)" if cropped else ""),
            "needed_pipeline": "t1-linear",
        },
    }
    if mode == "patch":
        data.update(patch_size=settings.patch_size, stride_size=settings.stride_size)
    elif mode == "slice":
        data.update(
            slice_direction=settings.slice_direction,
            slice_mode=settings.slice_mode,
            discarded_slices=list(settings.discard),
        )
    elif mode == "roi":
        data.update(
            roi_list=list(settings.roi_list),
            uncropped_roi=settings.roi_uncrop_output,
            roi_template=TEMPLATE,
            roi_mask_pattern="res-1x1x1",
            roi_custom_template="",
            roi_custom_mask_pattern="",
        )
    data["generated_by"] = {"name": "clinicadl-app", "version": __version__}
    return data


def write_descriptions(caps: Caps, settings: Extraction) -> list[Path]:
    paths = []
    for mode in settings.modes:
        path = caps.extraction_json(json_name(mode, settings))
        write_json(path, description(mode, settings, caps))
        paths.append(path)
    return paths


def prepare_masks(caps: Caps, settings: Extraction) -> None:
    """Install the built-in masks and the user's in the CAPS, and check every mask the ROI list needs."""
    if "roi" not in settings.modes:
        return
    caps.install_builtin_masks()
    for source in settings.roi_masks:
        if not source.is_file():
            raise MissingInputError(f"{source}: ROI mask not found; check --roi_masks")
        named = Caps.mask_name(source) or _user_mask_name(source)
        shape = nib.load(str(source)).shape
        cropped = tuple(shape) == (169, 208, 179)
        if not cropped and tuple(shape) != (193, 229, 193):
            raise UsageError(
                f"{source}: mask shape {shape} is neither the cropped (169, 208, 179) nor the full "
                "(193, 229, 193) MNI152NLin2009cSym 1 mm grid; resample it onto the template grid"
            )
        target = caps.mask(named[0], cropped)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    cropped = not settings.use_uncropped_image
    for roi in settings.roi_list:
        load_mask(caps, roi, cropped)


def _user_mask_name(path: Path) -> tuple[str, bool]:
    name = path.name
    if "_roi-" not in name:
        raise UsageError(f"{path}: a mask file name must hold its region as '_roi-<name>_mask.nii.gz'; rename it")
    roi = name.split("_roi-")[1].split("_")[0].split(".")[0]
    if not roi.isalnum():
        raise UsageError(f"{path}: region name '{roi}' must contain only letters and digits; rename the file")
    return roi, True


def load_mask(caps: Caps, roi: str, cropped: bool) -> np.ndarray:
    path = caps.mask(roi, cropped)
    if not path.is_file():
        available = sorted({n[0] for p in caps.masks_dir.glob("*_mask.nii*") if (n := Caps.mask_name(p))})
        raise UsageError(
            f"{path}: no mask for region '{roi}' on the {'cropped' if cropped else 'uncropped'} grid; "
            f"available: {', '.join(available) or 'none'}; add one with --roi_masks"
        )
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if not set(np.unique(data)) <= {0, 1}:
        raise UsageError(f"{path}: ROI masks must be binary (0 and 1 only); threshold it")
    if not data.any():
        raise UsageError(f"{path}: the mask is empty; check the file")
    return data.astype(bool)


Maker = Callable[[torch.Tensor], torch.Tensor]


def _parts(caps: Caps, image: CapsImage, shape: tuple[int, ...], mode: str, settings: Extraction,
           masks: dict[str, np.ndarray]) -> Iterator[tuple[Path, Maker]]:
    """(output path, how to cut it from the image tensor) for every part of one mode."""
    cropped = not settings.use_uncropped_image
    if mode == "image":
        yield caps.image_tensor(image, cropped), lambda tensor: tensor.clone()
    elif mode == "patch":
        size, stride = settings.patch_size, settings.stride_size
        for index in range(int(np.prod(modes.patch_grid(shape, size, stride)))):
            yield (
                caps.patch_tensor(image, size, stride, index, cropped),
                lambda tensor, i=index: modes.patch_at(tensor, size, stride, i),
            )
    elif mode == "slice":
        direction, channels = settings.slice_direction, settings.slice_mode
        for index in modes.slice_indices(shape, direction, settings.discard):
            yield (
                caps.slice_tensor(image, direction, channels, index, cropped),
                lambda tensor, i=index: modes.slice_of(tensor, direction, i, channels),
            )
    elif mode == "roi":
        for roi in settings.roi_list:
            yield (
                caps.roi_tensor(image, roi, cropped, settings.roi_uncrop_output),
                lambda tensor, r=roi: modes.roi_of(tensor, masks[r], settings.roi_uncrop_output),
            )


def extract(caps: Caps, image: CapsImage, settings: Extraction, overwrite: bool = False) -> int:
    """Write the missing tensors of every requested mode for one image; returns how many were written.

    Names come from the header's shape, so a complete rerun reads no image data at all.
    """
    source = caps.t1_linear(image, cropped=not settings.use_uncropped_image)
    shape = _shape(source)
    masks = (
        {roi: load_mask(caps, roi, not settings.use_uncropped_image) for roi in settings.roi_list}
        if "roi" in settings.modes else {}
    )
    try:
        plan = [part for mode in settings.modes for part in _parts(caps, image, shape, mode, settings, masks)]
    except ValueError as error:
        raise InputDataError(f"{source}: {error}; change the extraction settings") from None
    todo = [(path, make) for path, make in plan if overwrite or not path.exists()]
    if todo:
        tensor = read_image(source)
        for path, make in todo:
            save_torch(make(tensor), path)
    return len(todo)


def _shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(nib.load(str(path)).shape)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise InputDataError(f"{path}: cannot read the t1-linear image header ({error}); rerun the participant "
                             "level with --overwrite for this subject") from None


def read_image(path: Path) -> torch.Tensor:
    """A CAPS NIfTI as the (1, X, Y, Z) float32 tensor ClinicaDL saves."""
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise InputDataError(f"{path}: cannot read the t1-linear image ({error}); rerun the participant level "
                             "with --overwrite for this subject") from None
    if data.ndim != 3 or not np.isfinite(data).all():
        raise InputDataError(f"{path}: expected a finite 3D image, got shape {data.shape}; rerun with --overwrite")
    return torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0)
