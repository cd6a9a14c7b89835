"""The Boutiques descriptor, made from the command line's own parser: every option of `run.py --help` is an
input with its type, choices, list-ness and help, grouped by configuration section; the exit codes come
from core/errors.py. `boutiques/clinicadl-app.json` is this module's output, and a test fails when they
differ (python -m clinicadl_app.platforms.boutiques > boutiques/clinicadl-app.json refreshes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from clinicadl_app import __version__
from clinicadl_app.cli import build_parser
from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import MEANINGS

# the image's entry point and the installed console script; run.py in a checkout does the same
IMAGE = "clinicadl-app"
POSITIONALS = {
    "bids_dir": ("BIDS_DIR", "File", "The input BIDS dataset."),
    "output_dir": ("OUTPUT_DIR", "String", "Where the CAPS, MAPS, reports and logs are written."),
    "analysis_level": ("ANALYSIS_LEVEL", "String", "participant (preprocessing and tensors) or group "
                       "(labels, split, training, prediction, interpretation, report)."),
}


def _default(dest: str) -> Any:
    section, name = dest.split("__", 1)
    return next(f.default for f in fields(Config.SECTIONS[section]) if f.name == name)


def _input(action: argparse.Action) -> dict[str, Any]:
    flag = action.option_strings[0]
    entry: dict[str, Any] = {"id": flag.lstrip("-"), "name": flag.lstrip("-").replace("_", " "), "optional": True,
                             "description": action.help or "", "command-line-flag": flag}
    if isinstance(action, argparse.BooleanOptionalAction):
        if _default(action.dest) is True:  # what a user can change is turning it off
            flag = "--no-" + flag[2:]
            entry.update({"id": flag[2:].replace("-", "_"), "name": flag[2:].replace("_", " "),
                          "command-line-flag": flag, "description": f"turn off: {action.help}"})
        entry["type"] = "Flag"
    elif action.type in (int, float):
        entry.update({"type": "Number", "integer": action.type is int})
    elif action.type is Path:
        entry["type"] = "File"
    else:
        entry["type"] = "String"
    if action.choices:
        entry["value-choices"] = list(action.choices)
    if action.nargs == "+":
        entry.update({"list": True, "min-list-entries": 1})
    entry["value-key"] = f"[{entry['id'].upper()}]"
    return entry


def descriptor() -> dict[str, Any]:
    parser = build_parser()
    inputs = [{"id": dest, "name": dest.replace("_", " "), "type": kind, "description": text,
               "value-key": f"[{key}]", "optional": False}
              for dest, (key, kind, text) in POSITIONALS.items()]
    inputs[2]["value-choices"] = ["participant", "group"]
    groups = []
    for group in parser._action_groups:
        members = [_input(a) for a in group._group_actions
                   if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)]
        inputs += members
        if members and group.title.startswith("["):
            groups.append({"id": group.title.strip("[]"), "name": group.title,
                           "description": group.description or "", "members": [m["id"] for m in members]})
    return {
        "name": "clinicadl-app",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "author": "clinicadl-app developers",
        "command-line": "clinicadl-app " + " ".join(i["value-key"] for i in inputs),
        "container-image": {"type": "docker", "image": f"{IMAGE}:{__version__}"},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{"id": "output", "name": "output folder", "path-template": "[OUTPUT_DIR]",
                          "description": "CAPS (caps/), MAPS (maps/), splits, reports and logs"}],
        "error-codes": [{"code": int(code), "description": text} for code, text in MEANINGS.items() if code],
        "tags": {"domain": ["neuroinformatics", "mri", "deep learning"], "bids-app": True},
        "suggested-resources": {"cpu-cores": 4, "ram": 16, "walltime-estimate": 7200},
    }


def main() -> int:
    json.dump(descriptor(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
