"""--reproduce MAPS_DIR: labels, split and training run again from what a MAPS recorded, then compared.

The recorded settings (after defaults) are the base of the configuration, under new names (<labels
folder>-reproduced, <experiment>-reproduced) so the original is never touched; options given on the
command line still win, and are listed. The split drawn again must have the recorded membership hash, or
the run stops before training: other labels or images give another split, and nothing after it compares.
After training, reproduction.json and reproduction.md compare every selected model's weights (identical
with --deterministic on CPU) and validation metrics (the difference, and whether the new value lies in
the original's 95 % interval), and list the software that differs from the recorded environment.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from clinicadl_app import __version__
from clinicadl_app.core.atomic import write_json, write_text
from clinicadl_app.core.config import Config, Labels, plain
from clinicadl_app.core.config_file import section_from
from clinicadl_app.core.errors import ReproductionError
from clinicadl_app.core.provenance import differing_keys, sha256
from clinicadl_app.group.archive import WITHHELD, archived_record
from clinicadl_app.group.fit import EXECUTION_ONLY
from clinicadl_app.group.label_table import Chosen
from clinicadl_app.group.model_card import markdown_table
from clinicadl_app.group.models import open_maps
from clinicadl_app.group.results import KEY_METRICS
from clinicadl_app.layouts.maps import Maps, environment_text
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")

SUFFIX = "-reproduced"
_RENAMED = {("train", "experiment"), ("labels", "name")}
_EXECUTION_ONLY = {("train", name) for name in EXECUTION_ONLY}
_SOFTWARE = ("clinicadl-app", "python", "torch", "cuda", "cudnn", "container")


def recorded_settings(maps_dir: Path) -> dict[str, dict]:
    """The sections a MAPS (or an exported archive of one) recorded, renamed for the reproduction: the base
    the command line overrides."""
    record = archived_record(maps_dir) if maps_dir.is_file() else open_maps(maps_dir)[1]
    folder = section_from(Labels, record["labels"]).folder
    chosen = Chosen.recorded(record["split"]["labels"])
    return {"labels": {**record["labels"], "name": folder + SUFFIX},
            "split": dict(record["split"]["split"]),
            "train": {**record["train"], "experiment": record["experiment"] + SUFFIX},
            "extraction": dict(record["extraction_settings"]),
            "execution": {"stages": ["labels", "split", "train"], "participant_label": chosen.participants,
                          "session_label": chosen.sessions}}


@dataclass
class Reproduction:
    original: Maps
    record: dict

    @classmethod
    def open(cls, path: Path) -> Reproduction:
        maps, record = open_maps(path)
        return cls(maps, record)

    def setting_differences(self, config: Config) -> list[str]:
        """Settings of this run that differ from the recorded ones (given on the command line)."""
        recorded = {"train": self.record["train"], "labels": self.record["labels"],
                    "split": self.record["split"]["split"], "extraction": self.record["extraction_settings"]}
        found = []
        for section, theirs in recorded.items():
            ours = plain(getattr(config, section))
            for key in differing_keys(theirs, ours):
                if (section, key) not in _RENAMED | _EXECUTION_ONLY:
                    found.append(f"[{section}] {key} = {ours.get(key)!r} (recorded {theirs.get(key)!r})")
        labels = self.record["split"]["labels"]
        chosen, recorded_choice = Chosen.of(config.execution), Chosen.recorded(labels)
        if WITHHELD in labels:  # a pseudonymised archive: the names are gone, their number is not
            if len(chosen.participants) != labels[WITHHELD]:
                found.append(f"{len(chosen.participants)} participants chosen by --participant_label (recorded "
                             f"{labels[WITHHELD]}, whose names the export withheld: give them again)")
            chosen = replace(chosen, participants=())
        if chosen != recorded_choice:
            found.append(f"images chosen by {chosen or 'no option'} (recorded {recorded_choice or 'none'})")
        weights, recorded = config.train.pretrained_weights, self.record.get("pretrained_weights_sha256")
        if weights is not None and recorded and weights.is_file() and sha256(weights) != recorded:
            found.append(f"[train] pretrained_weights {weights}: other content than the recorded file's "
                         f"(SHA-256 {recorded[:16]}...)")
        return found

    def environment_differences(self) -> list[str]:
        if not self.original.environment.is_file():
            return [f"{self.original.environment}: missing, the recorded software is unknown"]
        before, now = _software(self.original.environment.read_text()), _software(environment_text())
        return [f"{name} {now.get(name, 'absent')} (recorded {before.get(name, 'absent')})"
                for name in differing_keys(before, now)]

    def announce(self, config: Config) -> None:
        log.info("reproduce %s into %s-reproduced", self.original.root, self.record["experiment"])
        for what, found in (("settings differ from the record", self.setting_differences(config)),
                            ("the running software differs from the recorded", self.environment_differences())):
            if found:
                log.warning("reproduce: %s: %s", what, "; ".join(found))

    def check_split(self, folder: SplitFolder, new: Maps) -> dict:
        """The split drawn again against the recorded one; a different draw stops the reproduction."""
        drawn = json.loads(folder.record.read_text())
        split = {"identical": drawn.get("membership_sha256") == self.record.get("split_membership_sha256"),
                 "membership_sha256": {"recorded": self.record.get("split_membership_sha256"),
                                       "reproduced": drawn.get("membership_sha256")},
                 "labels_sha256": {"recorded": self.record["split"].get("labels_sha256"),
                                   "reproduced": drawn.get("labels_sha256")},
                 "split_directory": str(folder.root)}
        if not split["identical"]:
            why = "the labels table differs too" if split["labels_sha256"]["recorded"] != \
                split["labels_sha256"]["reproduced"] else "the labels table is the same, the draw is not"
            withheld = self.record["split"]["labels"].get(WITHHELD)
            if withheld:
                why += (f"; {withheld} participants were chosen with --participant_label, whose names the export "
                        "withheld: give them again")
            self._write(new, {"split": split, "verdict": "not reproduced: the split differs"})
            shutil.rmtree(folder.root)  # nothing trained on it; a rerun on the right data draws it again
            raise ReproductionError(
                f"{folder.record}: the split drawn again differs from the one {self.original.root} was trained on "
                f"({why}); check that BIDS_DIR and the CAPS hold the same participants, labels and images; "
                f"details in {new.reproduction}")
        return split

    def compare(self, folder: SplitFolder, new: Maps) -> Path:
        split = self.check_split(folder, new)
        split["files"] = {f"groups/{group}/split-{fold}/data.tsv": _same_bytes(
            self.original.group_data(group, fold), new.group_data(group, fold))
            for fold in new.folds() for group in ("train", "validation")
            if self.original.group_data(group, fold).is_file()}  # an exported MAPS carries none: the hash decides
        models, metrics = self._models(new), self._metrics(new)
        identical = split["identical"] and all(split["files"].values()) and bool(models) \
            and all(m["identical"] for m in models) and all(m["difference"] == 0 for m in metrics)
        inside = [m["within_interval"] for m in metrics if m["within_interval"] is not None]
        verdict = ("identical: split, weights and metrics" if identical else
                   f"split identical; weights differ (largest difference "
                   f"{max((m['max_abs_difference'] for m in models), default=0):.3g}); "
                   f"{sum(inside)} of {len(inside)} validation metrics inside the recorded 95 % intervals")
        self._write(new, {"split": split, "models": models, "metrics": metrics, "verdict": verdict})
        log.info("reproduce: %s; open %s", verdict, new.reproduction_summary)
        return new.reproduction_summary

    def _models(self, new: Maps) -> list[dict]:
        rows = []
        for fold in sorted(set(self.original.folds()) & set(new.folds())):
            for metric in sorted(set(self.original.selection_metrics(fold)) & set(new.selection_metrics(fold))):
                for network in self.original.networks(fold, metric):
                    paths = self.original.model(fold, metric, network), new.model(fold, metric, network)
                    if not all(p.is_file() for p in paths):
                        continue
                    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in paths)
                    same = a["model"].keys() == b["model"].keys() and all(
                        torch.equal(v, b["model"][k]) for k, v in a["model"].items())
                    largest = max((float((v.double() - b["model"][k].double()).abs().max())
                                   for k, v in a["model"].items()
                                   if k in b["model"] and v.shape == b["model"][k].shape and v.numel()), default=0.0)
                    rows.append({"fold": fold, "selection": metric, "network": network, "identical": same,
                                 "max_abs_difference": largest,
                                 "epoch": {"recorded": a.get("epoch"), "reproduced": b.get("epoch")}})
        return rows

    def _metrics(self, new: Maps) -> list[dict]:
        names = ["loss", *KEY_METRICS[self.record["task"]]]
        rows = []
        for fold in sorted(set(self.original.folds()) & set(new.folds())):
            for metric in sorted(set(self.original.selection_metrics(fold)) & set(new.selection_metrics(fold))):
                paths = [m.metrics(fold, metric, "validation", "image") for m in (self.original, new)]
                if not all(p.is_file() for p in paths):
                    continue
                before, now = (pd.read_csv(p, sep="\t").iloc[0] for p in paths)
                for name in (n for n in names if n in before and n in now):
                    a, b = float(before[name]), float(now[name])
                    low, high = before.get(f"{name}_ci95_low"), before.get(f"{name}_ci95_high")
                    bounded = low is not None and high is not None and not (math.isnan(low) or math.isnan(high))
                    rows.append({"fold": fold, "selection": metric, "metric": name, "recorded": a, "reproduced": b,
                                 "difference": 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else b - a,
                                 "interval": [float(low), float(high)] if bounded else None,
                                 "within_interval": bool(low <= b <= high) if bounded else None})
        return rows

    def _write(self, new: Maps, result: dict) -> None:
        about = {"original": str(self.original.root), "original_version": self.record["clinicadl_app_version"],
                 "reproduced": str(new.root), "version": __version__,
                 "date": datetime.now(UTC).isoformat(timespec="seconds"),
                 "environment_differences": self.environment_differences()}
        write_json(new.reproduction, {**about, **result})
        lines = [f"# Reproduction of {self.record['experiment']}", "", f"**{result['verdict']}**", "",
                 f"- Original: `{about['original']}` (clinicadl-app {about['original_version']})",
                 f"- Reproduced: `{about['reproduced']}` (clinicadl-app {__version__}) on {about['date']}",
                 f"- Split membership SHA-256: recorded `{result['split']['membership_sha256']['recorded']}`, "
                 f"drawn again `{result['split']['membership_sha256']['reproduced']}`",
                 "- Software that differs from the recorded environment: "
                 + ("; ".join(about["environment_differences"]) or "none")]
        for title, key in (("Selected models", "models"), ("Validation metrics", "metrics")):
            if result.get(key):
                frame = pd.json_normalize(result[key]).round(6).astype(object).fillna("-")
                lines += ["", f"## {title}", "", markdown_table(frame)]
        write_text(new.reproduction_summary, "\n".join(lines) + "\n")


def _software(text: str) -> dict[str, str]:
    """Versions in an environment.txt: the software lines and every package (hardware lines are left out)."""
    found = {}
    head, _, packages = text.partition("packages:")
    for line in head.splitlines():
        name, _, value = line.partition(" ")
        if name in _SOFTWARE and not value.startswith("threads"):
            found[name] = value
    for line in packages.splitlines():
        name, _, version = line.strip().partition("==")
        if name:
            found[f"package {name}"] = version
    return found


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
