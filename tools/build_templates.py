"""Build the template files bundled in clinicadl_app/data/templates (run once; outputs are committed).

Inputs: ../shared/data/templates (MNI152 2009c brain, Colin27 with skull) and the AAL atlas on the
Colin27 grid from Debian's mricron-data package (`apt-get download mricron-data`, then `dpkg -x`).
Colin27 is brought to MNI152NLin2009cSym once, here: an affine (used to initialise every subject's
registration) and a SyN warp (used only to carry the AAL hippocampus labels onto the 2009c grid).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import ants
import numpy as np
from scipy import ndimage

CROP = (slice(12, 181), slice(13, 221), slice(0, 179))
TPL = "tpl-MNI152NLin2009cSym"
AAL_LABELS = {"leftHippocampus": 37, "rightHippocampus": 38}
BOX = 50  # side of the hippocampus boxes, in voxels (ClinicaDL's ROI experiments used 50^3 cubes)


def _save(img: ants.ANTsImage, path: Path, pixeltype: str = "float") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = img.clone(pixeltype)
    ants.image_write(img, str(path))
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data/templates"))
    parser.add_argument("--aal", type=Path, required=True, help="aal.nii.gz from mricron-data")
    parser.add_argument("--out", type=Path, default=Path("clinicadl_app/data/templates"))
    args = parser.parse_args()
    out: Path = args.out

    mni = ants.image_read(str(args.shared / "niivue_MNI152_2009_template.nii.gz"), pixeltype="float")
    ch2 = ants.image_read(str(args.shared / "ch2.nii.gz"), pixeltype="float")
    ch2bet = ants.image_read(str(args.shared / "ch2bet.nii.gz"), pixeltype="float")
    aal = ants.image_read(str(args.aal), pixeltype="float")

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.shared / "niivue_MNI152_2009_template.nii.gz", out / f"{TPL}_res-1_T1w.nii.gz")
    brain = mni.numpy() > 0
    brain = ndimage.binary_closing(brain, iterations=2)
    brain = ndimage.binary_fill_holes(brain)
    _save(mni.new_image_like(brain.astype("float32")), out / f"{TPL}_res-1_desc-brain_mask.nii.gz", "unsigned char")
    _save(ants.resample_image(ch2, (2, 2, 2), use_voxels=False, interp_type=0), out / "tpl-Colin27_res-2_T1w.nii.gz")

    affine = ants.registration(
        mni, ch2bet, type_of_transform="Affine", random_seed=1, outprefix=str(out / "tmp_aff_")
    )
    Path(affine["fwdtransforms"][0]).rename(out / "from-Colin27_to-MNI152NLin2009cSym_mode-image_xfm.mat")
    print("wrote affine")
    syn = ants.registration(
        mni, ch2bet, type_of_transform="SyN", random_seed=1, outprefix="/tmp/tmp_syn_",
        initial_transform=str(out / "from-Colin27_to-MNI152NLin2009cSym_mode-image_xfm.mat"),
    )
    labels = ants.apply_transforms(mni, aal, syn["fwdtransforms"], interpolator="nearestNeighbor").numpy()
    masks = out.parent / "masks"
    for name, label in AAL_LABELS.items():
        mask = (np.rint(labels) == label).astype("float32")
        centre = np.rint(ndimage.center_of_mass(mask)).astype(int)
        box = np.zeros_like(mask)
        lo = centre - BOX // 2
        box[lo[0] : lo[0] + BOX, lo[1] : lo[1] + BOX, lo[2] : lo[2] + BOX] = 1
        for roi, data in ((name, mask), (f"{name}Box", box)):
            full = mni.new_image_like(data)
            _save(full, masks / f"{TPL}_res-1x1x1_roi-{roi}_mask.nii.gz", "unsigned char")
            cropped = ants.from_numpy(
                data[CROP], origin=_crop_origin(mni), spacing=mni.spacing, direction=mni.direction
            )
            _save(cropped, masks / f"{TPL}_desc-Crop_res-1x1x1_roi-{roi}_mask.nii.gz", "unsigned char")
    for tmp in out.glob("tmp_*"):
        tmp.unlink()


def _crop_origin(img: ants.ANTsImage) -> tuple[float, ...]:
    return tuple(ants.transform_index_to_physical_point(img, [CROP[0].start, CROP[1].start, CROP[2].start]))


if __name__ == "__main__":
    main()
