"""A trained MAPS as one archive to share, and back (--stages export; --maps_dir ARCHIVE).

The archive holds what predict and interpret need, and nothing that names a participant unless asked:
maps.json (the folders it was trained from moved under "exported", so no folder of the receiver is taken
for the training dataset), environment.txt, model_card.md, each fold's task record, the selected weights,
training curves, aggregate metrics, the parts' vote weights (instead of the validation predictions they
come from), and the training images' source SHA-256 and anatomy signatures under pseudonyms: the content
leakage checks work from those alone. It unpacks to OUTPUT_DIR/maps/<experiment>/ once every file's SHA-256
matches export.json; the same archive again reuses that folder, so earlier groups' predictions stay.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from clinicadl_app import __version__
from clinicadl_app.core.atomic import atomic_path, lock, write_json, write_text, write_tsv
from clinicadl_app.core.config import Train
from clinicadl_app.core.config_file import section_from
from clinicadl_app.core.errors import InputDataError, MissingInputError, UsageError
from clinicadl_app.core.provenance import sha256
from clinicadl_app.group.models import task_from_record
from clinicadl_app.group.results import validation_weights
from clinicadl_app.images.fingerprint import Signatures
from clinicadl_app.layouts.maps import Maps

log = logging.getLogger("clinicadl_app")

FORMAT = "clinicadl-app MAPS archive 1"
WITHHELD = "participant_label_withheld"
"""split.json's "labels" key that replaces the chosen participants in a pseudonymised export: their number"""
_TRAINED_FROM = ("caps_directory", "bids_directory", "split_directory")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FIX = "export it again with --stages export"
_DAMAGED = "the archive is damaged or was edited; " + _FIX


def exported(record: dict) -> dict | None:
    """What maps.json says of the archive a MAPS was unpacked from (None for a MAPS trained here)."""
    return record.get("exported")


def pseudonymised(record: dict) -> bool:
    return bool(exported(record)) and record["exported"].get("participants") == "pseudonyms"


def export_maps(maps: Maps, destination: Path, include_participants: bool) -> Path:
    record = json.loads(maps.record.read_text())
    folds = [fold for fold in maps.folds() if maps.trained(fold)]
    if not folds:
        raise UsageError(f"{maps.root}: no trained model to export; train first (--stages train)")
    unfinished = sorted(set(maps.folds()) - set(folds))
    if unfinished:  # the best models so far of a killed training must not travel as trained ones
        raise UsageError(f"{maps.root}: training of split-{unfinished[0]} did not finish; resume it (--stages train "
                         f"--split {' '.join(map(str, unfinished))}) before exporting")
    if not maps.seen.is_file():
        raise MissingInputError(f"{maps.seen}: missing; a MAPS that does not say what it was trained on cannot "
                                "be shared (its receivers could not check for leakage)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as scratch:
        stage = Maps(Path(scratch) / maps.root.name)
        record["exported"] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "by": f"clinicadl-app {__version__}",
            "maps": maps.root.name, "participants": "included" if include_participants else "pseudonyms",
            "trained_from": {key: record.get(key) for key in _TRAINED_FROM}}
        record.update(dict.fromkeys(_TRAINED_FROM))
        texts = {} if include_participants else _withhold_chosen(record)
        write_json(stage.record, record)
        for path in (maps.environment, maps.model_card):
            if path.is_file():
                text = path.read_text()
                if not include_participants:
                    text = _withhold_environment(text)
                    for named, withheld in texts.items():
                        text = text.replace(named, withheld)
                write_text(stage.root / path.name, text)
        _write_seen(maps, stage, include_participants)
        train = section_from(Train, record["train"])
        for fold in folds:
            _export_fold(maps, stage, fold, train)
        files = {str(p.relative_to(stage.root)): sha256(p) for p in sorted(stage.root.rglob("*")) if p.is_file()}
        write_json(stage.export_record, {"format": FORMAT, "experiment": maps.root.name, **record["exported"],
                                         "files": files})
        with atomic_path(destination) as tmp:
            _write_tar(stage.root, tmp)
    log.info("export: %s (%d fold(s), %.1f MB; participants %s); predict with --maps_dir %s", destination,
             len(folds), destination.stat().st_size / 1e6, record["exported"]["participants"], destination)
    return destination


def _withhold_chosen(record: dict) -> dict[str, str]:
    """Participants chosen by --participant_label are named in split.json's choice and in the command line:
    the export keeps their number only. Returns the record's command line as written and as withheld, for
    model_card.md's provenance, which quotes it."""
    labels = record.get("split", {}).get("labels", {})
    chosen = labels.pop("participant_label", None)
    if chosen:
        labels[WITHHELD] = len(chosen)
    command = list(record.get("command") or [])
    withheld = _withhold_arguments(command)
    if withheld == command:
        return {}
    line = record.get("command_line", "")
    record["command"], record["command_line"] = withheld, shlex.join(["clinicadl-app", *withheld[1:]])
    return {line: record["command_line"]}


def _withhold_arguments(arguments: list[str]) -> list[str]:
    """The values of --participant_label replaced by 'withheld' (argparse takes every value up to the next
    option, and so does this)."""
    out, naming = [], False
    for argument in arguments:
        if argument.startswith("-"):
            flag = argument.split("=")[0]
            naming = flag in ("--participant_label", "--participant-label")
            out.append(f"{flag}=withheld" if naming and "=" in argument else argument)
        else:
            out.append("withheld" if naming else argument)
    return out


def _withhold_environment(text: str) -> str:
    """The "command ..." line of environment.txt (the first training run's, not always the record's), also
    quoted in model_card.md's software block."""
    return "\n".join("command " + " ".join(_withhold_arguments(line[len("command "):].split(" ")))
                     if line.startswith("command ") else line for line in text.split("\n"))


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _write_seen(maps: Maps, stage: Maps, include_participants: bool) -> None:
    """The training images' SHA-256 and signatures; participants under pseudonyms unless asked."""
    seen = pd.read_csv(maps.seen, sep="\t", dtype=str, keep_default_na=False)
    signatures = Signatures.load(maps.seen_signatures) if maps.seen_signatures.is_file() else None
    if not include_participants:
        everyone = set(seen.participant_id) | (set(signatures.keys.participant_id) if signatures else set())
        # ordered by a hash of the label, so the pseudonyms keep neither the labels nor their order
        order = sorted(everyone, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        names = {p: f"sub-seen{i:04d}" for i, p in enumerate(order)}
        # the CAPS path of each image names its participant too
        seen = seen.assign(participant_id=seen.participant_id.map(names)).drop(columns=["image"], errors="ignore")
        if signatures is not None:
            keys = signatures.keys.assign(participant_id=signatures.keys.participant_id.map(names))
            signatures = Signatures(keys, signatures.matrix)
    write_tsv(stage.seen, seen)
    if signatures is not None:
        signatures.save(stage.seen_signatures)


def _export_fold(maps: Maps, stage: Maps, fold: int, train: Train) -> None:
    group_record = json.loads(maps.group_record("train", fold).read_text())
    group_record.update({key: None for key in _TRAINED_FROM if key in group_record})
    write_json(stage.group_record("train", fold), group_record)
    task = task_from_record(group_record["task"])
    for log_file in (maps.fold_dir(fold) / "training_logs").rglob("training.tsv"):
        _copy(log_file, stage.root / log_file.relative_to(maps.root))
    for metric in maps.selection_metrics(fold):
        for network in maps.networks(fold, metric):
            if maps.model(fold, metric, network).is_file():
                _copy(maps.model(fold, metric, network), stage.model(fold, metric, network))
        for table in (maps.fold_dir(fold) / f"best-{metric}").glob("*/*_level_metrics.tsv"):  # aggregates only
            _copy(table, stage.root / table.relative_to(maps.root))
        weights = validation_weights(maps, fold, metric, train, task)
        if weights is not None:
            write_json(stage.vote_weights(fold, metric), {str(k): v for k, v in sorted(weights.items())})


def _write_tar(folder: Path, target: Path) -> None:
    """A gzip tar of `folder` whose bytes depend on the files alone (sorted, no times, no owners)."""
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(f"{folder.name}/{path.relative_to(folder)}")
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as stream:
                tar.addfile(info, stream)


def archived_record(archive: Path) -> dict:
    """maps.json of an archive, read without unpacking it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            (member,) = [m for m in tar.getmembers() if m.isfile() and Path(m.name).parts[1:] == ("maps.json",)]
            return json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise InputDataError(f"{archive}: not a readable MAPS archive ({type(error).__name__}: {error}); "
                             f"{_FIX}") from None


def unpack(archive: Path, maps_dir: Path) -> Path:
    """The MAPS folder an archive unpacks to under maps_dir; checked file by file, never trusted blindly."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
            unsafe = [m for m in members if not m.isfile() or Path(m.name).is_absolute() or ".." in Path(m.name).parts]
            if len(tops) != 1 or not _NAME.match(next(iter(tops))) or unsafe:
                raise InputDataError(f"{archive}: not a clinicadl-app MAPS archive (one folder of plain files "
                                     f"expected); {_FIX}")
            name = tops.pop()
            manifest_member = tar.extractfile(f"{name}/export.json")
            manifest = json.loads(manifest_member.read()) if manifest_member else {}
            if manifest.get("format") != FORMAT:
                raise InputDataError(f"{archive}: no export.json of format '{FORMAT}'; {_FIX}")
            target = maps_dir / name
            with lock(maps_dir / f"{name}.unpack"):
                record = Maps(target).export_record
                if record.is_file() and json.loads(record.read_text()) == manifest:
                    return target  # unpacked before: predictions of earlier groups stay
                if target.exists():
                    raise UsageError(f"{target}: a MAPS of this name is already here and was not unpacked from "
                                     f"{archive}; use another OUTPUT_DIR, or predict with that MAPS folder")
                maps_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=maps_dir, prefix=".unpack-") as scratch:
                    # plain files under one folder (checked above); tarfile's own filter too where it has one
                    tar.extractall(scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                    _verify(Path(scratch) / name, manifest, archive)
                    os.replace(Path(scratch) / name, target)
    except (tarfile.TarError, EOFError, OSError, KeyError, json.JSONDecodeError) as error:
        raise InputDataError(f"{archive}: not a readable MAPS archive ({type(error).__name__}: {error}); "
                             f"{_FIX}") from None
    log.info("unpacked %s into %s", archive, target)
    return target


def _verify(folder: Path, manifest: dict, archive: Path) -> None:
    files = manifest.get("files", {})
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"export.json"}
    if present != set(files):
        raise InputDataError(f"{archive}: its files differ from its export.json (added or missing: "
                             f"{', '.join(sorted(present ^ set(files))[:5])}); {_DAMAGED}")
    damaged = [name for name, digest in files.items() if sha256(folder / name) != digest]
    if damaged:
        raise InputDataError(f"{archive}: {', '.join(damaged[:5])} changed since export (SHA-256); {_DAMAGED}")
