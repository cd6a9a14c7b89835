"""Maps computed on parts (patches, slices, ROIs) placed back into the image they were cut from.

Each part's map is added where the part lies; where parts overlap the maps are averaged (not summed), so a
map that is 1 on every part is 1 on every covered voxel whatever the stride. Voxels no part covers are 0,
and the coverage is kept so a sidecar can say how much of the image the map describes.
"""

from __future__ import annotations

import numpy as np


class Canvas:
    """An image-sized accumulator of part maps."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape, dtype=np.float64)
        self.count = np.zeros(shape, dtype=np.int32)

    def add(self, region: tuple[slice, ...], values: np.ndarray, weight: float = 1.0) -> None:
        """`values` has the shape of `region` in the image; `weight` scales this part's map (its vote)."""
        self.total[region] += weight * values
        self.count[region] += 1

    @property
    def covered(self) -> np.ndarray:
        return self.count > 0

    def result(self) -> np.ndarray:
        """Mean of the maps over the parts covering each voxel; 0 where none does."""
        out = np.zeros(self.total.shape, dtype=np.float32)
        np.divide(self.total, self.count, out=out, where=self.count > 0, casting="unsafe")
        return out
