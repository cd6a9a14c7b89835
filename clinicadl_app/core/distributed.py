"""The processes of one data-parallel training, as torchrun or SLURM's srun started them.

torch.distributed is the engine: NCCL between GPUs, gloo between CPUs. This module only reads who we are from
the launcher's environment, starts and ends the process group, and turns a lost peer into one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from clinicadl_app.core.errors import AppError, ExitCode


class PeerLostError(AppError):
    """Another process of the training died or stopped answering: every process stops; a rerun resumes."""

    exit_code = ExitCode.PEER_LOST


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; srun sets SLURM_PROCID and SLURM_NTASKS, which count
        only where the job script also set MASTER_ADDR (a plain one-task job inside an allocation is alone)."""
        if _int("WORLD_SIZE") and _int("RANK") is not None:
            return cls(_int("RANK") or 0, _int("WORLD_SIZE") or 1, _int("LOCAL_RANK") or 0)
        if os.environ.get("MASTER_ADDR") and (_int("SLURM_NTASKS") or 1) > 1 and _int("SLURM_PROCID") is not None:
            return cls(_int("SLURM_PROCID") or 0, _int("SLURM_NTASKS") or 1, _int("SLURM_LOCALID") or 0)
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Only the main process writes the MAPS."""
        return self.rank == 0

    def start(self, gpu: bool, timeout_minutes: float = 30) -> None:
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.size))
        backend = "nccl" if gpu and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=self.size,
                                    timeout=timedelta(minutes=timeout_minutes))
        except (RuntimeError, ValueError) as error:
            raise PeerLostError(f"rank {self.rank}: cannot join the other {self.size - 1} process(es) at "
                                f"{os.environ.get('MASTER_ADDR')}:{os.environ['MASTER_PORT']} ({_first_line(error)}); "
                                "check MASTER_ADDR/MASTER_PORT or start with torchrun") from None

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """The main process's value, on every process."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's value, in rank order, on every process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def lost(self, error: BaseException) -> PeerLostError:
        return PeerLostError(f"rank {self.rank} of {self.size}: another training process stopped "
                             f"({_first_line(error)}); every process stops: run the same command again, on any "
                             "number of processes, to resume from the last completed epoch")


def _first_line(error: BaseException) -> str:
    """gloo's and NCCL's messages without their source-file prefix, first sentence only."""
    import re

    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    return text.split(". ")[0][:160]


def lost_peer(error: BaseException) -> bool:
    """Whether torch.distributed raised `error` because a peer died or stopped answering (not a bug of ours)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    words = ("gloo", "nccl", "connection", "peer", "socket", "timed out", "stopped by signal")
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in words)
