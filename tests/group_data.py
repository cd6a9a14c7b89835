"""A longitudinal BIDS dataset with made-up diagnoses over real demographics (IXI ages and sexes), and a
CAPS holding a real preprocessed-grid image for each session (the labels and split stages read only
which images exist)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from clinicadl_app.images import templates
from clinicadl_app.layouts.caps import Caps, CapsImage

from .conftest import DEMO


def make_longitudinal(root: Path, n: int = 40, seed: int = 0, diagnoses=("AD", "CN", "MCI", "sMCI", "pMCI"),
                      weights=(0.3, 0.3, 0.15, 0.15, 0.1)) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    ixi = pd.read_csv(DEMO / "participants.tsv", sep="\t")
    bids, caps = root / "bids", Caps(root / "caps")
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "longitudinal test", "BIDSVersion": "1.9.0"}\n')
    image = templates.path(templates.MNI_T1)
    rows = []
    for i in range(n):
        participant_id = f"sub-{i:03d}"
        source = ixi.iloc[i % len(ixi)]
        rows.append({"participant_id": participant_id, "age": round(float(source.age) + rng.normal(0, 3), 1),
                     "sex": source.sex, "diagnosis": rng.choice(diagnoses, p=weights)})
        sessions = [f"ses-M{12 * k:03d}" for k in range(int(rng.integers(1, 4)))]
        (bids / participant_id).mkdir()
        pd.DataFrame({"session_id": sessions, "visit": range(len(sessions))}).to_csv(
            bids / participant_id / f"{participant_id}_sessions.tsv", sep="\t", index=False)
        for session_id in sessions:
            (bids / participant_id / session_id / "anat").mkdir(parents=True)
            target = caps.t1_linear(CapsImage(participant_id, session_id, f"{participant_id}_{session_id}"))
            target.parent.mkdir(parents=True)
            os.symlink(image, target)
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return bids, caps.root
