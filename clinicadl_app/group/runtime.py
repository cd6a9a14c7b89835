"""Where and how a network runs: the device and precision, seeds, memory layout, and the order of the data.

The order of an epoch depends on (seed, epoch) only: N data-parallel processes each take every N-th input of
the order one process draws, and a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from clinicadl_app.core.config import Train
from clinicadl_app.core.distributed import World

log = logging.getLogger(__name__)

# torch repeats this at every epoch's loader, as a Python warning on the terminal; fit.py logs it once per fold
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


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
        if settings.amp and not native_bfloat16():
            _warn_once("--amp: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 runs in "
                       "emulation, measured ~10x slower than float32 on an AVX2 CPU; train without --amp here")
        return cls(torch.device("cpu"), torch.bfloat16 if settings.amp else None)

    def __str__(self) -> str:
        """What ran it, for the records: 'cpu, float32' or 'cuda (NVIDIA H100 80GB HBM3), bfloat16'."""
        name = f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""
        precision = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        return f"{self.device.type}{name}, {precision}"

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86: AVX512-BF16 or AMX; other architectures: assumed)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:  # one input shape per run: cuDNN times its kernels once and keeps the fastest
        torch.backends.cudnn.benchmark = True


def channels_last(model: nn.Module) -> torch.memory_format:
    return torch.channels_last_3d if len(model_in_shape(model)) == 4 else torch.channels_last


def memory_format(model: nn.Module) -> torch.memory_format:
    """The layout the model's weights are in: its inputs follow it."""
    last = channels_last(model)
    for weight in model.parameters():  # a 1-channel or 1x1 kernel is both contiguous and channels-last
        if weight.dim() == len(model_in_shape(model)) + 1 and weight.shape[1] > 1 and max(weight.shape[2:]) > 1:
            return torch.contiguous_format if weight.is_contiguous() else last
    return torch.contiguous_format


def choose_memory_format(model: nn.Module, settings: Train, device: Device, batch_size: int,
                         world: World | None = None) -> torch.memory_format:
    """Which layout trains faster depends on the CPU (its oneDNN kernels, AVX-512, AMX) and the precision.

    auto is a rule from measurements, so that two runs of one command give the same bits: channels-last, where
    the CPU's BatchNorm-ReLU-pool blocks run fused (networks/fused.py), in float32 and in bfloat16 (an AVX2
    EPYC, batch 4 of 1 mm images, fp32: 1.05 img/s vs 0.95 contiguous; an AVX512-BF16 EPYC, a bfloat16 step:
    4.0 vs 1.9; an AMX Xeon: bf16 1.90 vs 1.22, fp32 1.81 vs 1.02; an H200: bf16 185 vs 44). probe times one
    training step of each layout here and takes the faster: fastest, but a timing then decides the rounding of
    the result, so --deterministic uses the rule instead.
    """
    rule = channels_last(model)
    if settings.memory_layout == "channels_last":
        return channels_last(model)
    if settings.memory_layout == "contiguous":
        return torch.contiguous_format
    if settings.memory_layout == "auto":
        return rule
    if settings.deterministic:
        _warn_once("--memory_layout probe is not used with --deterministic: a timing must not decide the bits of "
                   "a result (layout from the auto rule)")
        return rule
    world = world or World()
    key = (type(model).__name__, model_in_shape(model), sum(p.numel() for p in model.parameters()), batch_size,
           str(device.device), device.amp_dtype)
    if key in _CHOSEN:  # one probe per network shape: not one per fold or per part
        return _CHOSEN[key]
    seconds = {}
    if world.main:
        for fmt in (channels_last(model), torch.contiguous_format):
            seconds[fmt] = step_seconds(model, fmt, device, batch_size)
    faster = world.broadcast(str(min(seconds, key=seconds.get)) if seconds else None)
    fmt = channels_last(model) if faster == str(channels_last(model)) else torch.contiguous_format
    if seconds:
        log.info("memory layout: %s (one training step of batch %d: %s)",
                 "channels-last" if fmt != torch.contiguous_format else "contiguous", batch_size,
                 ", ".join(f"{'channels-last' if f != torch.contiguous_format else 'contiguous'} {s:.2f} s"
                           for f, s in seconds.items()))
    _CHOSEN[key] = fmt
    return fmt


_CHOSEN: dict[tuple, torch.memory_format] = {}


def step_seconds(model: nn.Module, fmt: torch.memory_format, device: Device, batch_size: int) -> float:
    """Forward and backward of a copy of the model on random inputs (after one warm-up step); the model, its
    BatchNorm statistics and the random number generators are left as they were."""
    import copy
    import time

    trial = copy.deepcopy(model).to(device.device, memory_format=fmt).train()
    with torch.random.fork_rng(devices=[device.device] if device.device.type == "cuda" else []):
        inputs = torch.rand(batch_size, *model_in_shape(model), device=device.device).contiguous(memory_format=fmt)
        elapsed = 0.0
        for _ in range(2):
            start = time.perf_counter()
            with device.autocast():
                output = trial(inputs)
            output.float().sum().backward()
            if device.device.type == "cuda":
                torch.cuda.synchronize(device.device)
            elapsed = time.perf_counter() - start
    return elapsed


def first_activation_bytes(model: nn.Module, batch_size: int, device: Device) -> int:
    """The first convolution's output for one batch: the largest activation of a CNN over whole images, kept for
    backward and matched by its gradient, so a training step's fresh memory is at least twice this."""
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if conv is None:
        return 0
    inputs = torch.empty(batch_size, conv.in_channels, *model_in_shape(model)[1:], device="meta")
    shape = conv._conv_forward(inputs, conv.weight.to("meta"), None).shape
    return math.prod(shape) * (device.amp_dtype.itemsize if device.amp_dtype else 4)


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
