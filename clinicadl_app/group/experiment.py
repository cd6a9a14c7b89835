"""What a configuration means for an experiment: its MAPS name, task, classes and the rows it uses."""

from __future__ import annotations

import pandas as pd

from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import UsageError
from clinicadl_app.group.label_table import parse_subgroups
from clinicadl_app.group.metrics import names as metric_names
from clinicadl_app.group.tasks import Task


def experiment_name(config: Config) -> str:
    train = config.train
    return train.experiment or f"{config.labels.folder}_{train.mode}_{train.architecture.replace(':', '-')}"


def network_task(config: Config) -> str:
    return config.train.network_task or config.labels.task


def class_mapping(config: Config) -> dict[str, str]:
    """Label in labels.tsv -> class trained on (children stand for their parent when the parent is asked)."""
    parents = parse_subgroups(config.labels.subgroups)
    wanted = config.train.classes or config.labels.values
    if not wanted:
        return {}
    mapping = {}
    for label in set(parents) | set(parents.values()) | set(wanted):
        if label in wanted:
            mapping[label] = label
        elif parents.get(label) in wanted:
            mapping[label] = parents[label]
    return mapping


def select_rows(rows: pd.DataFrame, config: Config) -> pd.DataFrame:
    column = config.labels.column
    if network_task(config) != "classification":
        return rows.reset_index(drop=True)
    mapping = class_mapping(config)
    if not mapping:
        return rows.reset_index(drop=True)
    kept = rows[rows[column].astype(str).isin(mapping)].copy()
    kept[column] = kept[column].astype(str).map(mapping)
    return kept.reset_index(drop=True)


def selection_metrics(config: Config, task: Task) -> tuple[str, ...]:
    return config.train.selection_metrics or task.default_selection()


def check_task_settings(config: Config) -> None:
    """A metric the task does not compute would select no model, and a classifier of a regression label would
    take each number for a class: refused before anything is trained, not found out by a later stage."""
    task = network_task(config)
    if task == "classification" and config.labels.task == "regression":
        raise UsageError(f"[train] network_task classification: column '{config.labels.column}' is a regression "
                         "label, each of whose numbers would be a class; train a regression network, or label "
                         "classes ([labels] task classification)")
    unknown = [metric for metric in config.train.selection_metrics if metric not in metric_names(task)]
    if unknown:
        raise UsageError(f"[train] selection_metrics {', '.join(unknown)}: not a validation metric of {task}; use "
                         "some of " + ", ".join(sorted(metric_names(task))))
