"""Where and how a network runs: the device and precision, seeds, memory layout, and the order of the data.

One sampler for every run, torch's DistributedSampler seeded by (seed, epoch): N data-parallel processes each
take every N-th input of the order one process sees, and a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from clinicadl_app.core.config import Train
from clinicadl_app.core.distributed import World


@dataclass
class Device:
    device: torch.device
    amp_dtype: torch.dtype | None

    @classmethod
    def choose(cls, settings: Train, world: World | None = None) -> Device:
        if settings.gpu and torch.cuda.is_available():
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if settings.amp else None
            return cls(torch.device("cuda", world.local_rank) if world and world.distributed
                       else torch.device("cuda"), dtype)
        return cls(torch.device("cpu"), torch.bfloat16 if settings.amp else None)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:  # one input shape per run: cuDNN times its kernels once and keeps the fastest
        torch.backends.cudnn.benchmark = True


def memory_format(model: nn.Module, settings: Train) -> torch.memory_format:
    if not settings.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if len(model_in_shape(model)) == 4 else torch.channels_last



def model_in_shape(model: nn.Module) -> tuple[int, ...]:
    return tuple(model.in_shape)


def loader(dataset, batch_size: int, settings: Train, device: Device, epoch: int | None = None,
           world: World | None = None) -> DataLoader:
    """Shuffled by torch's DistributedSampler, seeded by (seed, epoch), when `epoch` is given: the order survives
    a resume, and N processes each take every N-th input of the order one process would see (padded by a few
    repeated inputs when the set does not divide by N)."""
    common = dict(num_workers=settings.num_workers, pin_memory=device.device.type == "cuda", persistent_workers=False)
    if epoch is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    from torch.utils.data.distributed import DistributedSampler

    world = world or World()
    sampler = DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=settings.seed * 1_000_003)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size // world.size, sampler=sampler, **common)


def shard(dataset, world: World | None):
    """This process's interleaved share of an evaluation set (no padding: evaluation has no collective)."""
    if world is None or not world.distributed:
        return dataset
    return Subset(dataset, range(world.rank, len(dataset), world.size))
