"""Copy the small real datasets the project ships (demo and tests) out of ../shared/data (run once).

- demo/bids: 12 IXI adults (2 mm, with skull, PSR orientation), sessionless, age and sex; CC BY-SA 3.0.
- tests/data/caps2mm: a CAPS of 15 real brains after t1-linear (the 12 demo subjects: run the demo first,
  demo_output/caps; and the 3 raw scans: run the participant level on ../shared/data/raw1mm_bids into
  --raw_caps), downsampled to 2 mm (84x104x90), 8-bit: the brains the training tests build trivial
  datasets from (at most two subjects per brain, see generate.py).
- tests/data/raw2mm: the three raw ~1 mm scans (adult, 10 y, 3 y; RAS, uint8/int16) resampled to 2 mm
  in their own orientation and field of view, so registration tests stay fast on real heads.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import rescale_affine
from scipy import ndimage

N_DEMO = 12


def downsample(src: Path, dst: Path, voxel: float = 2.0) -> None:
    img = nib.load(str(src))
    zooms = np.array(img.header.get_zooms()[:3])
    factors = zooms / voxel
    data = ndimage.zoom(np.asanyarray(img.dataobj, dtype=np.float32), factors, order=1)
    affine = rescale_affine(img.affine, img.shape[:3], (voxel,) * 3, data.shape)
    out = nib.Nifti1Image(np.rint(data).astype(np.int16), affine)
    out.header.set_xyzt_units("mm", "sec")
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--raw_caps", type=Path, default=Path("/tmp/t/raw/caps"))
    args = parser.parse_args()

    demo = Path("demo/bids")
    participants = pd.read_csv(args.shared / "ixi_bids/participants.tsv", sep="\t").head(N_DEMO)
    for participant in participants.participant_id:
        src = args.shared / "ixi_bids" / participant / "anat" / f"{participant}_T1w.nii.gz"
        dst = demo / participant / "anat" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    participants.to_csv(demo / "participants.tsv", sep="\t", index=False)
    (demo / "dataset_description.json").write_text(json.dumps({
        "Name": "clinicadl-app demo: 12 IXI adults (Hammersmith Hospital, Philips 3T), resampled to 2 mm",
        "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "CC BY-SA 3.0 (IXI dataset, brain-development.org/ixi-dataset)",
        "Authors": ["IXI consortium (data)", "clinicadl-app developers (BIDS packaging)"],
    }, indent=2) + "\n")
    (demo / "README").write_text(
        "Twelve T1-weighted scans of the IXI dataset (https://brain-development.org/ixi-dataset/), "
        "Hammersmith Hospital, resampled to 2 mm by a third party.\n"
        "Licence: Creative Commons Attribution-ShareAlike 3.0 (CC BY-SA 3.0); this folder is shared "
        "under the same licence.\n"
    )
    (demo / "participants.json").write_text(json.dumps({
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
    }, indent=2) + "\n")

    target = Path("tests/data/caps2mm")
    pattern = "subjects/sub-*/ses-*/t1_linear/*_desc-Crop_res-1x1x1_T1w.nii.gz"
    for source, image in [(s, i) for s in (Path("demo_output/caps"), args.raw_caps) for i in sorted(s.glob(pattern))]:
        img = nib.load(str(image))
        data = ndimage.zoom(np.asanyarray(img.dataobj, dtype=np.float32), 0.5, order=1)
        data = np.clip(np.rint(data / np.percentile(data, 99.9) * 255), 0, 255).astype(np.uint8)
        out = nib.Nifti1Image(data, img.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
        destination = target / image.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        nib.save(out, str(destination))
    (target / "README.md").write_text(
        "t1-linear outputs of the 12 demo subjects (IXI, CC BY-SA 3.0) and the 3 raw scans of tests/data/raw2mm\n"
        "(BSD-2-Clause, MIT), downsampled to 2 mm (84x104x90), 8-bit, for fast\n"
        "training tests; the file names keep the CAPS convention (res-1x1x1) so the CAPS code reads them.\n"
    )
    raw = Path("tests/data/raw2mm")
    for participant in ("chris", "child10y", "child3y"):
        src = args.shared / "raw1mm_bids" / f"sub-{participant}" / "anat" / f"sub-{participant}_T1w.nii.gz"
        downsample(src, raw / f"sub-{participant}_T1w.nii.gz")
    (raw / "LICENSES.md").write_text(
        "Real raw T1w scans with skull, resampled to 2 mm by tools/make_test_data.py.\n\n"
        "| file | origin | licence |\n|---|---|---|\n"
        "| sub-chris | adult, niivue sample image chris_t1.nii.gz | BSD-2-Clause (niivue) |\n"
        "| sub-child10y | child 10.5 y, Siemens Trio 3T ME-MPRAGE (FNNDSC sample data) | MIT |\n"
        "| sub-child3y | child 3 y, Siemens Skyra 3T MPRAGE (FNNDSC sample data) | MIT |\n"
    )


if __name__ == "__main__":
    main()
