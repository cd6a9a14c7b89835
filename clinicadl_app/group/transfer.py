"""Transfer learning from another MAPS, refused when the source saw data that must stay unseen.

Supported: autoencoder -> CNN (the encoder initialises the convolutions), CNN -> CNN, CNN -> autoencoder,
single -> multi-network (every network starts from the source) and multi -> multi (network by network).
Refused (leakage.py's rule, by label and by content): a source that trained or selected on any of our test
subjects, or whose model for a fold was trained on that fold's validation subjects (its weights would bias
model selection). The source's training and validation sessions join our groups/train+validation.tsv, so
later leakage checks know about them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from clinicadl_app.core.config import Train
from clinicadl_app.core.errors import LeakageError, MissingInputError, UsageError
from clinicadl_app.group.leakage import Seen, overlap, same_place
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.maps import Maps

log = logging.getLogger(__name__)


@dataclass
class Transfer:
    source: Maps
    record: dict
    seen: Seen
    metric: str

    @classmethod
    def open(cls, settings: Train, own: Path) -> Transfer:
        source = Maps(Path(settings.transfer_path))
        if source.root.resolve() == own.resolve():
            raise UsageError(f"{source.root}: a MAPS cannot be its own transfer source")
        if not source.record.is_file() or not source.seen.is_file():
            raise MissingInputError(f"{source.root}: not a MAPS (no maps.json or groups/train+validation.tsv); "
                                    "check [train] transfer_path")
        record = json.loads(source.record.read_text())
        return cls(source, record, Seen.load(source.seen, source.seen_signatures), settings.transfer_selection_metric)

    def source_fold(self, fold: int) -> int:
        folds = self.source.folds()
        return fold if fold in folds else folds[0]

    def check_leakage(self, caps: Caps, bids_dir: Path, test: pd.DataFrame,
                      validations: dict[int, pd.DataFrame]) -> None:
        """Before the first epoch: our test set against all the source saw, each fold's validation set against
        what the source model used for that fold was trained on."""
        same = any(same_place(place, mine) for place in self.source.trained_on(self.record)
                   for mine in (caps.root, bids_dir))
        problems = []
        found = overlap(caps, test, self.seen, same)
        if found:
            problems.append("our test set: " + "; ".join(found.labels + found.content))
        for fold, validation in validations.items():
            found = overlap(caps, validation, self.fitted_for(self.source_fold(fold)), same)
            if found:
                problems.append(f"the validation set of fold {fold} (its source model, split-{self.source_fold(fold)}, "
                                "was trained on it): " + "; ".join(found.labels + found.content))
        if problems:
            raise LeakageError(
                f"{self.source.seen}: the transfer source saw data this model must not see, in "
                + " | ".join(problems) + ". Its weights would leak them into this model (biased transfer learning). "
                "Use a source trained without them (e.g. on the same split, fold by fold), or another split")

    def fitted_for(self, fold: int) -> Seen:
        """What the source's model for `fold` was fitted on: that fold's training sessions and what its own
        transfer source's model was fitted on (recorded by the source as groups/train/split-N/fitted_on.tsv)."""
        recorded = self.source.fitted_on(fold)
        if recorded.is_file():
            return self.seen.restrict(_among(self.seen.rows, pd.read_csv(recorded, sep="\t", dtype=str)))
        # a MAPS from 0.1.0 records only its own training rows by fold: all its sources saw counts as fitted
        data = self.source.group_data("train", fold)
        if not data.is_file():
            return self.seen
        own = self.seen.rows.get("maps", pd.Series("", index=self.seen.rows.index)) == self.source.root.name
        return self.seen.restrict(~own | _among(self.seen.rows, pd.read_csv(data, sep="\t", dtype=str)))

    def check_compatible(self, ours: dict) -> None:
        both_classify = ours["task"] == "classification" and self.record.get("task") == "classification"
        if both_classify and self.record.get("label_code") != ours["label_code"]:
            raise UsageError(
                f"{self.source.record}: label code {self.record.get('label_code')} differs from ours "
                f"{ours['label_code']}; transfer between classifiers needs the same classes"
            )
        if list(self.record.get("input_size", [])) != list(ours["input_size"]):
            raise UsageError(f"{self.source.record}: input size {self.record.get('input_size')} differs from ours "
                             f"{ours['input_size']}; use a source trained on the same mode and extraction")

    def model_path(self, fold: int, network: int | None) -> Path:
        """The source model that starts our `fold` (and part network); checked for every fold before any
        record is written, so a wrong metric leaves nothing to clean up."""
        source_fold = self.source_fold(fold)
        if not self.source.trained(source_fold):  # its best model so far is not the one it would select
            raise UsageError(f"{self.source.fold_dir(source_fold)}: the transfer source's training of this split did "
                             f"not finish; resume it there (--stages train --split {source_fold})")
        networks = self.source.networks(source_fold, self.metric)
        path = self.source.model(source_fold, self.metric, network if network in networks else networks[0])
        if not path.exists():
            raise MissingInputError(f"{path}: no such model in the transfer source (its selection metrics: "
                                    f"{', '.join(self.source.selection_metrics(source_fold))}); check [train] "
                                    "transfer_selection_metric")
        return path

    def initialise(self, model: nn.Module, fold: int, network: int | None) -> None:
        path = self.model_path(fold, network)
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        copied = load_matching(model, state)
        log.info("transfer: %d tensors from %s", copied, path)


def _among(rows: pd.DataFrame, wanted: pd.DataFrame) -> pd.Series:
    keys = set(map(tuple, wanted[KEYS].values.tolist()))
    return pd.Series([key in keys for key in map(tuple, rows[KEYS].values.tolist())], index=rows.index)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy every tensor whose name (after encoder <-> convolutions renaming) and shape match."""
    own = model.state_dict()
    renamed = {}
    for key, value in state.items():
        candidates = (key, key.replace("encoder.", "convolutions.", 1), key.replace("convolutions.", "encoder.", 1))
        for candidate in candidates:
            if candidate in own and own[candidate].shape == value.shape:
                renamed[candidate] = value
                break
    if not renamed:
        raise UsageError("the transfer source's weights match no layer of this architecture")
    model.load_state_dict(renamed, strict=False)
    return len(renamed)
