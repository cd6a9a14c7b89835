"""The top of OUTPUT_DIR: a BIDS derivative holding the CAPS, the reports, the logs (and later splits, MAPS).

The CAPS module names what is inside caps/; this module names everything else at this level.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from clinicadl_app import __version__
from clinicadl_app.core.atomic import check_writable, lock, write_json, write_text
from clinicadl_app.layouts.caps import CapsImage

BIDS_VERSION = "1.9.0"
# no trailing slash: bids-validator-deno 3 does not match "dir/" against the folder itself
_IGNORED = ("caps", "reports", "logs", "splits", "maps", "search", "exports", "work")


def container() -> dict[str, str] | None:
    """What GeneratedBy says about the container we run in, if any (the image sets CLINICADL_APP_IMAGE).
    An image cannot know its own digest: whoever runs it may pass CLINICADL_APP_IMAGE_DIGEST (sha256:...,
    from `docker inspect`), and it becomes the URI; a Singularity image is named by its file."""
    image = os.environ.get("CLINICADL_APP_IMAGE")
    digest = os.environ.get("CLINICADL_APP_IMAGE_DIGEST", "").strip()
    sif = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if sif:
        found = {"Type": "singularity", "Tag": image or os.environ.get("SINGULARITY_NAME", "unknown"), "URI": sif}
    elif image:
        found = {"Type": "docker", "Tag": image}
    else:
        return None
    if digest:
        found["URI"] = f"docker://{found['Tag'].split(':')[0]}@{digest}"
    return found


class OutputLayout:
    def __init__(self, root: Path):
        self.root = root

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def qc_pages(self, caps_dir: Path) -> Path | None:
        """The pattern of the QC pages of a CAPS's participants: in this folder, or beside a CAPS that another
        run's participant level made; None when there are none (a CAPS from Clinica or from generate)."""
        for reports in (self.reports_dir, OutputLayout(caps_dir.parent).reports_dir):
            if any(reports.glob("sub-*.html")):
                return reports / "sub-*.html"
        return None

    def participant_report(self, participant_id: str) -> Path:
        return self.reports_dir / f"{participant_id}.html"

    def qc_figure(self, image: CapsImage) -> Path:
        return self.reports_dir / image.participant_id / "figures" / f"{image.prefix}_desc-t1linear_qc.png"

    @property
    def maps_dir(self) -> Path:
        return self.root / "maps"

    def export(self, experiment: str) -> Path:
        """The archive --stages export writes for a MAPS, the file --maps_dir accepts elsewhere."""
        return self.root / "exports" / f"{experiment}.tar.gz"

    @property
    def splits_dir(self) -> Path:
        return self.root / "splits"

    @property
    def search_dir(self) -> Path:
        from clinicadl_app.layouts.search import SEARCH_DIR

        return self.root / SEARCH_DIR

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def run_record(self, level: str, suffix: str) -> Path:
        """A per-invocation file (log, effective configuration): unique, so concurrent jobs never share one."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return self.logs_dir / f"{level}-{stamp}-{platform.node() or 'host'}-{os.getpid()}{suffix}"

    def prepare(self, source: Path) -> None:
        """Create OUTPUT_DIR as a BIDS derivative; refuse early and clearly when it is not writable."""
        check_writable(self.root, "the output folder", "choose another folder or fix its permissions")
        self._write_description(source)
        bidsignore = self.root / ".bidsignore"
        with lock(bidsignore):
            present = bidsignore.read_text().splitlines() if bidsignore.exists() else []
            missing = [entry for entry in _IGNORED if entry not in present]
            if missing:
                write_text(bidsignore, "\n".join(present + missing) + "\n")

    def _write_description(self, source: Path) -> None:
        path = self.root / "dataset_description.json"
        generated_by: dict[str, object] = {"Name": "clinicadl-app", "Version": __version__}
        if container():
            generated_by["Container"] = container()
        with lock(path):
            try:
                previous = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                previous = {}
            others = [g for g in previous.get("GeneratedBy", []) if g.get("Name") != "clinicadl-app"]
            description = {
                "Name": previous.get("Name", "clinicadl-app outputs"),
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [generated_by, *others],
                "SourceDatasets": [{"URL": source.as_uri()}],
            }
            if description != previous:
                write_json(path, description)
