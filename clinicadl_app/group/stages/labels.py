"""The labels stage: every session's label from participants.tsv or sessions.tsv, and who is left out and why.

Once a split is sealed (split.json exists), labels that would change its sessions are refused.
"""

from __future__ import annotations

import logging

import pandas as pd

from clinicadl_app.core.atomic import write_tsv
from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import UsageError
from clinicadl_app.group.label_table import Chosen, build_labels
from clinicadl_app.layouts.caps import KEYS, Caps
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")


def run_labels(config: Config, folder: SplitFolder) -> None:
    table = build_labels(config.bids_dir, Caps(config.caps_dir), config.labels, chosen=Chosen.of(config.execution))
    _refuse_if_sealed(folder, folder.labels, table.rows, config)
    write_tsv(folder.labels, table.rows)
    write_tsv(folder.dropped, table.dropped)
    values = table.rows[table.column]
    counts = (", ".join(f"{k} {v}" for k, v in table.rows.groupby(table.column).size().items())
              if table.task == "classification" else f"{table.column} {values.min():g} to {values.max():g}, "
              f"mean {values.mean():.4g}")
    log.info("labels: %d sessions of %d participants kept (%s); %d dropped (see %s)",
             len(table.rows), table.rows.participant_id.nunique(), counts, len(table.dropped), folder.dropped)
    for reason, group in table.dropped.groupby("reason"):
        log.info("  dropped %d: %s", len(group), reason)


def _refuse_if_sealed(folder: SplitFolder, path, rows: pd.DataFrame, config: Config) -> None:
    if not folder.record.is_file() or not path.is_file() or config.execution.overwrite:
        return
    previous = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    current = rows.astype(str).replace({"nan": "n/a", "<NA>": "n/a", "None": "n/a"})
    if previous[KEYS].values.tolist() != current[KEYS].values.tolist():
        raise UsageError(
            f"{path}: the split in {folder.root} was drawn from other labels; a new draw could leak training "
            "subjects into the test set. Use another [labels] name, or --overwrite if no model used this split"
        )
