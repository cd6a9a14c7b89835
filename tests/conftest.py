"""Shared test data: real scans shipped with the project (demo/bids, tests/data), arranged per test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "bids"
RAW2MM = Path(__file__).resolve().parent / "data" / "raw2mm"
CAPS2MM = Path(__file__).resolve().parent / "data" / "caps2mm"
DEMO_SUBJECTS = sorted(p.name for p in DEMO.glob("sub-*"))


def make_bids(root: Path, layout: dict[str, Path], participants: str | None = None) -> Path:
    """A BIDS dataset whose files are copies of real scans: {'sub-A/ses-1/anat/sub-A_ses-1_T1w.nii.gz': src}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}\n')
    for relative, source in layout.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    if participants:
        (root / "participants.tsv").write_text(participants)
    return root


def demo_scan(subject: str) -> Path:
    return DEMO / subject / "anat" / f"{subject}_T1w.nii.gz"


def run_app(*args: str | Path, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """run.py in a subprocess, as a user would call it."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    noise = PYTHON_WARNING.findall(done.stderr)
    assert not noise, f"a Python warning reached the user's terminal: {noise}"
    return done


PYTHON_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: .*$", re.MULTILINE)
"""What warnings.warn prints (file:line: SomeWarning: text): noise for a user, who gets log lines or nothing."""


@pytest.fixture(scope="session")
def demo_bids() -> Path:
    return DEMO


def subset_caps(root: Path, subjects: list[str]):
    """A CAPS holding only some of the source brains (symbolic links)."""
    from clinicadl_app.layouts.caps import Caps

    (root / "subjects").mkdir(parents=True)
    for subject in subjects:
        os.symlink(CAPS2MM / "subjects" / subject, root / "subjects" / subject)
    return Caps(root)


def source_brains() -> tuple[list[str], list[str]]:
    """12 brains to train on, 3 that no model sees (for new datasets)."""
    everyone = sorted(p.name for p in (CAPS2MM / "subjects").iterdir())
    return everyone[:12], everyone[12:]


# tools/test.sh runs one pytest-xdist worker per core (the suite is CPU-bound: two workers that each start
# two-thread registrations and trainings were slower than one). Each worker is pinned to its own cores, so that
# what its tests start sees the worker's share (core.cpus reads the affinity); the heaviest modules are handed
# out first (with --no-loadscope-reorder), so that none of them starts last, alone on one core.
HEAVY_FIRST = ["test_concurrency", "test_training", "test_participant", "test_predict", "test_registration",
               "test_raw_scans", "test_promises", "test_distributed", "test_bad_input", "test_interpret_modes"]


def pytest_configure(config):
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= count:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return HEAVY_FIRST.index(module) if module in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


def torchvision_names(state: dict) -> dict:
    """Our resnet18's tensors under torchvision's names, as in its ImageNet file; fc_out has no counterpart."""
    from clinicadl_app.group.networks.pretrained import TORCHVISION_NAMES

    renamed = {}
    for name, value in state.items():
        for theirs, ours in TORCHVISION_NAMES:
            if name.startswith(ours):
                renamed[theirs + name[len(ours):]] = value
    return renamed
