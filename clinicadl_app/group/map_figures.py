"""Pictures of voxel maps (attributions, reconstruction errors) over an anatomical background.

Three orthogonal cuts through the centre, neurological orientation; the colour scale is given by the caller
so that maps compared side by side (the folds of one experiment in the report) share it.
"""

from __future__ import annotations

import numpy as np

from clinicadl_app.core.figures import pyplot

CAPTION = "neurological orientation: left on the left"


def scale_of(maps: list[np.ndarray]) -> float:
    """One upper bound for several maps: the largest 99.5th percentile of their covered voxels."""
    highs = [float(np.percentile(m[m > 0], 99.5)) for m in maps if (m > 0).any()]
    return max(highs, default=1.0) or 1.0


def _cuts(shape: tuple[int, ...]) -> dict[str, tuple]:
    centre = [s // 2 for s in shape]
    return {"sagittal": np.s_[centre[0], :, :], "coronal": np.s_[:, centre[1], :], "axial": np.s_[:, :, centre[2]]}


def _draw_row(axes, background: np.ndarray, values: np.ndarray, high: float, label: str):
    shown = None
    for ax, (plane, cut) in zip(axes, _cuts(values.shape).items(), strict=True):
        ax.imshow(np.rot90(background[cut]), cmap="gray")
        layer = np.rot90(values[cut])
        shown = ax.imshow(np.ma.masked_less(layer, 0.2 * high), cmap="hot", vmin=0.2 * high, vmax=high, alpha=0.8)
        ax.set_title(f"{label} {plane}".strip(), color="white", fontsize=8)
        ax.axis("off")
    return shown


def overlay_rows(background: np.ndarray, rows: list[tuple[str, np.ndarray]], high: float, title: str):
    """A figure of one row of cuts per map, all on the colour scale [0.2 high, high]."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), facecolor="black", squeeze=False)
    shown = None
    for row_axes, (label, values) in zip(axes, rows, strict=True):
        shown = _draw_row(row_axes, background, values, high, label)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6)
        bar.ax.tick_params(colors="white", labelsize=7)
    fig.suptitle(f"{title}  ({CAPTION})", color="white", fontsize=10)
    return fig


def panels(rows: list[tuple[str, np.ndarray]], title: str):
    """Greyscale cuts of several images of one grid (input, output, difference), each on its own scale."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4 * len(rows)), facecolor="black", squeeze=False)
    for row_axes, (label, values) in zip(axes, rows, strict=True):
        cmap = "hot" if "difference" in label or "error" in label else "gray"
        high = float(np.percentile(values, 99.5)) or 1.0
        for ax, (plane, cut) in zip(row_axes, _cuts(values.shape).items(), strict=True):
            ax.imshow(np.rot90(values[cut]), cmap=cmap, vmin=0, vmax=high)
            ax.set_title(f"{label} {plane}", color="white", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{title}  ({CAPTION})", color="white", fontsize=10)
    return fig
