"""Input discovery: which T1w scan of the BIDS dataset each participant and session contributes.

The dataset is indexed once (pybids); labels are validated so that no name can escape its folder.
Several runs of one session: the highest run number is used, as Clinica does; scans that differ by
another entity (acq, rec, ce...) are ambiguous and must be narrowed with --bids_filter_file.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from clinicadl_app.core.errors import MissingInputError, NoDataError, UsageError

log = logging.getLogger(__name__)

SESSIONLESS = "M000"
"""Session label used in the CAPS for datasets without sessions (Clinica's baseline label)."""
ACQ_TIME = "acq_time"
"""The sessions.tsv column that dates a session (BIDS: YYYY-MM-DDThh:mm:ss); it orders named sessions."""


def acq_times(values):
    """acq_time values as UTC timestamps (a time without zone is taken as UTC); NaT where missing or not a date."""
    import pandas as pd  # here: the participant level reads this module and needs no pandas for it

    return pd.to_datetime(values, errors="coerce", format="ISO8601", utc=True)

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NAMING_ENTITIES = ("acquisition", "ceagent", "reconstruction", "run")
_ENTITY_KEYS = {"acquisition": "acq", "ceagent": "ce", "reconstruction": "rec", "run": "run"}


@dataclass(frozen=True)
class T1wScan:
    participant: str
    """Participant label, without 'sub-'."""
    session: str | None
    """Session label without 'ses-'; None when the dataset has no sessions."""
    path: Path
    entities: tuple[tuple[str, str], ...] = ()
    """Other BIDS entities of the file (acq, ce, rec, run), in BIDS order, for output names."""

    @property
    def participant_id(self) -> str:
        return f"sub-{self.participant}"

    @property
    def session_id(self) -> str:
        return f"ses-{self.session or SESSIONLESS}"

    @property
    def name(self) -> str:
        """Human-readable 'sub-X ses-Y' for messages."""
        return f"{self.participant_id} {self.session_id}"


@dataclass
class Selection:
    scans: list[T1wScan]
    skipped: list[str] = field(default_factory=list)
    """One line per session that has T1w scans but none could be chosen, naming the fix."""


def normalise_labels(labels: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """Strip an optional 'sub-'/'ses-' prefix and refuse anything but letters and digits."""
    out = []
    for label in labels:
        bare = label[len(prefix) + 1 :] if label.startswith(f"{prefix}-") else label
        if not _LABEL.match(bare):
            raise UsageError(f"invalid {prefix} label '{label}': BIDS labels contain only letters and digits")
        out.append(bare)
    return tuple(dict.fromkeys(out))


def read_filters(path: Path | None) -> dict[str, object]:
    """The 't1w' query of an fMRIPrep-style BIDS filter file."""
    if path is None:
        return {}
    if not path.is_file():
        raise MissingInputError(f"{path}: BIDS filter file not found; check --bids_filter_file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not valid JSON ({error}); fix the filter file") from None
    if not isinstance(data, dict) or not isinstance(data.get("t1w", {}), dict):
        raise UsageError(f'{path}: expected {{"t1w": {{"entity": "value", ...}}}}; fix the filter file')
    unknown = set(data) - {"t1w"}
    misspelt = sorted(key for key in unknown if key.lower().startswith("t1"))
    if misspelt:  # ignored, it would select every T1w scan: the opposite of what the file asks
        raise UsageError(f"{path}: {', '.join(repr(k) for k in misspelt)} is not a query this app reads; the T1w "
                         "query's key is 't1w' (lower case, as in fMRIPrep); fix the filter file")
    if unknown:
        log.warning("%s: only the 't1w' query is used; ignoring %s", path, ", ".join(sorted(unknown)))
    return dict(data.get("t1w", {}))


def find_t1w(
    bids_dir: Path,
    participants: tuple[str, ...] = (),
    sessions: tuple[str, ...] = (),
    filters: dict[str, object] | None = None,
) -> Selection:
    """Index the dataset once and choose one T1w scan per participant and session."""
    import bids  # pybids is slow to import; only the participant level needs it

    layout = bids.BIDSLayout(
        str(bids_dir), validate=False, indexer=bids.BIDSLayoutIndexer(index_metadata=False)
    )
    known = set(layout.get_subjects())
    missing = [label for label in participants if label not in known]
    if missing:
        raise UsageError(
            f"{bids_dir}: no participant {', '.join('sub-' + m for m in missing)}; "
            "check --participant_label against the sub-* folders"
        )
    query: dict[str, object] = {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]}
    query.update(filters or {})
    if participants:
        query["subject"] = list(participants)
    if sessions:
        query["session"] = list(sessions)
    try:
        files = layout.get(return_type="object", **query)
    except (ValueError, TypeError) as error:
        raise UsageError(f"BIDS filter rejected by pybids ({error}); check --bids_filter_file") from None

    groups: dict[tuple[str, str | None], list[T1wScan]] = defaultdict(list)
    for bids_file in files:
        entities = bids_file.get_entities()
        scan = T1wScan(
            participant=str(entities["subject"]),
            session=str(entities["session"]) if "session" in entities else None,
            path=Path(bids_file.path),
            entities=tuple(
                (_ENTITY_KEYS[name], str(entities[name])) for name in _NAMING_ENTITIES if name in entities
            ),
        )
        groups[(scan.participant, scan.session)].append(scan)

    selection = Selection(scans=[])
    for key in sorted(groups, key=lambda k: (k[0], k[1] or "")):
        chosen, problem = _choose(groups[key])
        if chosen:
            selection.scans.append(chosen)
        else:
            selection.skipped.append(problem)
    if not selection.scans and not selection.skipped:
        asked = ", ".join(f"{k}={v}" for k, v in query.items() if k not in ("datatype", "suffix", "extension"))
        raise NoDataError(
            f"{bids_dir}: no T1w image found in anat/ folders"
            + (f" for {asked}" if asked else "")
            + "; check the dataset and the --participant_label/--session_label/--bids_filter_file selection"
        )
    return selection


def _choose(scans: list[T1wScan]) -> tuple[T1wScan | None, str]:
    if len(scans) == 1:
        return scans[0], ""
    without_run = {tuple(e for e in scan.entities if e[0] != "run") for scan in scans}
    names = ", ".join(scan.path.name for scan in sorted(scans, key=lambda s: s.path.name))
    if len(without_run) > 1:
        return None, (
            f"{scans[0].name}: several T1w scans ({names}); choose one with --bids_filter_file, "
            'e.g. {"t1w": {"acquisition": "<label>"}}'
        )
    chosen = max(scans, key=lambda scan: int(dict(scan.entities).get("run", "0") or 0))
    log.warning(
        "%s: several runs (%s); using the highest run, %s, as Clinica does", scans[0].name, names, chosen.path.name
    )
    return chosen, ""
