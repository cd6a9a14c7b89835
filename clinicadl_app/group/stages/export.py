"""The export stage: a trained MAPS as one archive to share (OUTPUT_DIR/exports/<experiment>.tar.gz)."""

from __future__ import annotations

from pathlib import Path

from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import UsageError
from clinicadl_app.group.archive import export_maps
from clinicadl_app.group.experiment import experiment_name
from clinicadl_app.group.model_card import write_model_card
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.output import OutputLayout


def run_export(config: Config, maps_dir: Path) -> Path:
    maps = Maps(config.predict.maps_dir or maps_dir / experiment_name(config))
    if not maps.record.is_file():
        raise UsageError(f"{maps.root}: no MAPS to export; train first or give --maps_dir")
    write_model_card(maps, fingerprints=config.export.card_fingerprints)  # the card travels with the weights
    return export_maps(maps, OutputLayout(config.output_dir).export(maps.root.name),
                       config.export.include_participants)
