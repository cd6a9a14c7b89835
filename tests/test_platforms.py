"""Platforms run what the command line runs: the Boutiques descriptor is made from the parser (a drift
fails here), validates, and `bosh exec launch` writes the files a direct run writes; brainlife's `main`
maps config.json to the same options."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinicadl_app.cli import build_parser
from clinicadl_app.platforms.boutiques import descriptor
from clinicadl_app.platforms.brainlife import arguments

from .conftest import CAPS2MM, DEMO, ROOT, run_app
from .group_data import make_longitudinal

DESCRIPTOR = ROOT / "boutiques" / "clinicadl-app.json"
BIN = Path(sys.executable).parent


def test_the_descriptor_is_the_command_line():
    assert json.loads(DESCRIPTOR.read_text()) == descriptor(), \
        "boutiques/clinicadl-app.json is stale: python -m clinicadl_app.platforms.boutiques > boutiques/clinicadl-app.json"
    flags = {entry.get("command-line-flag") for entry in descriptor()["inputs"]}
    for action in build_parser()._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        first = action.option_strings[0]
        assert first in flags or "--no-" + first[2:] in flags, f"{first} is missing from the descriptor"
    codes = {entry["code"] for entry in descriptor()["error-codes"]}
    assert {16, 20, 64, 65, 66, 73} <= codes


def test_bosh_validates_the_descriptor():
    done = subprocess.run([BIN / "bosh", "validate", DESCRIPTOR], capture_output=True, text=True)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".tsv", ".json")}


def test_bosh_exec_launch_gives_the_files_of_a_direct_run(tmp_path):
    bids, caps = make_longitudinal(tmp_path, n=24, diagnoses=("AD", "CN"), weights=(0.5, 0.5))
    options = ["--caps_dir", str(caps), "--stages", "labels", "split", "--column", "diagnosis", "--n_splits", "3",
               "--split_seed", "4", "--max_attempts", "5"]
    direct = run_app(bids, tmp_path / "direct", "group", *options)
    assert direct.returncode == 0, direct.stderr
    invocation = {"bids_dir": str(bids), "output_dir": str(tmp_path / "bosh"), "analysis_level": "group",
                  "caps_dir": str(caps), "stages": ["labels", "split"], "column": "diagnosis", "n_splits": 3,
                  "split_seed": 4, "max_attempts": 5}
    (tmp_path / "invocation.json").write_text(json.dumps(invocation))
    launched = subprocess.run([BIN / "bosh", "exec", "launch", "--no-container", "--skip-data-collection", DESCRIPTOR,
                               tmp_path / "invocation.json"], capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert launched.returncode == 0 and "Exit code\n0" in launched.stdout, launched.stdout + launched.stderr
    made, expected = _files(tmp_path / "bosh" / "splits"), _files(tmp_path / "direct" / "splits")
    assert made and made == expected


def test_brainlife_main_runs_a_config_on_the_demo_data(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.json").write_text(json.dumps({
        "bids": str(DEMO), "analysis_level": "group", "caps_dir": str(CAPS2MM), "stages": "labels split",
        "column": "sex", "n_splits": 2, "baseline_sets": True, "_inputs": [{"meta": {}}]}))
    done = subprocess.run([ROOT / "main"], cwd=job, capture_output=True, text=True,
                          env={**os.environ, "CLINICADL_APP_PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "--stages labels split --column sex --n_splits 2 --baseline_sets" in done.stderr
    product = json.loads((job / "product.json").read_text())
    assert product["brainlife"][0]["type"] == "info"
    assert (job / "output" / "splits" / "sex" / "split.json").is_file()
    # a setting the app does not have: one line, exit 64, and brainlife is told
    (job / "config.json").write_text(json.dumps({"bids": str(DEMO), "colum": "sex"}))
    bad = subprocess.run([ROOT / "main"], cwd=job, capture_output=True, text=True,
                         env={**os.environ, "CLINICADL_APP_PYTHON": sys.executable})
    assert bad.returncode == 64 and bad.stderr.strip().count("\n") == 0 and "'colum'" in bad.stderr
    assert json.loads((job / "product.json").read_text())["brainlife"][0]["type"] == "error"


def test_a_brainlife_t1_becomes_a_one_image_bids_dataset(tmp_path):
    t1 = tmp_path / "t1.nii.gz"
    t1.write_bytes(b"")
    args = arguments({"t1": "t1.nii.gz", "_inputs": [{"meta": {"subject": "0042", "session": "M-12"}}],
                      "modes": ["image", "patch"], "uncropped_image": False, "n_cpus": 2}, tmp_path)
    image = tmp_path / "bids" / "sub-0042" / "ses-M12" / "anat" / "sub-0042_ses-M12_T1w.nii.gz"
    assert image.is_symlink() and image.resolve() == t1.resolve()
    assert args == [str(tmp_path / "bids"), str(tmp_path / "output"), "participant", "--modes", "image", "patch",
                    "--n_cpus", "2"]
    with pytest.raises(ValueError, match="give 't1'"):
        arguments({"modes": "image"}, tmp_path)


def test_the_container_is_named_with_its_digest_when_known(monkeypatch):
    from clinicadl_app.layouts.output import container

    for name in ("CLINICADL_APP_IMAGE", "CLINICADL_APP_IMAGE_DIGEST", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(name, raising=False)
    assert container() is None
    monkeypatch.setenv("CLINICADL_APP_IMAGE", "clinicadl-app:0.1.0")
    assert container() == {"Type": "docker", "Tag": "clinicadl-app:0.1.0"}
    monkeypatch.setenv("CLINICADL_APP_IMAGE_DIGEST", "sha256:" + "ab" * 32)
    assert container()["URI"] == "docker://clinicadl-app@sha256:" + "ab" * 32
    monkeypatch.delenv("CLINICADL_APP_IMAGE_DIGEST")
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/clinicadl-app_0.1.0.sif")
    assert container() == {"Type": "singularity", "Tag": "clinicadl-app:0.1.0", "URI": "/images/clinicadl-app_0.1.0.sif"}


def test_readme_lists_every_exit_code_the_app_uses():
    from clinicadl_app.core.errors import MEANINGS, ExitCode

    table = (ROOT / "README.md").read_text().split("### Exit codes", 1)[1].split("Any other code", 1)[0]
    listed = {int(line.split("|")[1]) for line in table.splitlines() if line.startswith("| ") and
              line.split("|")[1].strip().isdigit()}
    assert listed == {int(code) for code in ExitCode} == {int(code) for code in MEANINGS}
