"""Datasets over the CAPS image tensors: files found once, each image read at most once, parts cut on the fly.

Image tensors are memory-mapped (torch.load(mmap=True)): the first epoch reads them from disk, later ones
from the page cache, with no decompression and no per-item file search. Patches, slices and ROIs are cut
from the image with the same functions as the participant level's extraction (modes.py), so they equal
ClinicaDL's extracted parts; min-max normalisation uses the whole image's range.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from clinicadl_app.core.config import Extraction
from clinicadl_app.core.errors import InputDataError, MissingInputError, UsageError
from clinicadl_app.group import augment
from clinicadl_app.images import modes
from clinicadl_app.images.extraction import extract, load_mask, write_descriptions
from clinicadl_app.layouts.caps import Caps, CapsImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartSpec:
    """How one mode cuts an image into parts, and which parts exist."""

    mode: str
    ids: tuple[int, ...]
    cut: Callable[[torch.Tensor, int], torch.Tensor]
    place: Callable[[int, np.ndarray], tuple[tuple[slice, ...], np.ndarray]]
    """(region of the image, map shaped like it) for a map of one part's voxels: the inverse of `cut`."""

    def __len__(self) -> int:
        return len(self.ids)


def part_spec(mode: str, shape: tuple[int, ...], extraction: Extraction, caps: Caps) -> PartSpec:
    """`shape` is the image's spatial shape (X, Y, Z). Parts that do not fit the images are a setting to change,
    said in one line before anything is trained."""
    try:
        return _part_spec(mode, shape, extraction, caps)
    except ValueError as error:
        hint = {"patch": "patch_size", "slice": "discarded_slices"}.get(mode, "settings")
        raise UsageError(f"{caps.root}: {error} ({mode} mode); change [extraction] {hint}") from None


def _part_spec(mode: str, shape: tuple[int, ...], extraction: Extraction, caps: Caps) -> PartSpec:
    whole = tuple(slice(None) for _ in shape)
    if mode == "image":
        return PartSpec(mode, (0,), lambda image, _: image, lambda _, values: (whole, values))
    if mode == "patch":
        size, stride = extraction.patch_size, extraction.stride_size
        count = int(np.prod(modes.patch_grid(shape, size, stride)))
        return PartSpec(mode, tuple(range(count)), lambda image, i: modes.patch_at(image, size, stride, i),
                        lambda i, values: (modes.patch_region(shape, size, stride, i), values))
    if mode == "slice":
        direction, channels = extraction.slice_direction, extraction.slice_mode
        ids = tuple(modes.slice_indices(shape, direction, extraction.discard))
        return PartSpec(mode, ids, lambda image, i: modes.slice_of(image, direction, i, channels),
                        lambda i, values: (modes.slice_region(direction, i), np.expand_dims(values, direction)))
    if mode == "roi":
        caps.install_builtin_masks()  # only adds masks the CAPS lacks
        cropped = not extraction.use_uncropped_image
        masks = [load_mask(caps, roi, cropped) for roi in extraction.roi_list]
        boxes = [modes.bounding_box(mask) for mask in masks]
        uncrop = extraction.roi_uncrop_output
        return PartSpec(mode, tuple(range(len(masks))), lambda image, i: modes.roi_of(image, masks[i], uncrop),
                        lambda i, values: (boxes[i], values[boxes[i]] if uncrop else values))
    raise ValueError(f"unknown mode {mode}")


class ImageStore:
    """Image tensors, memory-mapped once, with each image's intensity range computed once."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._tensors: dict[int, torch.Tensor] = {}
        self._ranges: dict[int, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> torch.Tensor:
        tensor = self._tensors.get(index)
        if tensor is None:
            path = self.paths[index]
            try:
                tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
                raise InputDataError(
                    f"{path}: corrupt tensor ({error}); delete it and run again to extract it anew") from None
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
                raise InputDataError(f"{path}: expected a float tensor (1, X, Y, Z); delete it to extract it anew")
            self._tensors[index] = tensor
        return tensor

    def range(self, index: int) -> tuple[float, float]:
        if index not in self._ranges:
            image = self.image(index)
            self._ranges[index] = (float(image.min()), float(image.max()))
        return self._ranges[index]

    def validate(self) -> tuple[int, ...]:
        """Open every tensor now (a memory map costs nothing) so a bad file stops the run before training."""
        shapes = {tuple(self.image(i).shape) for i in range(len(self))}
        if len(shapes) > 1:
            raise InputDataError(f"{self.paths[0].parent}: images of different shapes {sorted(shapes)}; "
                                 "extract every image with the same settings")
        return shapes.pop()

    def __getstate__(self) -> dict:
        # data-loading processes memory-map the files themselves instead of receiving copies
        return {"paths": self.paths, "_tensors": {}, "_ranges": dict(self._ranges)}


def image_paths(caps: Caps, rows: pd.DataFrame, extraction: Extraction, overwrite: bool = False) -> list[Path]:
    """The image tensor of every row, extracting those the CAPS lacks (as the participant level would)."""
    cropped = not extraction.use_uncropped_image
    images, problems = caps.index(cropped=cropped)
    found = {(i.participant_id, i.session_id): i for i in images}
    missing = [f"{p} {s}" for p, s in rows[["participant_id", "session_id"]].itertuples(index=False)
               if (p, s) not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingInputError(f"{caps.root}: no t1-linear image for {shown}; run the participant level for them"
                                + (f" ({problems[0]})" if problems else ""))
    chosen: list[CapsImage] = [found[(p, s)] for p, s in rows[["participant_id", "session_id"]].itertuples(index=False)]
    absent = [image for image in chosen if not caps.image_tensor(image, cropped).exists()]
    if absent:
        log.info("%s: extracting the image tensors of %d session(s) the CAPS lacks", caps.root, len(absent))
        settings = Extraction(modes=("image",), use_uncropped_image=extraction.use_uncropped_image)
        for image in absent:
            extract(caps, image, settings, overwrite=overwrite)
        write_descriptions(caps, settings)
    return [caps.image_tensor(image, cropped) for image in chosen]


class PartDataset(Dataset):
    """Items are (image, part) pairs; `targets` are the task's encoded labels, one per image."""

    def __init__(self, store: ImageStore, spec: PartSpec, targets: list[torch.Tensor], normalize: bool = True,
                 parts: tuple[int, ...] | None = None, transform: augment.Transform | None = None, seed: int = 0):
        self.store, self.spec, self.targets = store, spec, targets
        self.parts = parts if parts is not None else tuple(range(len(spec)))
        self.normalize, self.transform, self.seed = normalize, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.store) * len(self.parts)

    def locate(self, index: int) -> tuple[int, int]:
        """(image index, part position in spec) of an item."""
        image, part = divmod(index, len(self.parts))
        return image, self.parts[part]

    def _scaled(self, values: torch.Tensor, image_index: int) -> torch.Tensor:
        """What the network sees of an image or part: min-max normalised with the whole image's range."""
        if self.normalize:
            low, high = self.store.range(image_index)
            return (values.float() - low) / (high - low if high > low else 1.0)
        return values.float().clone()  # never hand out the memory map itself

    def image(self, image_index: int) -> torch.Tensor:
        """A whole image as the network's input sees it (no augmentation)."""
        return self._scaled(self.store.image(image_index), image_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_index, position = self.locate(index)
        part = self.spec.cut(self.store.image(image_index), self.spec.ids[position])
        if self.normalize or self.spec.mode == "image":
            part = self._scaled(part, image_index)
        if self.transform is not None:
            part = augment.seeded(self.transform, part, hash((self.seed, self.epoch, index)) % 2**63)
        return {"input": part, "target": self.targets[image_index],
                "image": torch.tensor(image_index), "part": torch.tensor(self.spec.ids[position])}
