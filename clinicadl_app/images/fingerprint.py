"""Content fingerprints of images, to recognise a training image under any name (ClinicaDL's open limitation:
the same person in two datasets, as OASIS-1 and OASIS-3, slips through a check on participant labels).

Two fingerprints per image:
- the SHA-256 of its BIDS source file, recorded by t1-linear in the sidecar (exact copies);
- a signature of the preprocessed image's anatomy: 4 mm block means inside the template brain mask, minus
  their 8 mm Gaussian smoothing (which removes bias fields, intensity scaling and other smooth changes),
  z-scored. Measured (docs/design.md): the same scan moved by up to 15 deg / 20 mm, with a bias field and
  noise, then registered again: r = 0.985-0.997; different people: r <= 0.62; the same brain with one or
  the other hemisphere darkened (a "trivial" dataset): r = 0.34; different brains darkened alike: r <= 0.70.
  2D images (Shepp-Logan phantoms) have none: they share their outline, so any two would correlate (r ~0.97);
  the content check then counts them as not comparable, and shared labels are refused (leakage.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from clinicadl_app.images.templates import brain_mask
from clinicadl_app.layouts.caps import KEYS, Caps

BLOCK_MM = 4.0
SMOOTH_BLOCKS = 2.0
NEAR_DUPLICATE = 0.9
"""Signatures correlating at least this much are taken for the same scan."""


def fingerprint_rows(caps: Caps, keys: pd.DataFrame) -> pd.DataFrame:
    """participant_id, session_id, the CAPS image, and the SHA-256 of its BIDS source when recorded."""
    found = caps.by_session()
    rows = []
    for participant_id, session_id in keys[KEYS].itertuples(index=False):
        image = found.get((participant_id, session_id))
        source = ""
        if image is not None:
            try:
                source = json.loads(caps.sidecar(image).read_text()).get("SourceSHA256", "")
            except (FileNotFoundError, json.JSONDecodeError):
                source = ""
        rows.append({"participant_id": participant_id, "session_id": session_id,
                     "image": str(caps.t1_linear(image).relative_to(caps.root)) if image else "",
                     "source_sha256": source})
    return pd.DataFrame(rows, columns=[*KEYS, "image", "source_sha256"])


def signature(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    data = torch.from_numpy(np.asanyarray(img.dataobj, dtype=np.float32))[None, None]
    block = max(1, int(round(BLOCK_MM / float(np.mean(img.header.get_zooms()[:3])))))
    if min(img.shape[:3]) < 4 * block:  # not a 3D brain (2D phantoms): no signature describes it
        return np.zeros(0, dtype=np.float32)
    mask = torch.from_numpy(brain_mask(img.shape[:3], img.affine).astype(np.float32))[None, None]
    pooled = F.avg_pool3d(data, block, block, ceil_mode=True)[0, 0].numpy().astype(np.float64)
    inside = F.avg_pool3d(mask, block, block, ceil_mode=True)[0, 0].numpy() > 0.5
    weight = ndimage.gaussian_filter(inside.astype(np.float64), SMOOTH_BLOCKS)
    smooth = ndimage.gaussian_filter(pooled * inside, SMOOTH_BLOCKS) / np.maximum(weight, 1e-6)
    values = (pooled - smooth)[inside]
    values = (values - values.mean()) / (values.std() or 1.0)
    return values.astype(np.float32)


@dataclass
class Signatures:
    keys: pd.DataFrame
    matrix: np.ndarray

    @classmethod
    def of(cls, caps: Caps, keys: pd.DataFrame) -> Signatures:
        found = caps.by_session()
        vectors = [signature(caps.t1_linear(found[(p, s)])) for p, s in keys[KEYS].itertuples(index=False)]
        return cls(keys[KEYS].reset_index(drop=True), np.stack(vectors) if vectors else np.zeros((0, 0)))

    def save(self, path: Path) -> None:
        from clinicadl_app.core.atomic import atomic_path

        with atomic_path(path) as tmp, tmp.open("wb") as stream:
            np.savez_compressed(stream, participant_id=self.keys.participant_id.to_numpy(str),
                                session_id=self.keys.session_id.to_numpy(str), matrix=self.matrix.astype(np.float16))

    @classmethod
    def load(cls, path: Path) -> Signatures:
        with np.load(path, allow_pickle=False) as stored:
            keys = pd.DataFrame({"participant_id": stored["participant_id"], "session_id": stored["session_id"]})
            return cls(keys, stored["matrix"].astype(np.float32))

    def __add__(self, other: Signatures) -> Signatures:
        if not len(self.keys):
            return other
        if not len(other.keys):
            return self
        return Signatures(pd.concat([self.keys, other.keys], ignore_index=True), np.vstack([self.matrix, other.matrix]))

    def unique(self) -> Signatures:
        """One signature per session (the first recorded)."""
        keep = ~self.keys.duplicated(KEYS).to_numpy()
        return Signatures(self.keys[keep].reset_index(drop=True), self.matrix[keep] if len(self.keys) else self.matrix)

    def matches(self, seen: Signatures, threshold: float = NEAR_DUPLICATE) -> pd.DataFrame:
        """Pairs (ours, seen) whose images correlate at least `threshold`, whatever their labels."""
        columns = [*KEYS, "seen_participant_id", "seen_session_id", "correlation"]
        if not len(self.keys) or not len(seen.keys):
            return pd.DataFrame(columns=columns)
        if not self.matrix.shape[1] or not seen.matrix.shape[1]:
            raise ValueError("2D images (phantoms) have no content signature")
        if self.matrix.shape[1] != seen.matrix.shape[1]:
            raise ValueError("images on another grid than the seen images")
        correlation = self.matrix @ seen.matrix.T / self.matrix.shape[1]
        rows = []
        for i, j in zip(*np.nonzero(correlation >= threshold), strict=True):
            ours, theirs = self.keys.iloc[i], seen.keys.iloc[j]
            rows.append([ours.participant_id, ours.session_id, theirs.participant_id, theirs.session_id,
                         round(float(correlation[i, j]), 5)])
        return pd.DataFrame(rows, columns=columns)
