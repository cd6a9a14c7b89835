"""The container recipe and the CI configuration, checked offline (the image itself is built and run by
circle-ci/test_container_local.sh, which tools/test.sh calls after the tests when podman is present)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from .conftest import ROOT


def tool(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else shutil.which(name)


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_pins_its_base_and_takes_the_version_from_the_version_file():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+@sha256:[0-9a-f]{64}$", text, re.MULTILINE)
    assert 'test "$(clinicadl-app --version)" = "clinicadl-app ${VERSION}"' in text
    assert "USER 1000:1000" in text and "requirements.lock" in text
    locked = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
    assert locked and all("==" in line for line in locked)
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in locked}
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {re.split(r"[<>=!;\[ ]", name)[0].lower().replace("_", "-") for name in wanted} - pinned - {"torch"}
    assert not missing, f"requirements.lock lacks {missing}: regenerate it (see its first lines)"
    definition = (ROOT / "Singularity.def").read_text()
    for section in ("%runscript", "%test", "%labels"):
        assert section in definition
    assert "From: clinicadl-app:{{ VERSION }}" in definition


def test_circleci_configuration_validates_and_continues_into_circle_ci():
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci",
                           str(ROOT / ".circleci" / "config.yml"), str(ROOT / "circle-ci" / "config.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    setup = yaml.safe_load((ROOT / ".circleci" / "config.yml").read_text())
    assert setup["setup"] is True
    (job,) = setup["workflows"]["setup"]["jobs"]
    assert (ROOT / job["continuation/continue"]["configuration_path"]).is_file()
    pipeline = yaml.safe_load((ROOT / "circle-ci" / "config.yml").read_text())
    assert {"tests", "build", "deploy"} <= set(pipeline["jobs"])


def test_container_prerequisites_fail_with_one_line_each(tmp_path):
    """A machine without podman (or with a runtime named in containers.conf but not installed) is told which
    piece is missing, and the check fails instead of the build failing deep inside podman."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sed", "dirname"):
        (bin_dir / name).symlink_to(shutil.which(name))
    done = subprocess.run(["/bin/bash", str(ROOT / "circle-ci" / "container_prerequisites.sh")], capture_output=True,
                          text=True, env={"PATH": str(bin_dir)})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert any("'podman' is missing" in line and "podman" in line for line in lines), lines
    assert any("no OCI runtime" in line for line in lines), lines
    assert all(line.startswith("container test:") for line in lines)
    named = re.search(r'^runtime = "(\w+)"', (ROOT / "circle-ci" / "containers.conf").read_text(), re.MULTILINE)
    assert any(f"'{named.group(1)}'" in line and "not installed" in line for line in lines), lines
    script = (ROOT / "tools" / "test.sh").read_text()
    assert re.search(rf"^packages=\(.*\b{named.group(1)}\b", script, re.MULTILINE), "the named runtime is installed"
