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

from clinicadl_app.core.errors import OutputError


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


def save_torch(payload: Any, path: Path, direct: bool = False) -> None:
    """torch.save, atomically; a failed write (full disk, quota) becomes one clear error, not torch's
    "enforce fail at inline_container.cc", and leaves the previous file in place. Saved through a file object
    so the archive's inner folder is not named after the temporary file: equal tensors give equal bytes.
    `direct`: around the page cache, and on disk before the rename (core.direct_write; for large files)."""
    import torch

    from clinicadl_app.core.direct_write import DirectFile
    from clinicadl_app.core.errors import OutputError

    with atomic_path(path) as tmp:
        try:
            with DirectFile(tmp) if direct else open(tmp, "wb") as stream:
                torch.save(payload, stream)
        except (OSError, RuntimeError) as error:
            raise OutputError.cannot_write(path, error) from None


class BackgroundSaves:
    """save_torch in one worker thread, so that writing a checkpoint (484 MB for Conv5_FC3 with Adam; 0.3 s on
    this machine's local disk, seconds on a cluster's network file system) overlaps the next batch's
    computation instead of adding to the epoch; written direct (around the page cache), so that the write
    takes little of the CPU the batch runs on.

    The caller must leave every tensor of a payload unchanged until wait() returns: the training loop copies
    what a forward pass changes (BatchNorm buffers) and waits before its next optimiser step. Writes stay in
    order and atomic; a failed one raises from wait(), as a synchronous save would have."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="save")
        self._pending: list = []

    def save(self, payload: Any, path: Path) -> None:
        self._pending.append(self._worker.submit(save_torch, payload, path, direct=True))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def tsv_text(table: pd.DataFrame) -> str:
    """The text write_tsv writes: one format, so a hash of a table can be compared with a written file's."""
    return table.to_csv(sep="\t", index=False, na_rep="n/a")


def write_tsv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(tsv_text(table).encode())


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Create `folder` and write a file in it, so that an unusable folder is one line before any work, not a
    failure per subject later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"{folder}: {what} is not writable ({error.strerror}); {fix}") from None


def lock(path: Path, timeout: float = 600) -> FileLock:
    """A lock shared by every process (and job) that writes `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(f".{path.name}.lock")), timeout=timeout)
