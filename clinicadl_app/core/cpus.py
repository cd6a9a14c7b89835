"""How many CPUs this process may use: the allocation (affinity, cgroup quota, SLURM), not the node's cores.

A SLURM job with --cpus-per-task 4 on a 128-core node, or a container run with --cpus 2, must not start 128
threads: oversubscribed threads make a CNN step several times slower.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs granted by a cgroup v2 (cpu.max) or v1 (cfs quota) limit; None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def _slurm() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def processes_on_node() -> int:
    """torchrun's LOCAL_WORLD_SIZE: this node's processes, which share its allocation while they train."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def allocated_cpus(processes_on_node: int = 1) -> int:
    """The smallest of affinity, cgroup quota and SLURM_CPUS_PER_TASK, shared among this node's processes
    (torchrun's LOCAL_WORLD_SIZE) unless SLURM already gave each task its own."""
    limits = [n for n in (_affinity(), _cgroup_quota()) if n]
    per_task = _slurm()
    if per_task:
        return max(1, min([per_task, *limits]))
    return max(1, min(limits) // max(1, processes_on_node))
