"""OUTPUT_DIR/splits/<name>/: the label table, the sets of a subject-level split, and its record.

splits/<name>/
  labels.tsv, dropped.tsv          sessions kept with their label; sessions left out, with the reason
  split.json                       settings, draws, counts and the membership hash a MAPS is bound to
  population.tsv, population.png   who is in each set (class, age, sex)
  train.tsv, test.tsv              the held-out test set and the rest
  split-N/{train,validation}.tsv   the folds ([_baseline].tsv: each subject's first session)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from clinicadl_app.layouts.bids import ACQ_TIME
from clinicadl_app.layouts.caps import KEYS


class SplitFolder:
    """OUTPUT_DIR/splits/<name>/: the only module that names files in it."""

    def __init__(self, root: Path):
        self.root = root

    labels = property(lambda self: self.root / "labels.tsv")
    dropped = property(lambda self: self.root / "dropped.tsv")
    record = property(lambda self: self.root / "split.json")
    population_table = property(lambda self: self.root / "population.tsv")
    population_figure = property(lambda self: self.root / "population.png")

    def set_file(self, name: str, fold: int | None = None, baseline: bool = False) -> Path:
        """train/test (fold None) or train/validation of a fold."""
        folder = self.root if fold is None else self.root / f"split-{fold}"
        return folder / f"{name}{'_baseline' if baseline else ''}.tsv"

    def folds(self) -> list[int]:
        """Folds that hold a training set (a folder left without one is not a fold)."""
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("split-*")
                      if p.name.split("-")[1].isdigit() and (p / "train.tsv").is_file())

    def set_files(self) -> dict[str, Path]:
        """Every set by name: test, train, then each fold's training and validation sets."""
        files = {"test": self.set_file("test"), "train": self.set_file("train")}
        for fold in self.folds():
            files[f"split-{fold}/train"] = self.set_file("train", fold)
            files[f"split-{fold}/validation"] = self.set_file("validation", fold)
        return files

    def membership(self) -> dict[str, list[list[str]]]:
        """Who is in each set: the test set, then each fold's training and validation sets (the whole training
        set is their union, so it is left out)."""
        return {name: sorted(pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)[KEYS].values.tolist())
                for name, path in self.set_files().items() if name != "train" and path.is_file()}

    def membership_sha256(self) -> str:
        """One hash of every set's exact membership: a model is bound to the draw it was trained on."""
        text = json.dumps(self.membership(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def recorded_membership_sha256(self) -> str:
        """The hash the split stage recorded when it sealed the sets (split.json); computed from the files
        for a split made before it was recorded. Reading it touches no set file: a search never reads test.tsv."""
        recorded = json.loads(self.record.read_text()).get("membership_sha256")
        return recorded or self.membership_sha256()

    def read(self, path: Path, column: str, task: str) -> pd.DataFrame:
        dtypes = {"participant_id": str, "session_id": str, column: str if task == "classification" else float}
        dtypes.update({extra: str for extra in ("sex", ACQ_TIME) if extra != column})
        return pd.read_csv(path, sep="\t", dtype=dtypes, na_values=["n/a"], keep_default_na=False)
