"""Evaluating selected models on a group and writing ClinicaDL's prediction and metrics files.

Image-level results of part-based models are soft votes whose weights come from validation only: the
group being evaluated never weighs its own parts (except the validation group itself, as in ClinicaDL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from clinicadl_app import __version__
from clinicadl_app.core.atomic import write_text, write_tsv
from clinicadl_app.core.config import Train
from clinicadl_app.core.errors import MissingInputError
from clinicadl_app.group.evaluation import Evaluator
from clinicadl_app.group.runtime import Device
from clinicadl_app.group.tasks import PART, Task
from clinicadl_app.layouts.maps import Maps


@dataclass
class GroupResult:
    images: pd.DataFrame
    image_metrics: dict[str, float]
    parts: pd.DataFrame | None = None
    part_metrics: dict[str, float] | None = None
    weights: dict[int, float] | None = None
    level: str = "image"
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap 95 % intervals of the image-level metrics, resampling participants."""
    models: list[tuple[int | None, int]] = field(default_factory=list)
    """(network, epoch) of each model used."""

    def write(self, maps: Maps, fold: int, metric: str, group: str, note: str = "") -> None:
        write_tsv(maps.prediction(fold, metric, group, "image"), self.images)
        row = dict(self.image_metrics)
        for name, (low, high) in self.intervals.items():
            row[f"{name}_ci95_low"], row[f"{name}_ci95_high"] = low, high
        write_tsv(maps.metrics(fold, metric, group, "image"), pd.DataFrame([row]))
        if self.parts is not None:
            write_tsv(maps.prediction(fold, metric, group, self.level), self.parts)
            write_tsv(maps.metrics(fold, metric, group, self.level), pd.DataFrame([self.part_metrics]))
        lines = [f"clinicadl-app {__version__}", f"date {datetime.now(UTC).isoformat(timespec='seconds')}",
                 f"group {group}", f"fold {fold}", f"selection metric {metric}",
                 f"images {len(self.images)}"]
        lines += [f"model{'' if n is None else f' network-{n}'}: epoch {epoch}" for n, epoch in self.models]
        if self.weights is not None:
            lines.append("soft-voting weights (validation balanced accuracy per part): "
                         + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(self.weights.items())))
        if note:
            lines.append(note)
        write_text(maps.description(fold, metric, group), "\n".join(lines) + "\n")


def evaluate_group(models, task: Task, settings, device: Device, rows: pd.DataFrame, dataset,
                   weights: dict[int, float] | None, write: tuple | None = None) -> GroupResult:
    """`models` is [(network, model, saved state)]; `weights` None means: compute them from this group."""
    evaluator = Evaluator(task, settings.mode, device, settings.batch_size, settings, rows)
    tables, losses = [], []
    for network, model, _ in models:
        subset = dataset
        if network is not None:
            from clinicadl_app.group.data import PartDataset

            subset = PartDataset(dataset.store, dataset.spec, dataset.targets, dataset.normalize, (network,))
        table, loss = evaluator.outputs(model, subset)
        tables.append(table)
        losses.append(loss * len(table))
    parts = pd.concat(tables, ignore_index=True)
    loss = sum(losses) / max(len(parts), 1)
    column = PART[settings.mode]
    info = [(network, int(state.get("epoch", -1))) for network, _, state in models]
    if column:
        parts = parts.sort_values(["participant_id", "session_id", column]).reset_index(drop=True)
        own = task.part_weights(parts, column, settings.selection_threshold)
        used = own if weights is None else weights
        images = task.ensemble(parts, column, used)
        result = GroupResult(images, {"loss": loss, **task.metrics(images)}, parts,
                             {"loss": loss, **task.metrics(parts)}, used, settings.mode, info)
    else:
        result = GroupResult(parts, {"loss": loss, **task.metrics(parts)}, models=info)
    result.intervals = intervals(task, result.images)
    if write:
        result.write(*write)
    return result


def intervals(task: Task, images: pd.DataFrame) -> dict[str, tuple[float, float]]:
    from clinicadl_app.group.metrics import bootstrap

    participants = images.participant_id.to_numpy()  # splits are by subject: so is the resampling
    if task.name == "classification":
        proba = images[[f"proba{i}" for i in range(task.output_size)]].to_numpy()
        return bootstrap(images.true_label.to_numpy(int), proba, "classification", participants)
    if task.name == "regression":
        return bootstrap(images.true_label.to_numpy(float), images.predicted_label.to_numpy(float), "regression",
                         participants)
    return {}


def validation_weights(maps: Maps, fold: int, metric: str, train: Train, task) -> dict[int, float] | None:
    """The soft-vote weights of a part-based model: from its validation results only (None: image mode)."""
    column = PART[train.mode]
    if not column:
        return None
    path = maps.prediction(fold, metric, "validation", train.mode)
    if not path.is_file() and maps.vote_weights(fold, metric).is_file():  # an exported MAPS carries the weights
        return {int(k): float(v) for k, v in json.loads(maps.vote_weights(fold, metric).read_text()).items()}
    if not path.is_file():
        raise MissingInputError(f"{path}: the validation results that weigh the parts are missing; train again")
    parts = pd.read_csv(path, sep="\t")
    return task.part_weights(parts, column, train.selection_threshold)


def _read_metrics(path) -> pd.DataFrame:
    """A group's metrics row; none when the group had no labels (predicted without metrics: an empty file)."""
    try:
        return pd.read_csv(path, sep="\t") if path.is_file() else pd.DataFrame()
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


KEY_METRICS = {"classification": ["BA", "accuracy", "sensitivity", "specificity", "AUC", "MCC", "F1_score"],
               "regression": ["MAE", "RMSE", "R2"], "reconstruction": ["MAE", "RMSE", "PSNR", "SSIM"]}


def metric_tables(maps: Maps, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per split, mean ± sd over splits) of every group's image-level metrics, as text with 95 % intervals:
    what the report and the model card show."""
    rows = []
    for fold in maps.folds():
        for metric in maps.selection_metrics(fold):
            for group in sorted(p.name for p in (maps.fold_dir(fold) / f"best-{metric}").iterdir() if p.is_dir()):
                path = maps.metrics(fold, metric, group, "image")
                frame = _read_metrics(path)
                if frame.empty:
                    continue
                row: dict = {"group": group, "selection": f"best-{metric}", "split": fold}
                for name in (n for n in names if n in frame):
                    value = float(frame[name].iloc[0])
                    low, high = frame.get(f"{name}_ci95_low"), frame.get(f"{name}_ci95_high")
                    row[name] = f"{value:.3f}" + (f" [{float(low.iloc[0]):.2f}, {float(high.iloc[0]):.2f}]"
                                                  if low is not None and high is not None else "")
                    row[f"_{name}"] = value
                rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, frame
    summary = []
    for (group, selection), part in frame.groupby(["group", "selection"], sort=True):
        entry = {"group": group, "selection": selection, "splits": len(part)}
        for name in (n for n in names if f"_{n}" in part):
            values = part[f"_{name}"].astype(float)
            # one split has no spread to show: "± 0.000" would claim that folds agree perfectly
            entry[name] = f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else "")
        summary.append(entry)
    return frame[[c for c in frame.columns if not c.startswith("_")]], pd.DataFrame(summary)
