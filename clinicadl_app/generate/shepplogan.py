"""shepplogan: 2D Shepp-Logan phantoms with random ellipses, as ClinicaDL's generator draws them (the paper,
section 3.2.2).

Label CN has large regions of interest; AD subtype 1 has a smaller bottom group of ellipses and subtype 2 a
smaller upper one; subtype 0 is drawn like CN. Each class has its own subtype distribution. Every phantom
has random position offsets, sizes, orientations, grey level and smoothing. The phantom is written as a
t1-linear CAPS image of one axial slice (S x S x 1) with its image and slice tensors, so `--mode slice
--slice_direction 2 --discarded_slices 0` trains on it with the ordinary group level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from clinicadl_app.core.config import Extraction
from clinicadl_app.core.errors import UsageError
from clinicadl_app.generate.dataset import demographics, finish, save_image, session
from clinicadl_app.images.extraction import extract, write_descriptions
from clinicadl_app.layouts.caps import Caps


@dataclass(frozen=True)
class SheppLogan:
    n_subjects: int = 40
    """Per class (CN and AD)."""
    image_size: int = 128
    cn_subtypes: tuple[float, float, float] = (1.0, 0.0, 0.0)
    """Share of CN phantoms of subtypes 0, 1, 2."""
    ad_subtypes: tuple[float, float, float] = (0.05, 0.85, 0.10)
    """Share of AD phantoms of subtypes 0, 1, 2 (ClinicaDL's default)."""
    smoothing: bool = True
    seed: int = 0
    prefix: str = "SHEP"


def _ellipse(size: int, centre: tuple[float, float], radii: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    rows, cols = np.indices((size, size), dtype=np.float64)
    r, c = rows - centre[0], cols - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return ((r * cos + c * sin) / radii[0]) ** 2 + ((-r * sin + c * cos) / radii[1]) ** 2 <= 1


def phantom(size: int, subtype: int, rng: np.random.Generator, smoothing: bool = True) -> np.ndarray:
    """One phantom; subtype 0 has large regions, 1 small bottom ones, 2 a small upper one."""
    centre = (size + 1) / 2
    a, b = centre - 2, centre * 2 / 3 - 2
    grey = rng.uniform(0.4, 0.6)
    scales = {"large": (1.0, 1.2), "small": (0.8, 0.9)}
    upper, lower = {0: ("large", "large"), 1: ("large", "small"), 2: ("small", "large")}[subtype]

    def shift() -> float:
        return rng.uniform(1, size / 32)

    def scale(kind: str) -> tuple[float, float]:
        return rng.uniform(*scales[kind]), rng.uniform(*scales[kind])

    image = np.zeros((size, size))
    image[_ellipse(size, (centre, centre), (a, b))] = 1.0  # skull
    offset = shift()
    image[_ellipse(size, (centre + offset / 2, centre), (a - offset, b - offset))] = 0.2  # brain
    s = scale("large")
    image[_ellipse(size, (centre + shift(), centre + shift()), (b / 6 * s[0], b / 6 * s[1]),
                   rng.uniform(-np.pi, np.pi))] = grey
    s = scale(upper)
    image[_ellipse(size, (centre * 0.6 + shift(), centre + shift()), (b / 3 * s[0], b / 4 * s[1]),
                   rng.uniform(-np.pi, np.pi))] = grey
    for column in (1.0, 1.1, 0.9):
        s = scale(lower)
        image[_ellipse(size, (centre * 1.5 + shift(), centre * column + shift()), (b / 10 * s[0], b / 10 * s[1]),
                       rng.uniform(-np.pi, np.pi))] = grey
    for column, tilt in ((0.75, np.pi / 8), (1.25, -np.pi / 8)):  # ventricles
        length = a * rng.uniform(0.8, 1.2)
        image[_ellipse(size, (centre, centre * column), (length / 3, length / 6),
                       tilt + rng.uniform(-np.pi / 16, np.pi / 16))] = 0.0
    if smoothing:
        image = ndimage.gaussian_filter(image, rng.uniform(0, 1) * size / 100)
    return np.clip(image, 0, 1)


def _subtypes(n: int, shares: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Exactly round(n * share) phantoms of each subtype (the remainder to the largest share), shuffled."""
    counts = np.floor(np.asarray(shares) * n).astype(int)
    counts[int(np.argmax(shares))] += n - counts.sum()
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def generate_shepplogan(output: Path, settings: SheppLogan) -> pd.DataFrame:
    for name in ("cn_subtypes", "ad_subtypes"):
        shares = getattr(settings, name)
        if len(shares) != 3 or min(shares) < 0 or not np.isclose(sum(shares), 1):
            raise UsageError(f"generate shepplogan: --{name} takes three shares of subtypes 0, 1, 2 summing to 1")
    if settings.image_size < 32:
        raise UsageError("generate shepplogan: --image_size must be at least 32")
    rng = np.random.default_rng(settings.seed)
    caps, rows = Caps(output / "caps"), []
    extraction = Extraction(modes=("image", "slice"), slice_direction=2, slice_mode="single", discarded_slices=(0,))
    plan = [("CN", int(t)) for t in _subtypes(settings.n_subjects, settings.cn_subtypes, rng)] + \
        [("AD", int(t)) for t in _subtypes(settings.n_subjects, settings.ad_subtypes, rng)]
    for i, (label, subtype) in enumerate(plan):
        participant_id = f"sub-{settings.prefix}{i:03d}"
        image = phantom(settings.image_size, subtype, rng, settings.smoothing)
        save_image(caps, session(participant_id), image[:, :, None], np.eye(4))
        extract(caps, session(participant_id), extraction)
        rows.append({"participant_id": participant_id, "diagnosis": label, "subtype": subtype, **demographics(rng)})
    write_descriptions(caps, extraction)
    return finish(output, caps, "shepplogan", settings, rows)
