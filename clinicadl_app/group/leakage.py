"""Whether images overlap what some models were trained or selected on, by participant label and by content.

One rule serves predict and transfer learning:
- content: an image whose BIDS source has the SHA-256 of a seen image's, or whose signature matches one
  (fingerprint.py), is the same scan, under whatever name: always a problem;
- labels: a participant label that was seen is a problem when the images come from the dataset that was
  trained on (same CAPS or same BIDS folder), or when that participant's images also match by content.
  Another dataset that merely reuses a label (every dataset has a sub-001) is warned about, not refused;
  when content cannot be compared (images on another grid), a label match is refused as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clinicadl_app.images.fingerprint import NEAR_DUPLICATE, Signatures, fingerprint_rows
from clinicadl_app.layouts.caps import KEYS, Caps

log = logging.getLogger(__name__)


@dataclass
class Seen:
    """Sessions some models trained or selected on: participant_id, session_id, source_sha256, and their
    image signatures (None when not recorded)."""

    rows: pd.DataFrame
    signatures: Signatures | None

    @classmethod
    def load(cls, table: Path, signatures: Path) -> Seen:
        rows = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
        return cls(rows, Signatures.load(signatures) if signatures.is_file() else None)

    def restrict(self, keep: pd.Series) -> Seen:
        """Only the rows where `keep` is true (a boolean Series aligned on `rows`)."""
        rows = self.rows[keep.to_numpy()].reset_index(drop=True)
        if self.signatures is None:
            return Seen(rows, None)
        wanted = set(map(tuple, rows[KEYS].values.tolist()))
        chosen = [i for i, key in enumerate(map(tuple, self.signatures.keys[KEYS].values.tolist())) if key in wanted]
        return Seen(rows, Signatures(self.signatures.keys.iloc[chosen].reset_index(drop=True),
                                     self.signatures.matrix[chosen] if chosen else self.signatures.matrix[:0]))


@dataclass
class Overlap:
    """Reasons a set of images overlaps what was seen, by kind, and what is only worth a warning."""

    labels: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.labels or self.content)

    def unwaived(self, skip_labels: bool, skip_content: bool) -> list[str]:
        return ([] if skip_labels else self.labels) + ([] if skip_content else self.content)

    def waiver(self, skip_labels: bool, skip_content: bool) -> str:
        """The option that would waive what is still refused."""
        labels, content = bool(self.labels) and not skip_labels, bool(self.content) and not skip_content
        return "--skip_leak_check" if labels and content else "--skip_label_check" if labels \
            else "--skip_content_check"

    def record(self, skip_labels: bool, skip_content: bool) -> dict[str, str]:
        """What the group's maps.json says of each check."""
        def state(found: list[str], waived: bool) -> str:
            if not found:
                return "passed"
            return ("waived by request: " if waived else "failed: ") + "; ".join(found)

        return {"labels": state(self.labels, skip_labels), "content": state(self.content, skip_content)}


def _listing(items: list[str]) -> str:
    return ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")


def overlap(caps: Caps, rows: pd.DataFrame, seen: Seen, same_dataset: bool,
            threshold: float = NEAR_DUPLICATE) -> Overlap:
    """How the sessions `rows` (participant_id, session_id) of `caps` overlap `seen`."""
    result = Overlap()
    keys = rows[KEYS].drop_duplicates().reset_index(drop=True)
    matched: set[str] = set()
    ours = fingerprint_rows(caps, keys)
    known = set(seen.rows.get("source_sha256", pd.Series(dtype=str))) - {""}
    copies = ours[(ours.source_sha256 != "") & ours.source_sha256.isin(known)]
    if len(copies):
        matched |= set(copies.participant_id)
        result.content.append("source file identical to a seen image's for " + _listing(
            [f"{p} {s}" for p, s in copies[KEYS].itertuples(index=False)]))
    comparable = True
    if seen.signatures is not None and len(seen.signatures.keys) and len(keys):
        try:
            matches = Signatures.of(caps, keys).matches(seen.signatures, threshold)
        except ValueError as error:
            comparable = False
            log.warning("%s: %s: signatures not compared", caps.root, error)
        else:
            if len(matches):
                matched |= set(matches.participant_id)
                result.content.append("the same scan as a seen image: " + _listing([
                    f"{r.participant_id} {r.session_id} = {r.seen_participant_id} {r.seen_session_id} "
                    f"(r {r.correlation})" for r in matches.itertuples()]))
    elif seen.signatures is None:
        comparable = False
    shared = sorted(set(keys.participant_id) & set(seen.rows.participant_id))
    refused = [p for p in shared if same_dataset or p in matched or not comparable]
    if refused:
        why = "from the dataset trained on" if same_dataset else "with matching images" if comparable \
            else "whose images could not be compared"
        result.labels.append(f"{len(refused)} participant(s) seen in training, {why}: {_listing(refused)}")
    others = [p for p in shared if p not in refused]
    if others:
        result.warnings.append(f"{len(others)} participant label(s) also used by a seen participant, in another "
                               f"dataset and with different images (kept): {_listing(others)}")
    return result


def same_place(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
