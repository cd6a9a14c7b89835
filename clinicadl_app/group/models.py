"""Networks from a MAPS record: the one place that builds, loads and opens them (train and search through
fit.py, predict, interpret).

A MAPS records everything needed to rebuild a fold's network (architecture, input size, dropout, task with
its classes or target scaling); models are loaded with weights_only=True and always returned in eval mode.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from clinicadl_app import __version__
from clinicadl_app.core.config import Train
from clinicadl_app.core.errors import InputDataError, MissingInputError, UsageError
from clinicadl_app.group.networks import ArchitectureError, PretrainedWeightsError, RandomSpec, build_network
from clinicadl_app.group.runtime import Device
from clinicadl_app.group.tasks import Classification, Reconstruction, Regression, Task
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.search import SearchFolder

log = logging.getLogger(__name__)


def random_spec(settings: Train) -> RandomSpec | None:
    if settings.architecture != "random":
        return None
    return RandomSpec(**{name: getattr(settings, name) for name in RandomSpec.__dataclass_fields__})


def build_model(settings: Train, in_shape: tuple[int, ...], task: Task, pretrained: bool = False) -> torch.nn.Module:
    """A fresh network for `task`; an architecture that does not fit the input is a usage error.
    `pretrained`: start from [train] pretrained_weights (training only; loading overwrites them anyway)."""
    try:
        return build_network(settings.architecture, in_shape, task.output_size or 1, settings.dropout,
                             autoencoder=task.name == "reconstruction",
                             pretrained_weights=settings.pretrained_weights if pretrained else None,
                             random=random_spec(settings))
    except PretrainedWeightsError as error:
        raise UsageError(str(error)) from None
    except ArchitectureError as error:
        raise UsageError(f"[train] architecture: {error}") from None


def open_maps(path: Path) -> tuple[Maps, dict]:
    maps = Maps(path)
    if not maps.record.is_file():
        raise MissingInputError(f"{maps.root}: not a MAPS (no maps.json); check --maps_dir or train first")
    try:
        record = json.loads(maps.record.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{maps.record}: damaged ({error}); the MAPS cannot be used") from None
    made_by = str(record.get("clinicadl_app_version", ""))
    if made_by.split(".")[:2] != __version__.split(".")[:2]:
        raise UsageError(f"{maps.record}: made by clinicadl-app {made_by or 'unknown'}; this is {__version__}. "
                         f"Use the container image of version {made_by} to predict with it")
    if record.get("preprocessing") != "t1-linear":
        raise UsageError(f"{maps.record}: trained on {record.get('preprocessing')} images; this version "
                         "predicts on t1-linear images only")
    return maps, record


def trained_folds(maps: Maps, asked: tuple[int, ...] = ()) -> list[int]:
    """The folds an inference uses: those asked (--split; all when none), each trained to its end. A fold
    whose training was killed holds the best model so far, which must not pass for a trained one."""
    folds = maps.folds()
    unknown = sorted(set(asked) - set(folds))
    if unknown:
        raise UsageError(f"{maps.root}: no split {', '.join(map(str, unknown))}; this MAPS has "
                         f"{', '.join(f'split-{fold}' for fold in folds) or 'none'}; check --split")
    unfinished = [fold for fold in (asked or folds) if not maps.trained(fold)]
    trial = SearchFolder(maps.root.parent).space.is_file()  # a trial's MAPS lies in its study's folder
    resume = ("a pruned or stopped search trial: choose a complete one (best.json names the best)" if trial
              else f"resume with --stages train --split {' '.join(map(str, unfinished))}")
    if asked and unfinished:
        raise UsageError(f"{maps.root}: training of split-{unfinished[0]} did not finish; {resume}")
    if unfinished and (maps.root, tuple(unfinished)) not in _WARNED:  # once, though predict and interpret ask
        _WARNED.add((maps.root, tuple(unfinished)))
        log.warning("%s: training of %s did not finish: left out (%s)", maps.root,
                    ", ".join(f"split-{fold}" for fold in unfinished), resume)
    chosen = [fold for fold in (asked or folds) if fold not in unfinished]
    if not chosen:
        raise UsageError(f"{maps.root}: no split finished training; "
                         + (resume if trial else "train first (--stages train)"))
    return chosen


_WARNED: set[tuple[Path, tuple[int, ...]]] = set()


def task_record(task: Task) -> dict:
    """What predict needs to rebuild a fold's task (classes, target scaling)."""
    return {"name": task.name, "loss": task.loss_name, **{k: getattr(task, k) for k in ("classes", "mean", "std")
                                                           if hasattr(task, k)}}


def task_from_record(record: dict) -> Task:
    if record["name"] == "classification":
        return Classification(record["classes"], record["loss"])
    if record["name"] == "regression":
        return Regression(record["loss"], record["mean"], record["std"])
    return Reconstruction(record["loss"])


def load_selected(maps: Maps, fold: int, metric: str, settings: Train, in_shape: tuple[int, ...], task: Task,
                  device: Device) -> list[tuple[int | None, torch.nn.Module, dict]]:
    """The selected model(s) of a fold: [(network, model, saved state)], loaded with weights_only=True."""
    models = []
    for network in maps.networks(fold, metric):
        path = maps.model(fold, metric, network)
        model = build_model(settings, in_shape, task)
        try:
            state = torch.load(path, map_location=device.device, weights_only=True)
            model.load_state_dict(state["model"])
        except FileNotFoundError:
            raise InputDataError(f"{path}: model missing; train this fold again") from None
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise InputDataError(f"{path}: not a readable model ({type(error).__name__}: {error}); "
                                 "train this fold again") from None
        model.eval()  # inference only: dropout off, BatchNorm statistics frozen
        models.append((network, model.to(device.device), state))
    return models


def same_weights(first: list[tuple[int | None, torch.nn.Module, dict]],
                 second: list[tuple[int | None, torch.nn.Module, dict]]) -> bool:
    """Whether two selections (load_selected) are the same networks with equal weights, not merely the same
    epoch numbers: several metrics often select the same epoch, whose outputs need computing once."""
    if [network for network, _, _ in first] != [network for network, _, _ in second]:
        return False
    for (_, _, a), (_, _, b) in zip(first, second, strict=True):
        if a["model"].keys() != b["model"].keys():
            return False
        if not all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"]):
            return False
    return True
