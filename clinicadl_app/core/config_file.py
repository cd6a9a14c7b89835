"""Settings from their sources: defaults < TOML file < command line, each value coerced to its field's type.

The same coercion rebuilds a section from what a MAPS recorded (maps.json), so a record is read back with
the types it was written from.
"""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import MissingInputError, UsageError


def build_config(
    bids_dir: Path,
    output_dir: Path,
    analysis_level: str,
    cli_values: dict[str, dict[str, Any]],
    config_file: Path | None = None,
    recorded: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Merge defaults < config file (or the settings a MAPS `recorded`, for --reproduce) < command line into a
    validated Config (UsageError otherwise)."""
    file_values = read_config_file(config_file) if config_file else recorded or {}
    sections = {}
    for name, cls in Config.SECTIONS.items():
        merged = {**file_values.get(name, {}), **cli_values.get(name, {})}
        try:
            sections[name] = cls(**{key: coerce(cls, key, value) for key, value in merged.items()})
        except (ValueError, TypeError) as error:
            raise UsageError(f"[{name}] {error}") from None
    return Config(bids_dir=bids_dir, output_dir=output_dir, analysis_level=analysis_level, **sections)


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a TOML configuration; relative paths in it are taken relative to the file's folder."""
    if not path.is_file():
        raise MissingInputError(f"{path}: configuration file not found; check the --config path")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not valid TOML ({error}); fix the file or remove --config") from None
    data.pop("run", None)  # the record of a previous run: positional arguments are given again
    known = Config.SECTIONS
    out: dict[str, dict[str, Any]] = {}
    for table, values in data.items():
        if table not in known or not isinstance(values, dict):
            raise UsageError(f"{path}: unknown table [{table}]; known tables: {', '.join(known)}")
        names = {f.name for f in fields(known[table])}
        if table == "search":  # its tables are the space, {name = {sampler = values}}; a saved record has space = {...}
            entries = {k: v for k, v in values.items() if isinstance(v, dict) and k != "space"}
            values = {k: v for k, v in values.items() if not isinstance(v, dict)} | {
                "space": {**values.get("space", {}), **entries}}
        for key in values:
            if key not in names:
                raise UsageError(f"{path}: unknown key '{key}' in [{table}]; known keys: {', '.join(sorted(names))}")
        out[table] = {key: _relative_to(path.parent, known[table], key, value) for key, value in values.items()}
    return out


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's declared type, naming the field on failure."""
    if name not in {f.name for f in fields(cls)}:
        raise ValueError(f"unknown setting '{name}'")
    return _coerce(field_types(cls)[name], value, name)


def section_from(cls: type, values: dict[str, Any]) -> Any:
    """A settings dataclass rebuilt from its recorded values (maps.json), each coerced to its field's type."""
    return cls(**{k: coerce(cls, k, v) for k, v in values.items()})


def _coerce(kind: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a table, not {value!r}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(args[0], item, name) for item in items)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    if kind is Path:
        return Path(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise ValueError(f"{name} must be a number ({kind.__name__}), not {value!r}")
        return kind(value)
    if kind is str:
        return str(value)
    return value


def _relative_to(folder: Path, cls: type, key: str, value: Any) -> Any:
    kind = field_types(cls).get(key)
    if kind is None:
        return value
    if Path in _leaf_types(kind):
        if isinstance(value, list):
            return [str(folder / v) for v in value]
        if isinstance(value, str):
            return str(folder / value)
    return value


def _leaf_types(kind: Any) -> set[Any]:
    args = typing.get_args(kind)
    return {kind} if not args else set().union(*(_leaf_types(a) for a in args))
