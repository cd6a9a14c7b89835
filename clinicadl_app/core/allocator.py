"""Memory allocation for training on the CPU.

A 3D CNN allocates and frees gigabytes of activations at every step. glibc serves such blocks with mmap and
returns them to the system at once, so every step page-faults its memory in again: measured here, half of
a Conv5_FC3 step on 169x208x179 images was the kernel zeroing pages (1.0 image/s). tcmalloc keeps freed
memory for reuse (2.4 images/s, 5.1 GB); glibc told to keep it (no mmap, no trimming) gets 2.2 images/s at
8.4 GB. The container preloads tcmalloc; elsewhere run.py restarts itself with it when the system has it
(Debian: libtcmalloc-minimal4), and glibc is tuned otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
_GUARD = "CLINICADL_APP_ALLOCATOR_SET"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def preloaded() -> str | None:
    """The allocator library mapped into this process, if not glibc's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return None


MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ARENA_EAGER_COMMIT": "1"}
"""mimalloc keeps freed memory (no purging) and commits its arenas at once."""


def system_tcmalloc() -> Path | None:
    return next((Path(path) for path in _TCMALLOC if Path(path).exists()), None)


def wheel_mimalloc() -> Path | None:
    """libmimalloc from the cmeel-mimalloc wheel, when pip installed it."""
    try:
        from importlib.metadata import distribution

        found = [Path(str(distribution("cmeel-mimalloc").locate_file(f))) for f in
                 distribution("cmeel-mimalloc").files or [] if f.name.startswith("libmimalloc.so.")]
    except Exception:  # noqa: BLE001 - not installed, or installed oddly: glibc it is
        return None
    return next((path for path in sorted(found) if path.exists()), None)


def restart_with_tcmalloc() -> None:
    """Re-execute this command with tcmalloc preloaded when the system has it (once; never under tests)."""
    if os.environ.get(_GUARD) or preloaded() or not sys.platform.startswith("linux"):
        return
    library = system_tcmalloc()
    if library is None:
        return
    env = dict(os.environ, **{_GUARD: "1"})
    env["LD_PRELOAD"] = ":".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def keep_freed_memory() -> str:
    """Make freed blocks reusable without page faults; returns what is in place, for the records."""
    name = preloaded()
    if name:
        return name
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return "system default"
    log.info("glibc malloc keeps freed memory (install libtcmalloc-minimal4 for the same speed with less memory)")
    return "glibc (mmap off, no trimming)"
