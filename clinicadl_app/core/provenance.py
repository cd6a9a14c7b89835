"""What produced a result: software versions and content fingerprints of input files."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from clinicadl_app import __version__

_PACKAGES = ("antspyx", "nibabel", "numpy", "scipy", "torch", "pybids", "pandas")


def software_versions() -> dict[str, str]:
    versions = {"clinicadl-app": __version__, "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def differing_keys(before: Mapping, after: Mapping) -> list:
    """The keys whose values differ between two records (a key missing on one side counts as None), sorted."""
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
