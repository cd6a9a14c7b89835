"""A hyperparameter space written in the [search] table, sampled through an Optuna trial.

Each entry names a [train] or [extraction] setting and one of ClinicaDL's samplers:
  learning_rate = {exponent = [3, 5]}                 10^-x with x uniform in [3, 5] (log-uniform 1e-5..1e-3)
  dropout = {uniform = [0.0, 0.5]}
  batch_size = {choice = [4, 8]}                      any of the values
  n_convblocks = {randint = [2, 4]}                   an integer, both ends included
The split, the labels and how to run are never sampled: every trial must be compared on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from clinicadl_app.core.config import Config, Extraction, Train
from clinicadl_app.core.config_file import coerce
from clinicadl_app.core.errors import UsageError

SAMPLERS = ("choice", "uniform", "exponent", "randint")
SEARCHABLE: dict[str, type] = {"train": Train, "extraction": Extraction}
FIXED = {"experiment", "folds", "transfer_path", "selection_metrics", "gpu", "num_workers", "modes"}


@dataclass(frozen=True)
class Dimension:
    section: str
    name: str
    sampler: str
    values: tuple[Any, ...]

    def suggest(self, trial: Any) -> Any:
        """The value of this setting for an Optuna trial (a trial enqueued again gets its old value back)."""
        if self.sampler == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        low, high = self.values
        if self.sampler == "uniform":
            return trial.suggest_float(self.name, low, high)
        if self.sampler == "exponent":
            return trial.suggest_float(self.name, 10.0 ** -high, 10.0 ** -low, log=True)
        return trial.suggest_int(self.name, low, high)


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    """Every entry checked now: a bad one is one line naming the key and the fix (exit 64)."""
    if not space:
        raise UsageError("[search] holds no space: add entries such as learning_rate = {exponent = [3, 5]}")
    dimensions = []
    for key, spec in space.items():
        section = _owner(key)
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise UsageError(f"[search] {key}: write one sampler as {key} = {{choice = [...]}}; samplers: "
                             + ", ".join(SAMPLERS))
        sampler, values = next(iter(spec.items()))
        values = tuple(values) if isinstance(values, list) else (values,)
        if sampler == "choice":
            if not values:
                raise UsageError(f"[search] {key}: an empty choice; give at least one value")
            values = tuple(_checked(section, key, value) for value in values)
        else:
            if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise UsageError(f"[search] {key}: {sampler} takes two numbers [low, high]")
            if not values[0] < values[1] and not (sampler == "randint" and values[0] == values[1]):
                raise UsageError(f"[search] {key}: the range [{values[0]}, {values[1]}] is empty; give low < high")
            if sampler == "randint" and not all(float(v).is_integer() for v in values):
                raise UsageError(f"[search] {key}: randint takes two integers")
            if sampler == "randint":
                values = tuple(int(v) for v in values)
            for value in (values if sampler != "exponent" else (10.0 ** -values[0],)):
                _checked(section, key, value)
        dimensions.append(Dimension(section, key, sampler, values))
    return dimensions


def apply(config: Config, values: dict[str, Any], dimensions: list[Dimension]) -> Config:
    """The base configuration with a trial's values; ValueError when the combination is invalid."""
    by_section: dict[str, dict[str, Any]] = {}
    for dimension in dimensions:
        value = coerce(SEARCHABLE[dimension.section], dimension.name, values[dimension.name])
        by_section.setdefault(dimension.section, {})[dimension.name] = value
    return replace(config, **{name: replace(getattr(config, name), **changes) for name, changes in by_section.items()})


def _owner(key: str) -> str:
    owners = [name for name, cls in SEARCHABLE.items() if key in {f.name for f in fields(cls)}]
    if not owners:
        raise UsageError(f"[search] {key}: no [train] or [extraction] setting has this name; check the spelling "
                         "(the split, labels and execution settings are the same for every trial)")
    if key in FIXED:
        raise UsageError(f"[search] {key}: this setting is fixed for a search (set it in [train]); remove it from "
                         "[search]")
    return owners[0]


def _checked(section: str, key: str, value: Any) -> Any:
    try:
        return coerce(SEARCHABLE[section], key, value)
    except ValueError as error:
        raise UsageError(f"[search] {key}: {error}") from None
