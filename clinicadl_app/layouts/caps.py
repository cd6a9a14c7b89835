"""The CAPS folder: every path and file name inside it, and nothing else.

Names follow Clinica's t1-linear and ClinicaDL 1.x's prepare-data, so ClinicaDL reads our CAPS and we
read theirs. A session's files share a prefix taken from the BIDS name (sub-X_ses-Y[_acq-..][_run-..]).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from clinicadl_app import __version__
from clinicadl_app.core.atomic import lock, write_json
from clinicadl_app.layouts.bids import T1wScan

log = logging.getLogger(__name__)

TEMPLATE = "MNI152NLin2009cSym"
KEYS = ["participant_id", "session_id"]  # what names a session in every table
CAPS_VERSION = "1.0.0"
PIPELINE = "t1_linear"
_CROPPED = f"_space-{TEMPLATE}_desc-Crop_res-1x1x1_T1w"
_UNCROPPED = f"_space-{TEMPLATE}_res-1x1x1_T1w"
_TRANSFORM = f"_space-{TEMPLATE}_res-1x1x1_affine.mat"
_SLICE_AXES = {0: "sag", 1: "cor", 2: "axi"}
_MASK = re.compile(rf"^tpl-{TEMPLATE}_(desc-Crop_)?res-1x1x1_roi-([A-Za-z0-9]+)_mask\.nii(\.gz)?$")


def session_order(session_id: str) -> str:
    """A sort key that counts the numbers of a session label as numbers (ses-9 before ses-10, ses-M6 before
    ses-M12): BIDS does not pad them, and a participant's first session must come first."""
    return re.sub(r"\d+", lambda number: number.group().zfill(12), session_id)


@dataclass(frozen=True, order=True)
class CapsImage:
    """One session's t1-linear image in a CAPS."""

    participant_id: str
    session_id: str
    prefix: str

    @property
    def name(self) -> str:
        return f"{self.participant_id} {self.session_id}"


class Caps:
    def __init__(self, root: Path):
        self.root = root

    # --- t1-linear outputs -------------------------------------------------------------------------
    def image_for(self, scan: T1wScan) -> CapsImage:
        prefix = "_".join([scan.participant_id, scan.session_id] + [f"{k}-{v}" for k, v in scan.entities])
        return CapsImage(scan.participant_id, scan.session_id, prefix)

    def t1_linear_dir(self, image: CapsImage) -> Path:
        return self.root / "subjects" / image.participant_id / image.session_id / PIPELINE

    def t1_linear(self, image: CapsImage, cropped: bool = True) -> Path:
        return self.t1_linear_dir(image) / f"{image.prefix}{_CROPPED if cropped else _UNCROPPED}.nii.gz"

    def sidecar(self, image: CapsImage) -> Path:
        return self.t1_linear_dir(image) / f"{image.prefix}{_CROPPED}.json"

    def quality(self, image: CapsImage) -> dict | None:
        """The t1-linear quality check recorded in the sidecar (correlation, threshold, passed), or None for an
        image made by another tool."""
        try:
            return json.loads(self.sidecar(image).read_text()).get("QualityCheck")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            return None

    def transform(self, image: CapsImage) -> Path:
        return self.t1_linear_dir(image) / f"{image.prefix}{_TRANSFORM}"

    def file_pattern(self, cropped: bool = True) -> str:
        """The glob ClinicaDL records in its extraction JSON ('file_type')."""
        return f"*{(_CROPPED if cropped else _UNCROPPED)[1:]}.nii.gz"

    def index(
        self, participants: tuple[str, ...] = (), sessions: tuple[str, ...] = (), cropped: bool = True
    ) -> tuple[list[CapsImage], list[str]]:
        """Find every t1-linear image once; returns the images and one line per ambiguous session."""
        suffix = f"{_CROPPED if cropped else _UNCROPPED}.nii.gz"
        found: dict[tuple[str, str], list[Path]] = {}
        # only the participants' own folders are searched: a job indexing one participant of a large CAPS
        folders = [f"sub-{label}" for label in sorted(set(participants))] or ["sub-*"]
        paths = {p for folder in folders for p in (self.root / "subjects").glob(f"{folder}/ses-*/{PIPELINE}/*{suffix}")}
        for path in sorted(paths):
            participant_id, session_id = path.parts[-4], path.parts[-3]
            if sessions and session_id[4:] not in sessions:
                continue
            found.setdefault((participant_id, session_id), []).append(path)
        images, problems = [], []
        for (participant_id, session_id), paths in found.items():
            if len(paths) > 1:
                problems.append(
                    f"{participant_id} {session_id}: several t1-linear images ({', '.join(p.name for p in paths)}); "
                    "keep one per session in the CAPS"
                )
                continue
            images.append(CapsImage(participant_id, session_id, paths[0].name[: -len(suffix)]))
        return images, problems

    def by_session(self, cropped: bool = True) -> dict[tuple[str, str], CapsImage]:
        """The unambiguous t1-linear images by (participant_id, session_id)."""
        images, _ = self.index(cropped=cropped)
        return {(i.participant_id, i.session_id): i for i in images}

    # --- tensors (ClinicaDL 1.x names) --------------------------------------------------------------
    def tensor_dir(self, image: CapsImage, mode: str) -> Path:
        return (
            self.root / "subjects" / image.participant_id / image.session_id
            / "deeplearning_prepare_data" / f"{mode}_based" / PIPELINE
        )

    def _stem(self, image: CapsImage, cropped: bool) -> str:
        """The image name without its final '_T1w' suffix, as ClinicaDL builds part names from it."""
        return f"{image.prefix}{(_CROPPED if cropped else _UNCROPPED)[: -len('_T1w')]}"

    def image_tensor(self, image: CapsImage, cropped: bool = True) -> Path:
        return self.tensor_dir(image, "image") / f"{self._stem(image, cropped)}_T1w.pt"

    def patch_tensor(self, image: CapsImage, size: int, stride: int, index: int, cropped: bool = True) -> Path:
        name = f"{self._stem(image, cropped)}_patchsize-{size}_stride-{stride}_patch-{index}_T1w.pt"
        return self.tensor_dir(image, "patch") / name

    def slice_tensor(
        self, image: CapsImage, direction: int, channels: str, index: int, cropped: bool = True
    ) -> Path:
        name = f"{self._stem(image, cropped)}_axis-{_SLICE_AXES[direction]}_channel-{channels}_slice-{index}_T1w.pt"
        return self.tensor_dir(image, "slice") / name

    def roi_tensor(self, image: CapsImage, roi: str, cropped: bool = True, uncrop_output: bool = False) -> Path:
        if cropped:
            descriptors = ["desc-CropImage" if uncrop_output else "desc-CropRoi", "res-1x1x1"]
        else:
            descriptors = ([] if uncrop_output else ["desc-CropRoi"]) + ["res-1x1x1"]
        name = f"{image.participant_id}_{image.session_id}_space-{TEMPLATE}_{'_'.join(descriptors)}_roi-{roi}_T1w.pt"
        return self.tensor_dir(image, "roi") / name

    def extraction_json(self, name: str) -> Path:
        return self.root / "tensor_extraction" / name

    # --- ROI masks -----------------------------------------------------------------------------------
    @property
    def masks_dir(self) -> Path:
        return self.root / "masks" / f"tpl-{TEMPLATE}"

    def mask(self, roi: str, cropped: bool = True) -> Path:
        return self.masks_dir / f"tpl-{TEMPLATE}_{'desc-Crop_' if cropped else ''}res-1x1x1_roi-{roi}_mask.nii.gz"

    def install_builtin_masks(self) -> None:
        """Copy the bundled hippocampus masks into the CAPS, where ClinicaDL also looks for them."""
        source = resources.files("clinicadl_app") / "data" / "masks"
        for entry in source.iterdir():
            target = self.masks_dir / entry.name
            if _MASK.match(entry.name) and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with resources.as_file(entry) as path:
                    shutil.copyfile(path, target)

    @staticmethod
    def mask_name(path: Path) -> tuple[str, bool] | None:
        """(roi name, cropped) for a file named as a CAPS mask, else None."""
        match = _MASK.match(path.name)
        return (match.group(2), bool(match.group(1))) if match else None

    # --- dataset level -------------------------------------------------------------------------------
    @property
    def qc_table(self) -> Path:
        return self.root / "qc" / "t1-linear_qc.tsv"

    def write_description(self, source: Path) -> None:
        """CAPS dataset_description.json; ClinicaDL 2 recognises a CAPS by its CAPSVersion."""
        path = self.root / "dataset_description.json"
        with lock(path):
            try:
                data = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                data = {}
            data.update(
                {"Name": data.get("Name", "clinicadl-app CAPS"), "BIDSVersion": "1.9.0",
                 "CAPSVersion": CAPS_VERSION, "DatasetType": "derivative"}
            )
            processing = [p for p in data.get("Processing", []) if p.get("Name") != "t1-linear"]
            processing.append(
                {"Name": "t1-linear", "Software": "clinicadl-app", "Version": __version__,
                 "Date": datetime.now(UTC).isoformat(timespec="seconds"), "InputPath": str(source)}
            )
            data["Processing"] = processing
            write_json(path, data)
