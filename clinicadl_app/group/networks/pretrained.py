"""Starting weights from a file the user provides (no download): a ResNet-18 state dict as torchvision saves
it (resnet18-f37072fd.pth, the ImageNet file ClinicaDL downloads at run time), or with the layer names that
ClinicaDL and this app give it (a bare state dict or a checkpoint's "model")."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("clinicadl_app")

TORCHVISION_NAMES = (("conv1.", "convolutions.0."), ("bn1.", "convolutions.1."), ("layer1.", "convolutions.4."),
                     ("layer2.", "convolutions.5."), ("layer3.", "convolutions.6."), ("layer4.", "convolutions.7."),
                     ("fc.", "fc.1."))
_announced: set[Path] = set()


class PretrainedWeightsError(ValueError):
    """The weights file is missing, unreadable, or matches none of the network's layers."""


def _our_name(name: str) -> str:
    for theirs, ours in TORCHVISION_NAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def _read(path: Path) -> dict[str, torch.Tensor]:
    fix = "fix [train] pretrained_weights"
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: no such file; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike for a file it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedWeightsError(f"{path}: not a torch state dict ({reason}); {fix}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: holds no state dict (names to tensors); {fix}")
    return {_our_name(name): value for name, value in state.items()}


def load_pretrained(model: nn.Module, path: Path) -> nn.Module:
    """Every tensor whose name and shape match is loaded; the rest (the new output layer) keeps its random
    start. A 3-channel first convolution goes into a 1-channel one as the sum of its filters: on a grey image
    that is exactly what the RGB network computes on three equal channels (--slice_mode rgb)."""
    own = model.state_dict()
    usable = {}
    for name, value in _read(path).items():
        target = own.get(name)
        if target is None:
            continue
        if value.dim() == 4 and value.shape != target.shape and target.shape[1] == 1 \
                and (value.shape[0], *value.shape[2:]) == (target.shape[0], *target.shape[2:]):
            value = value.sum(1, keepdim=True)
        if value.shape == target.shape:
            usable[name] = value
    if not usable:
        raise PretrainedWeightsError(f"{path}: no tensor matches the network's layers (names or shapes); fix "
                                     "[train] pretrained_weights")
    model.load_state_dict(usable, strict=False)
    if path not in _announced:
        _announced.add(path)
        log.info("pretrained weights: %d of the network's %d tensors from %s", len(usable), len(own), path)
    return model
