"""Synthetic datasets with a known answer, made from real preprocessed brains (ClinicaDL's "generate").

trivial: each subject is a real t1-linear image with one hemisphere darkened inside the brain: the left
for label AD, the right for label CN. A network must learn it; a saliency map must point to it.
atrophy: the left hemisphere is darkened by a random fraction (0 to --atrophy), written in the column
"atrophy": a quantity the images encode, for regression.
Each subject gets its own intensity scaling and noise, so no two generated images are identical.

    python -m clinicadl_app.generate {trivial,atrophy} SOURCE_CAPS OUTPUT --n_subjects 40 [--downsample 2]

OUTPUT/bids holds participants.tsv (diagnosis, age, sex) and OUTPUT/caps the images, ready for
`run.py OUTPUT/bids OUT group --caps_dir OUTPUT/caps`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from clinicadl_app.core.atomic import atomic_path, write_json
from clinicadl_app.core.errors import AppError, MissingInputError, UsageError
from clinicadl_app.images.templates import brain_mask, resample_nearest
from clinicadl_app.layouts.caps import Caps, CapsImage


@dataclass(frozen=True)
class Trivial:
    n_subjects: int = 40
    atrophy: float = 0.6
    """Fraction of intensity removed from the affected hemisphere."""
    downsample: int = 1
    """Integer factor: 2 gives 2 mm images (85x104x90), 8 times cheaper to train on, for tests."""
    seed: int = 0
    continuous: bool = False
    """Regression variant: a random atrophy fraction of the left hemisphere instead of two classes."""
    prefix: str = "TRIV"
    """Participant labels are sub-<prefix><number>."""


def hemisphere(shape: tuple[int, ...], affine: np.ndarray, side: str) -> np.ndarray:
    """Voxels whose world x is left (< 0) or right (> 0) of the midline."""
    x = (affine @ np.vstack([np.indices(shape).reshape(3, -1), np.ones(int(np.prod(shape)))]))[0]
    return (x < 0 if side == "left" else x > 0).reshape(shape)


def generate_trivial(source: Caps, output: Path, settings: Trivial) -> pd.DataFrame:
    images, _ = source.index()
    if not images:
        raise MissingInputError(f"{source.root}: no t1-linear image to build the trivial dataset from")
    if settings.n_subjects > 2 * len(images):
        raise UsageError(
            f"{source.root}: {len(images)} source images make at most {2 * len(images)} subjects (each brain once "
            "per class); more would put the same brain twice under two names, which the leakage checks refuse"
        )
    rng = np.random.default_rng(settings.seed)
    bids, caps = output / "bids", Caps(output / "caps")
    bids.mkdir(parents=True, exist_ok=True)
    rows = []
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(settings.n_subjects):
        index = i // 2 % len(images)
        if index not in loaded:
            img = nib.load(str(source.t1_linear(images[index])))
            data, affine = np.asanyarray(img.dataobj, dtype=np.float32), img.affine
            if settings.downsample > 1:
                data = ndimage.zoom(data, 1 / settings.downsample, order=1)
                affine = affine @ np.diag([settings.downsample] * 3 + [1])
            loaded[index] = (data, affine)
        data, affine = loaded[index]
        label = "AD" if i % 2 == 0 else "CN"
        side = "left" if label == "AD" or settings.continuous else "right"
        amount = float(rng.uniform(0, settings.atrophy)) if settings.continuous else settings.atrophy
        region = brain_mask(data.shape, affine) & hemisphere(data.shape, affine, side)
        region = ndimage.gaussian_filter(region.astype(np.float32), 1.0)
        scale = float(rng.uniform(0.9, 1.1))
        noisy = data * scale * (1 - amount * region)
        noisy = noisy + rng.normal(0, 0.01 * float(np.percentile(data, 99)), data.shape).astype(np.float32)
        participant_id = f"sub-{settings.prefix}{i:03d}"
        image = CapsImage(participant_id, "ses-M000", f"{participant_id}_ses-M000")
        with atomic_path(caps.t1_linear(image)) as tmp:
            nib.save(nib.Nifti1Image(np.clip(noisy, 0, None).astype(np.float32), affine), str(tmp))
        rows.append({"participant_id": participant_id, "diagnosis": label, "atrophy": round(amount, 4),
                     "age": round(float(rng.uniform(55, 80)), 1), "sex": str(rng.choice(["F", "M"])),
                     "source": f"{images[index].participant_id}_{images[index].session_id}"})
    table = pd.DataFrame(rows)
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    _write_masks(caps, *loaded[0])
    write_json(bids / "dataset_description.json", {
        "Name": "clinicadl-app trivial dataset", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "clinicadl-app generate trivial", "Parameters": settings.__dict__}]})
    write_json(caps.root / "dataset_description.json", {
        "Name": "trivial", "BIDSVersion": "1.9.0", "CAPSVersion": "1.0.0", "DatasetType": "derivative"})
    (output / "generate.json").write_text(json.dumps({"trivial": settings.__dict__, "source": str(source.root)},
                                                     indent=2) + "\n")
    return table


def _write_masks(caps: Caps, data: np.ndarray, affine: np.ndarray) -> None:
    """The built-in ROI masks on this dataset's grid (resampled when the images were downsampled)."""
    from importlib import resources

    source = resources.files("clinicadl_app") / "data" / "masks"
    for entry in source.iterdir():
        named = Caps.mask_name(Path(entry.name))
        if not named or not named[1]:
            continue
        with resources.as_file(entry) as path:
            mask_img = nib.load(str(path))
            out = resample_nearest(np.asanyarray(mask_img.dataobj) > 0, mask_img.affine, data.shape, affine)
        with atomic_path(caps.mask(named[0], cropped=True)) as tmp:
            nib.save(nib.Nifti1Image(out.astype(np.uint8), affine), str(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clinicadl_app.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["trivial", "atrophy"])
    parser.add_argument("source_caps", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--n_subjects", "--n-subjects", type=int, default=40)
    parser.add_argument("--atrophy", type=float, default=0.6)
    parser.add_argument("--downsample", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="TRIV", help="participant labels are sub-<prefix><number>")
    args = parser.parse_args(argv)
    try:
        table = generate_trivial(Caps(args.source_caps), args.output,
                                 Trivial(args.n_subjects, args.atrophy, args.downsample, args.seed,
                                         continuous=args.kind == "atrophy", prefix=args.prefix))
    except AppError as error:
        print(f"clinicadl-app generate: error: {error.message}", file=sys.stderr)
        return int(error.exit_code)
    print(f"{len(table)} subjects written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
