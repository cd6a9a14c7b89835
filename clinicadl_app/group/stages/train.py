"""The train stage: the experiment's MAPS (OUTPUT_DIR/maps/<experiment>) trained from the sealed split."""

from __future__ import annotations

from pathlib import Path

from clinicadl_app.core.config import Config
from clinicadl_app.core.distributed import World
from clinicadl_app.core.errors import UsageError
from clinicadl_app.group.experiment import experiment_name
from clinicadl_app.group.fit import train_maps
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.splits import SplitFolder


def run_training(config: Config, splits_dir: Path, maps_dir: Path, world: World | None = None) -> Maps:
    folder = SplitFolder(splits_dir / config.labels.folder)
    if not folder.record.is_file():
        raise UsageError(f"{folder.root}: no split yet; run the labels and split stages first")
    return train_maps(config, folder, Maps(maps_dir / experiment_name(config)), world=world)
