"""The labels stage: one row per (participant, session) that has a preprocessed image and a usable label.

The label is any column of participants.tsv or sub-X/sub-X_sessions.tsv (session values win over
participant values of the same name). What is dropped, and why, is written beside the labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clinicadl_app.core.config import Execution, Labels
from clinicadl_app.core.errors import MissingInputError, NoDataError, UsageError
from clinicadl_app.layouts.bids import ACQ_TIME, SESSIONLESS, acq_times, normalise_labels
from clinicadl_app.layouts.caps import KEYS, Caps, session_order

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chosen:
    """--participant_label and --session_label at the group level (the BIDS Apps convention): the images the
    labels stage may keep, hence the split and training, and the images predict takes from a new dataset.
    The split records them, so a reproduction chooses the same images."""

    participants: tuple[str, ...] = ()
    """participant_id values ('sub-X'); empty: every participant"""
    sessions: tuple[str, ...] = ()
    """session_id values ('ses-Y'); empty: every session"""

    @classmethod
    def of(cls, execution: Execution) -> Chosen:
        return cls(tuple(f"sub-{label}" for label in normalise_labels(execution.participant_label, "sub")),
                   tuple(f"ses-{label}" for label in normalise_labels(execution.session_label, "ses")))

    @classmethod
    def recorded(cls, labels: dict) -> Chosen:
        """From split.json's "labels" section (absent keys: no choice was made)."""
        return cls(tuple(labels.get("participant_label", ())), tuple(labels.get("session_label", ())))

    def __bool__(self) -> bool:
        return bool(self.participants or self.sessions)

    def record(self) -> dict[str, list[str]]:
        """What split.json adds to its "labels" section; nothing when every image was taken, so that splits
        drawn before this option existed still compare equal."""
        return {key: list(values) for key, values in
                (("participant_label", self.participants), ("session_label", self.sessions)) if values}

    def __str__(self) -> str:
        return "; ".join(f"{flag} {' '.join(values)}" for flag, values in
                         (("--participant_label", self.participants), ("--session_label", self.sessions)) if values)

    def reason(self, participant_id: str, session_id: str) -> str | None:
        """Why this image is left out, or None when it is chosen."""
        if self.participants and participant_id not in self.participants:
            return "not chosen by --participant_label"
        if self.sessions and session_id not in self.sessions:
            return "not chosen by --session_label"
        return None

    def check(self, available: pd.DataFrame, where: Path) -> None:
        """Refuse a label that names no image (a typo would otherwise shrink the data without a word)."""
        for column, wanted, flag in ((KEYS[0], self.participants, "--participant_label"),
                                     (KEYS[1], self.sessions, "--session_label")):
            absent = [label for label in wanted if label not in set(available[column])]
            if absent:
                raise UsageError(f"{where}: no t1-linear image of {', '.join(absent)}; check {flag}")


@dataclass
class LabelTable:
    rows: pd.DataFrame
    """participant_id, session_id, the label column, then age and sex when present; sorted."""
    dropped: pd.DataFrame
    """participant_id, session_id, reason."""
    column: str
    task: str
    parents: dict[str, str]
    """child class -> parent class, from the subgroups declaration."""


def parse_subgroups(subgroups: tuple[str, ...]) -> dict[str, str]:
    """'MCI=sMCI,pMCI' -> {'sMCI': 'MCI', 'pMCI': 'MCI'}."""
    parents: dict[str, str] = {}
    for declaration in subgroups:
        parent, sep, children = declaration.partition("=")
        names = [c.strip() for c in children.split(",") if c.strip()]
        if not sep or not parent.strip() or not names:
            raise UsageError(f"[labels] subgroups: '{declaration}' must read PARENT=CHILD1,CHILD2")
        for child in names:
            if child in parents:
                raise UsageError(f"[labels] subgroups: '{child}' is declared in two parents")
            parents[child] = parent.strip()
    return parents


def read_tsv(path: Path) -> pd.DataFrame:
    """A BIDS TSV as strings; 'n/a' and empty cells become missing values."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not a readable TSV ({error}); fix the file") from None
    table.columns = [c.strip() for c in table.columns]
    return table.replace({"n/a": None, "": None, "NaN": None, "nan": None})


def participants_table(bids_dir: Path) -> pd.DataFrame:
    path = bids_dir / "participants.tsv"
    if not path.is_file():
        return pd.DataFrame(columns=["participant_id"])
    table = read_tsv(path)
    if "participant_id" not in table.columns:
        raise UsageError(f"{path}: no participant_id column; the first column must be participant_id")
    duplicated = table[table.participant_id.duplicated(keep=False)]
    if not duplicated.empty:
        rows = ", ".join(str(i + 2) for i in duplicated.index)
        raise UsageError(
            f"{path}: participant {duplicated.participant_id.iloc[0]} appears on several rows (lines {rows}); "
            "keep one row per participant"
        )
    return table


def sessions_table(bids_dir: Path, participants: list[str]) -> pd.DataFrame:
    """All sub-X_sessions.tsv files stacked, checked against the session folders."""
    frames = []
    for participant_id in participants:
        path = bids_dir / participant_id / f"{participant_id}_sessions.tsv"
        if not path.is_file():
            continue
        table = read_tsv(path)
        if "session_id" not in table.columns:
            raise UsageError(f"{path}: no session_id column; the first column must be session_id")
        if table.session_id.duplicated().any():
            line = int(np.flatnonzero(table.session_id.duplicated())[0]) + 2
            raise UsageError(f"{path}: session {table.session_id[line - 2]} repeated on line {line}; keep one row")
        folders = {p.name for p in (bids_dir / participant_id).glob("ses-*") if p.is_dir()}
        listed = set(table.session_id)
        if listed - folders:
            log.warning("%s: sessions %s have no folder; their rows are ignored", path,
                        ", ".join(sorted(listed - folders)))
        if folders - listed:
            log.warning("%s: session folders %s are not listed; add rows for them", path,
                        ", ".join(sorted(folders - listed)))
        table.insert(0, "participant_id", participant_id)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=KEYS)
    return pd.concat(frames, ignore_index=True)


def chosen_images(caps: Caps, chosen: Chosen) -> tuple[list, list[tuple[str, str, str]]]:
    """The CAPS's t1-linear images that `chosen` keeps, and (participant, session, reason) for the others."""
    images, problems = caps.index()
    for problem in problems:
        log.warning("%s", problem)
    if not images:
        raise MissingInputError(
            f"{caps.root}: no t1-linear image in this CAPS; run the participant level first or check --caps_dir"
        )
    if not chosen:
        return images, []
    chosen.check(pd.DataFrame([(i.participant_id, i.session_id) for i in images], columns=KEYS), caps.root)
    reasons = [chosen.reason(i.participant_id, i.session_id) for i in images]
    left_out = [(i.participant_id, i.session_id, why) for i, why in zip(images, reasons, strict=True) if why]
    return [i for i, why in zip(images, reasons, strict=True) if not why], left_out


def build_labels(bids_dir: Path, caps: Caps, settings: Labels, every_class: bool = True,
                 chosen: Chosen = Chosen()) -> LabelTable:
    """`every_class`: refuse classes of [labels] values that never occur (a new group may lack some)."""
    if not settings.column:
        raise UsageError("[labels] column is required: the participants.tsv or sessions.tsv column to predict")
    images, dropped = chosen_images(caps, chosen)
    available = pd.DataFrame([(i.participant_id, i.session_id) for i in images], columns=KEYS)
    participants = participants_table(bids_dir)
    sessions = sessions_table(bids_dir, sorted(available.participant_id.unique()))

    table = available.merge(sessions, on=KEYS, how="left")
    participant_columns = [c for c in participants.columns if c not in table.columns or c == "participant_id"]
    table = table.merge(participants[participant_columns], on="participant_id", how="left")
    column = settings.column
    if column not in table.columns:
        known = sorted(set(participants.columns) | set(sessions.columns) - set(KEYS))
        raise UsageError(
            f"{bids_dir / 'participants.tsv'}: no column '{column}' in participants.tsv or sessions.tsv; "
            f"available: {', '.join(known) or 'none'}; fix [labels] column"
        )

    parents = parse_subgroups(settings.subgroups)
    if not settings.keep_failed_qc:
        failed = failed_qc(caps, images)
        dropped += [(p, s, why) for (p, s), why in failed.items()]
        table = table[[key not in failed for key in map(tuple, table[KEYS].values.tolist())]]
    missing = table[column].isna()
    dropped += [(p, s, f"no value in column '{column}'") for p, s in table.loc[missing, KEYS].itertuples(index=False)]
    table = table[~missing].copy()

    if settings.task == "classification":
        table[column] = table[column].astype(str).str.strip()
        wanted = set(settings.values) | {child for child, parent in parents.items() if parent in settings.values}
        if settings.values:
            present = set(table[column])
            absent = [v for v in settings.values if v not in present and v not in parents.values()]
            if absent and every_class:
                raise UsageError(
                    f"{bids_dir / 'participants.tsv'}: value(s) {', '.join(absent)} of [labels] values never occur "
                    f"in column '{column}' of images in the CAPS; present: {', '.join(sorted(present))}"
                )
            outside = ~table[column].isin(wanted)
            dropped += [(p, s, f"value '{v}' not in [labels] values")
                        for p, s, v in table.loc[outside, [*KEYS, column]].itertuples(index=False)]
            table = table[~outside]
        elif table[column].nunique() > 10 and pd.to_numeric(table[column], errors="coerce").notna().all():
            log.warning("column '%s' holds %d different numbers, each taken as a class; to predict it as a number, "
                        "give --task regression", column, table[column].nunique())
    else:
        numeric = pd.to_numeric(table[column], errors="coerce")
        bad = numeric.isna()
        if bad.any():
            first = table[bad].iloc[0]
            raise UsageError(
                f"{bids_dir / 'participants.tsv'}: column '{column}' holds non-numeric value '{first[column]}' "
                f"({first.participant_id} {first.session_id}); a regression label must be a number"
            )
        table[column] = numeric

    extra = []
    if settings.age_column in table.columns and settings.age_column != column:
        ages = pd.to_numeric(table[settings.age_column], errors="coerce")
        bad = ages.isna() & table[settings.age_column].notna()
        if bad.any():
            log.warning(
                "%s: non-numeric %s for %s; treated as missing", bids_dir / "participants.tsv", settings.age_column,
                ", ".join(f"{p} {s}" for p, s in table.loc[bad, KEYS].itertuples(index=False)),
            )
        table["age"] = ages
        extra.append("age")
    if settings.sex_column in table.columns and settings.sex_column != column:
        table["sex"] = table[settings.sex_column].astype("string").str.strip().str.upper().str[:1]
        extra.append("sex")

    if ACQ_TIME in sessions.columns and column != ACQ_TIME:
        extra.append(ACQ_TIME)
    rows = table[[*KEYS, column, *extra]].sort_values(KEYS).reset_index(drop=True)
    _warn_of_unordered_sessions(rows)
    if rows.empty:
        reasons = sorted({reason for _, _, reason in dropped})
        raise NoDataError(f"{bids_dir}: no image kept for the label '{column}'; dropped because: "
                          + " | ".join(reasons[:3]) + (" | ..." if len(reasons) > 3 else ""))
    dropped_table = pd.DataFrame(dropped, columns=[*KEYS, "reason"]).sort_values(KEYS).reset_index(drop=True)
    missing_images = _bids_sessions_without_image(bids_dir, participants, sessions, available)
    missing_images = missing_images.loc[np.asarray([chosen.reason(p, s) is None for p, s in
                                                    missing_images[KEYS].itertuples(index=False)], dtype=bool)]
    if not missing_images.empty:
        dropped_table = pd.concat([dropped_table, missing_images]).sort_values(KEYS).reset_index(drop=True)
    return LabelTable(rows, dropped_table, column, settings.task, parents)


def _warn_of_unordered_sessions(rows: pd.DataFrame) -> None:
    """A participant's first session sets its stratum and its baseline row; sessions named without a number
    (ses-pre, ses-post) and without acq_time are ordered by name, which may put the follow-up first."""
    times = acq_times(rows[ACQ_TIME]) if ACQ_TIME in rows else pd.Series(pd.NaT, index=rows.index)
    bad = rows[times.isna() & rows.get(ACQ_TIME, pd.Series(None, index=rows.index)).notna()]
    if not bad.empty:
        first = bad.iloc[0]
        log.warning("%s_sessions.tsv: acq_time '%s' of %s is not a date (YYYY-MM-DDThh:mm:ss); %d such value(s), and "
                    "their participants' sessions are ordered by label", first.participant_id, first[ACQ_TIME],
                    first.session_id, len(bad))
    named = ~rows.session_id.astype(str).str.contains(r"\d", regex=True)
    undated = (named & times.isna()).groupby(rows.participant_id).any()
    several = rows.groupby("participant_id").size() > 1
    unordered = sorted(undated[undated & several].index)
    if unordered:
        first = rows[rows.participant_id == unordered[0]].session_id.astype(str)
        log.warning("%d participant(s) have sessions named without a number and not dated by acq_time in "
                    "sessions.tsv (e.g. %s: %s); their first session is taken in name order (%s). Add acq_time "
                    "to %s_sessions.tsv to order them", len(unordered), unordered[0], ", ".join(first),
                    min(first, key=session_order), unordered[0])


def failed_qc(caps: Caps, images) -> dict[tuple[str, str], str]:
    """Sessions whose registration failed its quality check, with the reason and the correlation."""
    failed = {}
    for image in images:
        quality = caps.quality(image)
        if quality and not quality.get("passed", True):
            failed[(image.participant_id, image.session_id)] = (
                f"failed the t1-linear quality check (r {quality['correlation']:.3f} < {quality['threshold']:.2f}); "
                "look at its report, or keep it with --keep_failed_qc")
    return failed


def _bids_sessions_without_image(bids_dir: Path, participants: pd.DataFrame, sessions: pd.DataFrame,
                                 available: pd.DataFrame) -> pd.DataFrame:
    """Sessions known to the BIDS tables whose image is missing from the CAPS."""
    known = set()
    for participant_id in participants.participant_id:
        listed = sessions[sessions.participant_id == participant_id].session_id.tolist() if len(sessions) else []
        folders = [p.name for p in (bids_dir / participant_id).glob("ses-*") if p.is_dir()]
        for session_id in listed or folders or [f"ses-{SESSIONLESS}"]:
            known.add((participant_id, session_id))
    have = set(map(tuple, available[KEYS].values.tolist()))
    rows = [(p, s, "no t1-linear image in the CAPS") for p, s in sorted(known - have)]
    return pd.DataFrame(rows, columns=[*KEYS, "reason"])
