"""What every synthetic dataset writes besides its images: participants.tsv with age and sex (splits
stratify on them), the dataset descriptions, the generator's parameters and seed, and images written so that
the same seed gives byte-identical files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from clinicadl_app import __version__
from clinicadl_app.core.atomic import atomic_path, write_json
from clinicadl_app.layouts.caps import Caps, CapsImage


def demographics(rng: np.random.Generator) -> dict[str, object]:
    return {"age": round(float(rng.uniform(55, 80)), 1), "sex": str(rng.choice(["F", "M"]))}


def session(participant_id: str, session_id: str = "ses-M000") -> CapsImage:
    return CapsImage(participant_id, session_id, f"{participant_id}_{session_id}")


def source_image(path: Path, downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) of a real t1-linear image, downsampled by an integer factor (2: 2 mm, for tests)."""
    from scipy import ndimage

    image = nib.load(str(path))
    data, affine = np.asanyarray(image.dataobj, dtype=np.float32), image.affine
    if downsample > 1:
        data = ndimage.zoom(data, 1 / downsample, order=1)
        affine = affine @ np.diag([downsample] * 3 + [1])
    return data, affine


def save_image(caps: Caps, image: CapsImage, data: np.ndarray, affine: np.ndarray) -> None:
    """A t1-linear NIfTI; nibabel's gzip writer stores no time stamp, so equal data give equal bytes."""
    with atomic_path(caps.t1_linear(image)) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(tmp))


def finish(output: Path, caps: Caps, kind: str, settings, rows: list[dict], source: str | None = None) -> pd.DataFrame:
    """participants.tsv, dataset_description.json of both folders, and generate.json (parameters, seed)."""
    bids = output / "bids"
    bids.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    with atomic_path(bids / "participants.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    parameters = dataclasses.asdict(settings)
    write_json(bids / "dataset_description.json", {
        "Name": f"clinicadl-app {kind} dataset", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": f"clinicadl-app generate {kind}", "Version": __version__,
                         "Parameters": parameters}]})
    write_json(caps.root / "dataset_description.json", {
        "Name": kind, "BIDSVersion": "1.9.0", "CAPSVersion": "1.0.0", "DatasetType": "derivative"})
    record = {kind: parameters, "clinicadl_app_version": __version__} | ({"source": source} if source else {})
    with atomic_path(output / "generate.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return table
