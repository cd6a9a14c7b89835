"""The BIDS App command line: arguments -> Config -> a level's run; user errors -> one line and an exit code.

`build_parser()` only describes the command line (one option per field of the config sections, in
snake_case and kebab-case); `parse_args()` returns a validated Config and does every cross-check.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import tempfile
import types
import typing
from dataclasses import Field, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import argparse_dataclass

from clinicadl_app import __version__
from clinicadl_app.core.atomic import check_writable
from clinicadl_app.core.config import Config
from clinicadl_app.core.config_file import build_config, field_types
from clinicadl_app.core.errors import AppError, ExitCode, MissingInputError, OutputError, UnknownLevelError, UsageError
from clinicadl_app.core.logs import log_to_console

LEVELS = ("participant", "group")
log = logging.getLogger("clinicadl_app")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clinicadl-app",
        description="Deep learning on brain MRI, from a BIDS dataset to trained and evaluated networks.",
        allow_abbrev=False,
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the CAPS, reports and results are written")
    parser.add_argument("analysis_level", metavar="{participant,group}", help="which level to run")
    parser.add_argument("-v", "--version", action="version", version=f"clinicadl-app {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML file with one table per section below; the command line wins over it",
    )
    shared = _shared_names()
    for section, cls in Config.SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the whole first paragraph
        group = parser.add_argument_group(f"[{section}]", doc)
        for setting in fields(cls):
            if not setting.metadata.get("toml_only"):
                _add_option(group, section, setting, field_types(cls)[setting.name], shared)
    return parser


def option_name(section: str, name: str) -> str:
    """The command-line spelling of a setting: its name, or section_name when several sections share it."""
    return f"--{section}_{name}" if name in _shared_names() else f"--{name}"


def _shared_names() -> set[str]:
    seen: dict[str, int] = {}
    for cls in Config.SECTIONS.values():
        for f in fields(cls):
            seen[f.name] = seen.get(f.name, 0) + 1
    return {name for name, count in seen.items() if count > 1}


_SEP = "__"  # dest of an option: <section>__<setting>


def _add_option(group: Any, section: str, setting: Field, kind: Any, shared: set[str]) -> None:
    """argparse-dataclass adds the option from a one-field dataclass in the form it reads (resolved type, the
    section-qualified dest as field name, its metadata keys); booleans are ours, as --name/--no-name pairs,
    which it cannot make. Absent options never reach the namespace (MISSING, SUPPRESS): the TOML file and
    the defaults fill them in build_config."""
    kind = _strip_optional(kind)
    dest = f"{section}{_SEP}{setting.name}"
    if kind is bool:
        group.add_argument(*_flags(section, setting, shared), action=argparse.BooleanOptionalAction, dest=dest,
                           default=argparse.SUPPRESS, help=_help(setting))
        return
    meta: dict[str, Any] = {"args": _flags(section, setting, shared), "help": _help(setting)}
    literal = typing.get_origin(kind) is Literal
    if typing.get_origin(kind) is tuple:
        kind, meta["nargs"] = typing.get_args(kind)[0], "+"
        literal = typing.get_origin(kind) is Literal
        if literal:  # argparse-dataclass reads Literal choices only from the field's own type
            meta["choices"] = typing.get_args(kind)
            kind = type(meta["choices"][0])
        meta["type"] = kind
    if not literal:
        meta["metavar"] = setting.metadata.get("metavar") or meta["args"][0][2:].upper()
    one = make_dataclass(f"{section}_{setting.name}", [(dest, kind, field(default=None, metadata=meta))])
    argparse_dataclass._add_dataclass_options(one, group)


def _flags(section: str, setting: Field, shared: set[str]) -> list[str]:
    """--name, --kebab-name, and the setting's aliases; --section_name where sections share the name."""
    flag = f"{section}_{setting.name}" if setting.name in shared else setting.name
    return [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else []) + list(setting.metadata["flags"])


def _help(setting: Field) -> str:
    default = setting.default
    if default in (None, (), False, "") or "(default:" in setting.metadata["help"]:  # "" reads as "derived"
        return setting.metadata["help"]
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{setting.metadata['help']} (default: {shown})"


def _strip_optional(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


def _given(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings given on the command line, by section (absent options never reach the namespace)."""
    values: dict[str, dict[str, Any]] = {}
    for dest, value in vars(namespace).items():
        if _SEP in dest and value is not dataclasses.MISSING:
            section, name = dest.split(_SEP, 1)
            values.setdefault(section, {})[name] = value
    return values


def parse_args(argv: list[str] | None = None) -> Config:
    namespace = build_parser().parse_args(argv)
    level = namespace.analysis_level
    if level not in LEVELS:
        raise UnknownLevelError(f"unknown analysis level '{level}'; use one of: {', '.join(LEVELS)}")
    values = _given(namespace)
    bids_dir = namespace.bids_dir.expanduser().absolute()
    output_dir = namespace.output_dir.expanduser().absolute()
    if not bids_dir.is_dir():
        raise MissingInputError(f"{bids_dir}: BIDS folder not found; check the first argument")
    if output_dir == bids_dir:
        raise UsageError(f"{output_dir}: the output folder must differ from the BIDS folder")
    if bids_dir in output_dir.parents and (bids_dir / "derivatives") not in [output_dir, *output_dir.parents]:
        raise UsageError(f"{output_dir}: an output folder inside the BIDS folder must be under derivatives/")
    recorded = None
    reproduce = values.get("execution", {}).get("reproduce")
    if reproduce is not None:
        if namespace.config is not None or level != "group":
            raise UsageError("--reproduce takes every setting from the MAPS: use it at the group level, without "
                             "--config")
        from clinicadl_app.group.reproduction import recorded_settings

        values["execution"]["reproduce"] = reproduce = Path(reproduce).expanduser().absolute()
        recorded = recorded_settings(reproduce)
    return build_config(bids_dir, output_dir, level, values, namespace.config, recorded)


_ONE_LEVEL = {  # (section, setting or "*"): the one level that reads it; the other would ignore it in silence
    **{("execution", name): "participant" for name in ("bids_filter_file", "skip_bids_validator")},
    ("preprocessing", "*"): "participant",
    **{("execution", name): "group" for name in ("stages", "reproduce")},
    **{(section, "*"): "group" for section in ("labels", "split", "train", "predict", "interpret", "search", "export")},
}


def ignored_options(argv: list[str] | None) -> list[str]:
    """The options on this command line that the chosen level does not read (a TOML file may hold them all:
    one experiment file serves both levels, so only the command line is checked)."""
    namespace = build_parser().parse_args(argv)
    level = namespace.analysis_level
    return [option_name(section, name) for section, names in _given(namespace).items() for name in names
            if _ONE_LEVEL.get((section, name), _ONE_LEVEL.get((section, "*"), level)) != level]


_MAPS_STAGES = frozenset({"train", "search", "predict", "interpret", "report", "export"})
_READ_BY: dict[tuple[str, str], frozenset[str]] = {  # group-level settings read by only some stages
    **{("train", name): _MAPS_STAGES for name in ("experiment", "mode", "architecture")},  # they name the MAPS
    **{("train", name): frozenset({"train", "search", "predict", "interpret"})  # which folds, where: the job's
       for name in ("gpu", "folds")},
    ("train", "*"): frozenset({"train", "search"}),  # the later stages take the settings the MAPS recorded
    **{("labels", name): frozenset({"labels"}) for name in ("age_column", "sex_column", "keep_failed_qc")},
    **{("labels", name): frozenset({"labels", "split", "train", "search"}) for name in ("task", "subgroups")},
    ("extraction", "*"): frozenset({"train", "search"}),
    ("split", "*"): frozenset({"split"}),
    ("search", "*"): frozenset({"search"}),
    ("interpret", "*"): frozenset({"interpret"}),
    ("predict", "maps_dir"): frozenset({"predict", "interpret", "report", "export"}),
    ("predict", "group_name"): frozenset({"predict", "interpret"}),
    ("predict", "*"): frozenset({"predict"}),
    ("export", "card_fingerprints"): frozenset({"train", "report", "export"}),
    ("export", "*"): frozenset({"export"}),
}


def unread_by_stages(argv: list[str] | None, stages: tuple[str, ...]) -> list[str]:
    """The group-level options on this command line that none of the stages run reads (--epochs with --stages
    predict: predict uses the trained MAPS's settings, and the option would be dropped without a word)."""
    namespace = build_parser().parse_args(argv)
    return [option_name(section, name) for section, names in _given(namespace).items() for name in names
            if not _READ_BY.get((section, name), _READ_BY.get((section, "*"), _MAPS_STAGES | set(stages)))
            & set(stages)]


def unread_with_folds(argv: list[str] | None, config: Config) -> list[str]:
    """--n_validation with k folds, where the folds choose the validation subjects: dropped without a word, it
    would let a researcher believe a validation size was applied."""
    given = _given(build_parser().parse_args(argv)).get("split", {})
    return ["--n_validation"] if "n_validation" in given and config.split.n_splits >= 2 else []


def prepare_process(config: Config) -> None:
    """Threads follow --n_cpus; temporary files go to the work folder when the system's are not writable
    (a container run with --read-only, where only OUTPUT_DIR and -w WORK_DIR are)."""
    cpus = str(config.execution.cpus)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, cpus)
    if config.execution.work_dir:
        check_writable(config.execution.work_dir, "the work folder", "choose another --work_dir or fix its permissions")
    scratch = config.execution.work_dir or config.output_dir / "work"
    try:
        with tempfile.TemporaryFile():
            pass
    except OSError:
        folder = scratch / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    home = Path(os.environ.get("HOME", "/"))
    if not os.access(home, os.W_OK):
        for variable, name in (("MPLCONFIGDIR", "matplotlib"), ("DENO_DIR", "deno"), ("XDG_CACHE_HOME", "cache")):
            if variable not in os.environ:
                (scratch / name).mkdir(parents=True, exist_ok=True)
                os.environ[variable] = str(scratch / name)


def setup_logging(config: Config) -> None:
    execution = config.execution
    log_to_console(logging.DEBUG if execution.verbose else logging.WARNING if execution.quiet else logging.INFO)


def run() -> int:
    """The console entry point (run.py, clinicadl-app): main() in a process set up for training."""
    if "group" in sys.argv[1:]:
        from clinicadl_app.core.allocator import restart_with_fast_allocator

        restart_with_fast_allocator()
    return main()


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        setup_logging(config)
        ignored = ignored_options(argv)
        if ignored:
            log.warning("%s: not read at the %s level, ignored", ", ".join(ignored), config.analysis_level)
        if config.analysis_level == "group" and config.execution.reproduce is None:
            unread = unread_by_stages(argv, config.execution.stages)
            if unread:
                recorded = {"predict", "interpret", "report", "export"} & set(config.execution.stages)
                log.warning("%s: not read by the stages run (%s), ignored%s", ", ".join(unread),
                            " ".join(config.execution.stages),
                            "; predict, interpret and report use the settings the MAPS recorded" if recorded else "")
            if "split" in config.execution.stages and unread_with_folds(argv, config):
                log.warning("--n_validation: read with --n_splits 0 only; the %d folds choose the validation "
                            "subjects, ignored", config.split.n_splits)
        prepare_process(config)
        if config.analysis_level == "participant":
            from clinicadl_app.participant import run

            return int(run(config))
        from clinicadl_app.group import run as run_group

        return int(run_group(config))
    except AppError as error:
        print(f"clinicadl-app: error: {error.message}", file=sys.stderr)
        return int(error.exit_code)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        failure = OutputError.cannot_write(error.filename or "an output file", error.strerror)
        print(f"clinicadl-app: error: {failure.message}", file=sys.stderr)
        return int(failure.exit_code)
    except KeyboardInterrupt:
        print("clinicadl-app: interrupted; completed outputs are kept and a rerun resumes", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or ExitCode.OK)
