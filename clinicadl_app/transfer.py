"""Transfer learning from another MAPS, refused when the source saw any of our test subjects.

Supported: autoencoder -> CNN (the encoder initialises the convolutions), CNN -> CNN, CNN -> autoencoder,
single -> multi-network (every network starts from the source) and multi -> multi (network by network).
The source's training and validation sessions join our groups/train+validation.tsv, so later leakage
checks know about them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .config import Train
from .errors import LeakageError, MissingInputError, UsageError
from .maps import Maps

log = logging.getLogger(__name__)


@dataclass
class Transfer:
    source: Maps
    record: dict
    seen: pd.DataFrame
    metric: str

    @classmethod
    def open(cls, settings: Train, test: pd.DataFrame, own: Path) -> Transfer:
        source = Maps(Path(settings.transfer_path))
        if source.root.resolve() == own.resolve():
            raise UsageError(f"{source.root}: a MAPS cannot be its own transfer source")
        if not source.record.is_file() or not source.seen.is_file():
            raise MissingInputError(f"{source.root}: not a MAPS (no maps.json or groups/train+validation.tsv); "
                                    "check [train] transfer_path")
        record = json.loads(source.record.read_text())
        seen = pd.read_csv(source.seen, sep="\t", dtype=str, keep_default_na=False)
        overlap = sorted(set(seen.participant_id) & set(test.participant_id))
        if overlap:
            shown = ", ".join(overlap[:10]) + (f" and {len(overlap) - 10} more" if len(overlap) > 10 else "")
            raise LeakageError(
                f"{source.seen}: the transfer source was trained or validated on {len(overlap)} of our test "
                f"subjects ({shown}); its weights would leak them into this model (biased transfer learning). "
                "Use a source trained without them, or a split whose test set excludes them"
            )
        return cls(source, record, seen, settings.transfer_selection_metric)

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

    def initialise(self, model: nn.Module, fold: int, network: int | None) -> None:
        folds = self.source.folds()
        source_fold = fold if fold in folds else folds[0]
        networks = self.source.networks(source_fold, self.metric)
        source_network = network if network in networks else networks[0]
        path = self.source.model(source_fold, self.metric, source_network)
        if not path.exists():
            raise MissingInputError(f"{path}: no such model in the transfer source; "
                                    "check [train] transfer_selection_metric")
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        copied = load_matching(model, state)
        log.info("transfer: %d tensors from %s", copied, path)


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
