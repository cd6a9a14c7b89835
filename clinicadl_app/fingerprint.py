"""Content fingerprints of the images a model saw, to recognise them later under any name."""

from __future__ import annotations

import json

import pandas as pd

from .caps import Caps

KEYS = ["participant_id", "session_id"]


def fingerprint_rows(caps: Caps, keys: pd.DataFrame) -> pd.DataFrame:
    """participant_id, session_id, the CAPS image, and the SHA-256 of its BIDS source when recorded."""
    images, _ = caps.index()
    found = {(i.participant_id, i.session_id): i for i in images}
    rows = []
    for participant_id, session_id in keys[KEYS].itertuples(index=False):
        image = found.get((participant_id, session_id))
        source = ""
        if image is not None:
            try:
                source = json.loads(caps.sidecar(image).read_text()).get("SourceSHA256", "")
            except (FileNotFoundError, json.JSONDecodeError):
                source = ""
        rows.append({"participant_id": participant_id, "session_id": session_id,
                     "image": str(caps.t1_linear(image).relative_to(caps.root)) if image else "",
                     "source_sha256": source})
    return pd.DataFrame(rows, columns=[*KEYS, "image", "source_sha256"])
