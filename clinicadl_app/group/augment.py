"""On-the-fly augmentation of training inputs (never validation or test).

Intensity and artefact transforms come from TorchIO; erasing and crop-pad follow ClinicaDL's. Each item
is transformed under its own seed (seed, epoch, index), so a run is reproducible whatever the number of
data-loading processes, and any training input can be replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


def _erasing(x: torch.Tensor) -> torch.Tensor:
    """Zero a random box of 10-30 % of each side (ClinicaDL's RandomErasing, in 2D or 3D)."""
    out = x.clone()
    box = []
    for size in x.shape[1:]:
        length = max(1, int(size * float(torch.empty(1).uniform_(0.1, 0.3))))
        start = int(torch.randint(0, size - length + 1, (1,)))
        box.append(slice(start, start + length))
    out[(slice(None), *box)] = 0
    return out


def _crop_pad(x: torch.Tensor, shift: int = 10) -> torch.Tensor:
    """Shift the content by up to `shift` voxels per axis, filling with zeros (ClinicaDL's RandomCropPad)."""
    out = torch.zeros_like(x)
    source, target = [slice(None)], [slice(None)]
    for size in x.shape[1:]:
        move = int(torch.randint(-shift, shift + 1, (1,)))
        source.append(slice(max(0, -move), size - max(0, move)))
        target.append(slice(max(0, move), size - max(0, -move)))
    out[tuple(target)] = x[tuple(source)]
    return out


def _torchio(name: str) -> Transform:
    import torchio as tio

    transform = {
        "Noise": lambda: tio.RandomNoise(std=(0, 0.05)),
        "Smoothing": lambda: tio.RandomBlur(std=(0, 1)),
        "Motion": lambda: tio.RandomMotion(degrees=5, translation=5, num_transforms=2),
        "Ghosting": lambda: tio.RandomGhosting(num_ghosts=(4, 10)),
        "Spike": lambda: tio.RandomSpike(num_spikes=1, intensity=(1, 3)),
        "BiasField": lambda: tio.RandomBiasField(coefficients=0.5),
        "Flip": lambda: tio.RandomFlip(axes=(0,), flip_probability=0.5),
    }[name]()

    def apply(x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 3  # a 2D slice (C, H, W): TorchIO wants (C, W, H, D)
        volume = x.unsqueeze(-1) if flat else x
        out = transform(volume.float())
        return out.squeeze(-1) if flat else out

    return apply


def build(names: tuple[str, ...]) -> Transform | None:
    if not names:
        return None
    steps = [_erasing if n == "Erasing" else _crop_pad if n == "CropPad" else _torchio(n) for n in names]

    def compose(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return compose


def seeded(transform: Transform, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply `transform` under its own seed without disturbing the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(x)
