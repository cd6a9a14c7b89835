"""Atomic writes and cross-process locks: a killed run never leaves a half-written file that a rerun trusts."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; it replaces `path` only if the block succeeds.

    The temporary name keeps the extensions (.nii.gz, .pt) so writers that infer the format still work.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, dot, extensions = path.name.partition(".")
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{dot}{extensions}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(payload: Any, path: Path) -> None:
    """torch.save, atomically; a failed write (full disk, quota) becomes one clear error, not torch's
    "enforce fail at inline_container.cc", and leaves the previous file in place. Saved through a file object
    so the archive's inner folder is not named after the temporary file: equal tensors give equal bytes."""
    import torch

    from clinicadl_app.core.errors import OutputError

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as stream:
                torch.save(payload, stream)
        except (OSError, RuntimeError) as error:
            raise OutputError.cannot_write(path, error) from None


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_tsv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")


def lock(path: Path, timeout: float = 600) -> FileLock:
    """A lock shared by every process (and job) that writes `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(f".{path.name}.lock")), timeout=timeout)
