"""Memory allocation for training on the CPU.

A 3D CNN allocates and frees gigabytes of activations at every step. glibc serves such blocks with mmap and
returns them to the system at once, so every step page-faults its memory in again: measured here (AMD EPYC,
2 cores, Conv5_FC3 on 169x208x179 images, batch 4), glibc trains 0.42 img/s; glibc told to keep freed
memory 0.59 img/s at 6.2 GiB; tcmalloc 0.94 img/s at 5.9 GiB; mimalloc keeping freed memory 0.99 img/s at
5.4 GiB (benchmarks/allocator.py). mimalloc comes from a pip wheel (cmeel-mimalloc, a dependency), so
`pip install` alone gives the fast path: run.py restarts itself with it preloaded for the group level.
The system's tcmalloc is the fallback where the wheel is missing, and glibc is tuned otherwise.
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


def mimalloc_settings() -> dict[str, str]:
    """mimalloc keeps freed memory (no purging) in one large arena committed at once: a training step's
    blocks of many sizes then fit in what earlier steps freed (measured: 4.75 GiB peak instead of 5.93 with
    the default 1 GiB arenas). The arena is address space, not memory: at most half the machine's."""
    try:
        total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        total = 2 * 2**30
    reserve = min(8, max(1, total // 2**31))
    return {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ARENA_EAGER_COMMIT": "1",
            "MIMALLOC_ARENA_RESERVE": f"{reserve}GiB"}


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


def best_available() -> tuple[Path, dict[str, str]] | None:
    """The fastest allocator library this installation has, and the environment it wants."""
    wheel = wheel_mimalloc()
    if wheel:
        return wheel, mimalloc_settings()
    system = system_tcmalloc()
    return (system, {}) if system else None


def restart_with_fast_allocator() -> None:
    """Re-execute this command with the best allocator preloaded (once; not if one is already preloaded)."""
    if os.environ.get(_GUARD) or preloaded() or not sys.platform.startswith("linux"):
        return
    best = best_available()
    if best is None:
        return
    library, settings = best
    env = {**settings, **os.environ, _GUARD: "1"}  # the user's own MIMALLOC_* settings win
    env["LD_PRELOAD"] = ":".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
    if not _starts(env):  # e.g. a system without the library's own dependencies (libatomic): stay on glibc
        log.warning("%s cannot be preloaded here; training with glibc's allocator (slower)", library.name)
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _starts(env: dict[str, str]) -> bool:
    """Whether Python starts with this environment's preload (a missing dependency fails only at exec)."""
    import subprocess

    try:
        return subprocess.run([sys.executable, "-c", ""], env=env, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_prefaulted = 0


def prefault(nbytes: int, block: int = 256 * 2**20) -> int:
    """Touch this much fresh memory through the allocator, then free it for the next allocations to reuse; returns
    the bytes touched now.

    A page's first touch costs a fault, and on a virtual machine the host backs the page then too: measured on
    this project's 2-core VMs, Conv5_FC3's first training step (~3 GB of fresh activations) took 4-7 s more than
    the next, faulting at 0.4-0.9 GB/s inside multi-threaded kernels, while a plain write beforehand took 0.5-1.7 s
    for 3 GB. Only with mimalloc as run.py preloads it (freed memory kept for reuse), and from the thread that
    will use the memory: mimalloc's heaps are per thread, and a helper thread's pages were not reused (+0.85 GB
    peak). Once per process: later folds reuse what the first one touched."""
    global _prefaulted
    if preloaded() != "mimalloc" or nbytes <= _prefaulted:
        return 0
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []
    try:
        for start in range(0, nbytes, block):
            size = min(block, nbytes - start)
            address = libc.malloc(ctypes.c_size_t(size))
            if not address:
                break
            blocks.append(address)
            ctypes.memset(address, 0, size)
    finally:
        for address in blocks:
            libc.free(address)
    _prefaulted = max(_prefaulted, nbytes)
    return nbytes


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
    log.info("glibc malloc keeps freed memory (pip install cmeel-mimalloc for more speed with less memory)")
    return "glibc (mmap off, no trimming)"
