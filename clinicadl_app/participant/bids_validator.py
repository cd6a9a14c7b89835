"""BIDS validation of the input with the official validator (PyPI bids-validator-deno), run offline."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from clinicadl_app.core.errors import MissingInputError, ValidationFailed

log = logging.getLogger(__name__)


def validator_command() -> str | None:
    beside_python = Path(sys.executable).with_name("bids-validator-deno")
    return str(beside_python) if beside_python.exists() else shutil.which("bids-validator-deno")


def validate_bids(bids_dir: Path) -> None:
    """Raise ValidationFailed (exit 16) listing the validator's errors; warnings are only logged."""
    command = validator_command()
    if command is None:
        raise MissingInputError(
            "the BIDS validator (bids-validator-deno) is not installed; install it or use --skip_bids_validator"
        )
    try:
        done = subprocess.run(
            [command, str(bids_dir), "--format", "json", "--ignoreNiftiHeaders"],
            capture_output=True, text=True, timeout=1800, check=False,
        )
        report = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as error:
        raise ValidationFailed(
            f"{bids_dir}: the BIDS validator did not finish ({error}); fix the dataset or use --skip_bids_validator"
        ) from None
    issues = report.get("issues", {}).get("issues", [])
    errors = [issue for issue in issues if issue.get("severity") == "error"]
    warnings = {issue.get("code") for issue in issues if issue.get("severity") == "warning"}
    if warnings:
        log.info("BIDS validator warnings (not blocking): %s", ", ".join(sorted(map(str, warnings))))
    if errors:
        shown = "; ".join(
            f"{issue.get('code')} ({issue.get('location', '')})".replace(" ()", "") for issue in errors[:5]
        )
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise ValidationFailed(
            f"{bids_dir}: BIDS validation failed: {shown}{more}; fix the dataset "
            "(bids-validator-deno shows details) or use --skip_bids_validator"
        )
