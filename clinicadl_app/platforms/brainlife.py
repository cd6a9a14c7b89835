"""The brainlife.io entry point: `main` (the app's executable, at the repository root) calls this with the
config.json brainlife writes into the job folder.

config.json holds either `t1` (one T1w image, brainlife's neuro/anat/t1w datatype; the subject and session
come from `_inputs[0].meta`) or `bids` (a BIDS folder), `analysis_level` (default participant), and any
option of the app by its Boutiques id (`modes`, `n_cpus`, `column`, ...): the descriptor is the one map
from names to flags, so brainlife, CBRAIN and the command line accept the same settings. Results go to
./output (the app's OUTPUT_DIR); product.json tells brainlife what happened and where the reports are.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from clinicadl_app.cli import main as run_app
from clinicadl_app.core.errors import MEANINGS, ExitCode
from clinicadl_app.platforms.boutiques import descriptor

RESERVED = {"t1", "bids", "analysis_level"}


def _label(value: Any, default: str) -> str:
    text = re.sub(r"[^A-Za-z0-9]", "", str(value or "")) or default
    return text


def _bids_from_t1(t1: Path, meta: dict, folder: Path) -> Path:
    """A one-image BIDS dataset around brainlife's t1.nii.gz (linked, not copied)."""
    subject, session = _label(meta.get("subject"), "01"), _label(meta.get("session"), "")
    anat = folder / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_T1w.nii.gz"
    if not (anat / name).exists():
        os.symlink(t1.resolve(), anat / name)
    (folder / "dataset_description.json").write_text(json.dumps({"Name": "brainlife input", "BIDSVersion": "1.9.0"}))
    return folder


def arguments(config: dict, job: Path) -> list[str]:
    """The app's command line for a brainlife config.json (relative paths are the job folder's)."""
    if "bids" in config:
        bids = (job / config["bids"]).resolve()
    elif "t1" in config:
        meta = (config.get("_inputs") or [{}])[0].get("meta", {})
        bids = _bids_from_t1(job / config["t1"], meta, job / "bids")
    else:
        raise ValueError("config.json: give 't1' (a T1w image) or 'bids' (a BIDS folder)")
    args = [str(bids), str(job / "output"), str(config.get("analysis_level", "participant"))]
    known = {entry["id"]: entry for entry in descriptor()["inputs"]}
    for key, value in config.items():
        if key in RESERVED or key.startswith("_") or value in (None, "", []):
            continue
        entry = known.get(key)
        if entry is None:
            raise ValueError(f"config.json: '{key}' is not an option of the app (see boutiques/clinicadl-app.json)")
        if entry["type"] == "Flag":
            args += [entry["command-line-flag"]] if value in (True, "true", "True", 1) else []
            continue
        values = value if isinstance(value, list) else str(value).split() if entry.get("list") else [value]
        if entry["type"] == "File":
            values = [str(job / str(v)) for v in values]
        args += [entry["command-line-flag"], *map(str, values)]
    return args


def product(code: int, job: Path) -> dict:
    """brainlife's product.json: a message with the outcome, and the reports to open."""
    reports = sorted(str(p.relative_to(job)) for p in (job / "output").glob("**/*.html"))
    kind = "info" if code == ExitCode.OK else "error"
    meaning = MEANINGS.get(code, "an unexpected failure: see the log")  # type: ignore[call-overload]
    return {"brainlife": [{"type": kind, "msg": f"clinicadl-app exit code {code}: {meaning}"}], "reports": reports}


def main(argv: list[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:] or ["config.json"])[0]).absolute()
    job = path.parent
    try:
        args = arguments(json.loads(path.read_text()), job)
    except (OSError, ValueError) as error:
        print(f"clinicadl-app brainlife: error: {error}", file=sys.stderr)
        (job / "product.json").write_text(json.dumps({"brainlife": [{"type": "error", "msg": str(error)}]}))
        return int(ExitCode.USAGE)
    print("clinicadl-app " + " ".join(args), file=sys.stderr)
    code = run_app(args)
    (job / "product.json").write_text(json.dumps(product(code, job), indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
