"""Where and how a network runs: the device and precision, seeds, memory layout, and the order of the data.

The order of an epoch depends on (seed, epoch) only: N data-parallel processes each take every N-th input of
the order one process draws, and a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

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
    """Shuffled with a generator seeded by (seed, epoch) when `epoch` is given, so the order survives a resume.
    Several processes each take every N-th input of the order one process draws (SharedOrder), so together they
    see one process's batches, and a checkpoint resumes on any number of processes."""
    common = dict(num_workers=settings.num_workers, pin_memory=device.device.type == "cuda", persistent_workers=False)
    if epoch is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    seed = settings.seed * 1_000_003 + epoch
    generator = torch.Generator().manual_seed(seed)
    if world is None or not world.distributed:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **common)
    sampler = SharedOrder(dataset, world.size, world.rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size // world.size, sampler=sampler, generator=generator, **common)


class SharedOrder(DistributedSampler):
    """torch's DistributedSampler (padding, interleaved shares) over the permutation a one-process
    DataLoader(shuffle=True, generator) draws: that DataLoader first takes one int64 from its generator (its
    workers' base seed), then the permutation. tests/test_distributed.py checks the equality end to end."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / len(order)))[:padding] if padding > 0 else []
        return iter(order[self.rank:self.total_size:self.num_replicas])


def shard(dataset, world: World | None):
    """This process's interleaved share of an evaluation set (no padding: evaluation has no collective)."""
    if world is None or not world.distributed:
        return dataset
    return Subset(dataset, range(world.rank, len(dataset), world.size))
