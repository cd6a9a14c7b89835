"""The search stage: an Optuna study whose trials each train a full MAPS on the sealed split's folds.

Many jobs may run the same command at once (a SLURM array, or `&` on one machine): they join one study
through its journal file (a database URL for larger farms), Optuna hands each a distinct trial number, and
each trial samples with a seed made of the search seed and its number, so the same seed and space give the
same trials whichever job draws them. The objective is a validation metric averaged over the folds
trained; the test set is never read. A job killed mid-trial leaves its trial running with its lock
released by the kernel: the next job marks it failed and enqueues its parameters again, whatever the storage
(Optuna's heartbeat only beats inside Study.optimize, and jobs here ask and tell).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import tomli_w

from clinicadl_app.core.atomic import lock, write_json, write_text, write_tsv
from clinicadl_app.core.config import Config, plain
from clinicadl_app.core.errors import AppError, UsageError
from clinicadl_app.group.experiment import check_task_settings, network_task
from clinicadl_app.group.fit import train_maps
from clinicadl_app.group.metrics import LOWER_IS_BETTER
from clinicadl_app.group.metrics import names as metric_names
from clinicadl_app.group.search_report import write_search_report
from clinicadl_app.group.search_space import Dimension, apply, parse_space
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.search import SearchFolder
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")
optuna.logging.set_verbosity(optuna.logging.WARNING)
RETRIED = "retried_from"


def run_search(config: Config, splits_dir: Path, search_dir: Path) -> SearchFolder:
    settings = config.search
    dimensions = parse_space(settings.space)  # a bad space or objective fails before anything is read
    task = network_task(config)
    objective = settings.objective or ("BA" if task == "classification" else "loss")
    if objective not in metric_names(task):
        raise UsageError(f"[search] objective {objective}: not a validation metric of {task}; use one of "
                         + ", ".join(sorted(metric_names(task))))
    check_task_settings(config)
    folder = SplitFolder(splits_dir / config.labels.folder)
    if not folder.record.is_file():
        raise UsageError(f"{folder.root}: no split yet; run the labels and split stages first")
    search = SearchFolder(search_dir / (settings.study or config.labels.folder))
    search.root.mkdir(parents=True, exist_ok=True)
    _check_space(search, config, objective, folder)
    study = _study(search, config, objective)
    _retry_orphans(study, search)
    for _ in range(settings.n_trials):
        _run_trial(study, search, config, folder, dimensions, objective)
        _write_tables(study, search, objective)
    return search


def _check_space(search: SearchFolder, config: Config, objective: str, folder: SplitFolder) -> None:
    """A study is one space on one base configuration and one draw of the split: a job with another is
    refused, not mixed in (trials compared on other validation sets, or a split redrawn with --overwrite)."""
    base = {name: plain(getattr(config, name), keep_none=False) for name in ("labels", "split", "train", "extraction")}
    for name in ("gpu", "num_workers"):  # how a job runs, not what it trains: jobs may differ
        base["train"].pop(name)
    record = {"objective": objective, "space": config.search.space, "base": base,
              "split_membership_sha256": folder.recorded_membership_sha256()}
    text = tomli_w.dumps(record)
    if search.space.is_file():
        if search.space.read_text() != text:
            raise UsageError(f"{search.space}: this search was started with another space, base configuration or "
                             "draw of the split; give another [search] study, or the same configuration and split")
        return
    write_text(search.space, text)


def _study(search: SearchFolder, config: Config, objective: str) -> optuna.Study:
    settings = config.search
    if settings.storage:
        storage = optuna.storages.RDBStorage(settings.storage)
    else:
        backend = optuna.storages.journal.JournalFileBackend(
            str(search.journal), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(search.journal)))
        storage = optuna.storages.JournalStorage(backend)
    pruner = optuna.pruners.MedianPruner() if settings.pruning else optuna.pruners.NopPruner()
    direction = "minimize" if objective in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(study_name=search.root.name, storage=storage, direction=direction, pruner=pruner,
                                load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UsageError(f"{search.root}: this study was created to {study.direction.name.lower()} its objective; "
                         f"[search] objective {objective} needs {direction}")
    return study


def _sampler(config: Config, number: int) -> optuna.samplers.BaseSampler:
    seed = config.search.seed * 1_000_003 + number
    return optuna.samplers.TPESampler(seed=seed) if config.search.sampler == "tpe" \
        else optuna.samplers.RandomSampler(seed=seed)


@contextmanager
def _holding(path: Path) -> Iterator[None]:
    """An exclusive lock for as long as the trial runs; the kernel releases it when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _alive(trial: optuna.trial.FrozenTrial, path: Path) -> bool:
    """Whether a running trial's job still runs: it holds the lock. A job that has just asked for a trial
    may not have taken its lock yet, so a trial without a lock file is alive for its first minutes."""
    if not path.exists():
        started = trial.datetime_start
        return started is None or (datetime.now() - started).total_seconds() < 300
    handle = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)
    return False


def _retry_orphans(study: optuna.Study, search: SearchFolder) -> None:
    """Trials left running by a job that died: failed, and their parameters enqueued again (once each)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _alive(trial, search.running(trial.number)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):  # another job got there first
            continue
        log.warning("search: trial %d was left running by a job that stopped; marked failed and queued again",
                    trial.number)
        study.enqueue_trial(trial.params, user_attrs={RETRIED: trial.number})


def _run_trial(study: optuna.Study, search: SearchFolder, config: Config, folder: SplitFolder,
               dimensions: list[Dimension], objective: str) -> None:
    trial = study.ask()
    study.sampler = _sampler(config, trial.number)  # sampling happens at suggest time: seeded by the trial
    with _holding(search.running(trial.number)):
        values = {dimension.name: dimension.suggest(trial) for dimension in dimensions}
        start = time.monotonic()
        try:
            trial_config = apply(config, values, dimensions)
            selection = tuple(dict.fromkeys((*trial_config.train.selection_metrics, objective)))
            trial_config = replace(trial_config, train=replace(trial_config.train, experiment=f"trial-{trial.number}",
                                                               selection_metrics=selection))
        except ValueError as error:
            return _fail(study, trial, f"invalid combination: {error}")
        log.info("search: trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in values.items()))
        reports: list[float] = []

        def report(metrics: dict[str, float]) -> None:
            value = metrics.get(objective)
            if value is None:
                return
            trial.report(value, len(reports))
            reports.append(value)
            if trial.should_prune():
                raise optuna.TrialPruned()

        maps = Maps(search.trial(trial.number))
        try:
            train_maps(trial_config, folder, maps, report=report)
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            _drop_weights(maps)
            log.info("search: trial %d pruned (its training log kept, its weights removed)", trial.number)
            return None
        except AppError as error:  # e.g. an architecture that does not fit this input: this trial only
            return _fail(study, trial, error.message)
        per_fold = {fold: _objective(maps, fold, objective) for fold in maps.folds()}
        mean = sum(per_fold.values()) / len(per_fold)
        trial.set_user_attr("objective_per_fold", {str(k): v for k, v in per_fold.items()})
        trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        trial.set_user_attr("maps", str(maps.root.relative_to(search.root)))
        _record_trial(maps, search, trial.number, objective, mean, values)
        study.tell(trial, mean)
        log.info("search: trial %d: validation %s %.4f (mean of %d fold(s))", trial.number, objective, mean,
                 len(per_fold))
    return None


def _record_trial(maps: Maps, search: SearchFolder, number: int, objective: str, value: float,
                  values: dict) -> None:
    """The trial MAPS says where it comes from: a model chosen from a search is chosen on validation data."""
    with lock(maps.record):
        record = json.loads(maps.record.read_text())
        record["search"] = {"study": search.root.name, "trial": number, "params": values,
                            f"validation_{objective}": value,
                            "note": "one trial of a search; if it is selected as the best (best.json), its validation "
                                    "score is optimistic: its test-set prediction is the honest estimate"}
        write_json(maps.record, record)


def _drop_weights(maps: Maps) -> None:
    """A pruned trial is never resumed or predicted: its checkpoint (the weights and the optimiser's moments) and
    best-so-far models would only fill the disk, ~0.8 GB a trial of Conv5_FC3 at 1 mm. Its curve stays."""
    for fold in maps.folds():
        shutil.rmtree(maps.tmp_dir(fold), ignore_errors=True)
        for metric in maps.selection_metrics(fold):
            shutil.rmtree(maps.fold_dir(fold) / f"best-{metric}", ignore_errors=True)


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("failure", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    log.warning("search: trial %d failed: %s", trial.number, reason)


def _objective(maps: Maps, fold: int, objective: str) -> float:
    table = pd.read_csv(maps.metrics(fold, objective, "validation", "image"), sep="\t")
    if objective not in table:
        raise UsageError(f"[search] objective {objective}: not a validation metric of this task; use one of "
                         + ", ".join(c for c in table.columns if c not in ("split", "selection")))
    return float(table[objective].iloc[0])


def _write_tables(study: optuna.Study, search: SearchFolder, objective: str) -> None:
    """Under a lock, so the last job to write has read the study after every job's last result."""
    with lock(search.trials):
        _write_tables_now(study, search, objective)


def _write_tables_now(study: optuna.Study, search: SearchFolder, objective: str) -> None:
    trials = study.get_trials(deepcopy=False)
    rows = []
    for trial in trials:
        row = {"number": trial.number, "state": trial.state.name}
        row |= {f"param_{k}": v for k, v in trial.params.items()}
        row |= {f"{objective}_split-{k}": v for k, v in trial.user_attrs.get("objective_per_fold", {}).items()}
        row |= {f"{objective}_mean": trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
                "seconds": trial.user_attrs.get("seconds"), "maps": trial.user_attrs.get("maps", ""),
                "retried_from": trial.user_attrs.get(RETRIED, ""), "failure": trial.user_attrs.get("failure", "")}
        rows.append(row)
    write_tsv(search.trials, pd.DataFrame(rows))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        write_json(search.best, {
            "trial": best.number, "maps": best.user_attrs.get("maps"), "objective": objective,
            f"validation_{objective}": best.value, "params": best.params, "complete_trials": len(complete),
            "note": f"selected among {len(complete)} complete trials on the validation folds: its validation "
                    f"{objective} is optimistic. Predict on the test set with this MAPS for the honest estimate."})
    write_search_report(study, search, objective)

