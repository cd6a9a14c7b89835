"""Quality check of a registered image: agreement with the template inside its brain mask, and a picture.

Measured on the shared raw scans: aligned images give a Pearson r of 0.33-0.56 with the template in
the brain, failed registrations 0.07-0.27. Normalised mutual information is reported beside it: it does
not assume a linear intensity relation (children, other contrasts) and drops sharply on misalignment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from clinicadl_app.images import templates


@dataclass(frozen=True)
class QualityCheck:
    correlation: float
    """Pearson r between the image and the template inside the template brain mask."""
    nmi: float
    """Normalised mutual information (Studholme, 1 to 2) inside the same mask."""
    threshold: float
    passed: bool

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


@cache
def _template_in_mask() -> tuple[np.ndarray, np.ndarray]:
    mask = templates.image(templates.MNI_BRAIN_MASK).numpy() > 0.5
    return mask, templates.image(templates.MNI_T1).numpy()[mask]


def quality_check(image: np.ndarray, threshold: float) -> QualityCheck:
    """`image` is on the full 193x229x193 template grid."""
    mask, reference = _template_in_mask()
    values = image[mask]
    if values.std() == 0:
        return QualityCheck(0.0, 1.0, threshold, False)
    correlation = float(np.corrcoef(values, reference)[0, 1])
    nmi = _nmi(values, reference)
    return QualityCheck(round(correlation, 4), round(nmi, 4), threshold, correlation >= threshold)


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(0)) + entropy(joint.sum(1))) / entropy(joint)


def qc_figure(image: np.ndarray, out: Path, title: str) -> None:
    """Three planes of the registered image with the template's brain outline in red and its white-matter edge
    in cyan (it was orange-red once: on a screen the two could not be told apart)."""
    from clinicadl_app.core.figures import pyplot

    plt = pyplot()

    mask, _ = _template_in_mask()
    template = templates.image(templates.MNI_T1).numpy()
    wm_level = float(np.percentile(template[mask], 60))
    centre = (96, 118, 96)
    cuts = {
        "sagittal": (np.s_[centre[0] + 12, :, :]),
        "coronal": (np.s_[:, centre[1] - 8, :]),
        "axial": (np.s_[:, :, centre[2] - 6]),
    }
    inside = image[mask]
    low, high = np.percentile(inside, [1, 99.5]) if inside.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (plane, cut) in zip(axes, cuts.items(), strict=True):
        ax.imshow(np.rot90(image[cut]), cmap="gray", vmin=low, vmax=high, interpolation="bilinear")
        ax.contour(np.rot90(mask[cut].astype(float)), levels=[0.5], colors="red", linewidths=0.8)
        ax.contour(np.rot90(template[cut]), levels=[wm_level], colors="cyan", linewidths=0.5)
        ax.set_title(plane, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
