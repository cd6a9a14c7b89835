"""random: one real t1-linear image plus Gaussian noise, labels drawn at random (ClinicaDL's "random").

Nothing in the images tells the classes apart, so a network trained on them must stay at chance on held-out
subjects: a built-in check that no label leaks into training through the pipeline (names, order, split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clinicadl_app.core.errors import MissingInputError, UsageError
from clinicadl_app.generate.dataset import demographics, finish, save_image, session, source_image
from clinicadl_app.generate.trivial import write_masks
from clinicadl_app.layouts.caps import Caps


@dataclass(frozen=True)
class Noise:
    n_subjects: int = 40
    sigma: float = 0.5
    """Standard deviation of the noise, as a fraction of the source image's 99th intensity percentile."""
    downsample: int = 1
    seed: int = 0
    prefix: str = "RAND"


def generate_random(source: Caps, output: Path, settings: Noise) -> pd.DataFrame:
    images, _ = source.index()
    if not images:
        raise MissingInputError(f"{source.root}: no t1-linear image to build the random dataset from")
    if settings.sigma <= 0 or settings.n_subjects < 2:
        raise UsageError("generate random: --sigma must be positive and --n_subjects at least 2")
    rng = np.random.default_rng(settings.seed)
    data, affine = source_image(source.t1_linear(images[0]), settings.downsample)
    sd = settings.sigma * float(np.percentile(data, 99))
    labels = rng.permutation(np.array(["AD", "CN"] * (settings.n_subjects // 2 + 1))[:settings.n_subjects])
    caps, rows = Caps(output / "caps"), []
    for i, label in enumerate(labels):
        participant_id = f"sub-{settings.prefix}{i:03d}"
        noisy = data + rng.normal(0, sd, data.shape).astype(np.float32)
        save_image(caps, session(participant_id), noisy, affine)
        rows.append({"participant_id": participant_id, "diagnosis": str(label), **demographics(rng),
                     "source": f"{images[0].participant_id}_{images[0].session_id}"})
    write_masks(caps, data, affine)
    return finish(output, caps, "random", settings, rows, str(source.root))
