"""Built-in architectures and how to plug your own.

"random" is ClinicaDL's random-search family, described by the [train] settings n_convblocks,
first_conv_width, n_conv, channels_limit, d_reduction, network_normalization and n_fcblocks.
A custom architecture is named "package.module:function" (importable from PYTHONPATH); the function is
called as function(in_shape, output_size, dropout) and returns an nn.Module mapping a batch of shape
(N, *in_shape) to (N, output_size). To be usable as an autoencoder or a transfer source it must hold its
feature extractor in `.convolutions` (an nn.Sequential), as the built-in networks do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .autoencoder import AutoEncoder
from .cnn import CNN, conv4_fc3, conv5_fc3, output_shape, stride_conv5_fc3
from .pretrained import PretrainedWeightsError
from .random import RandomSpec, random_cnn
from .resnet import resnet18

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "Conv5_FC3": conv5_fc3,
    "Conv4_FC3": conv4_fc3,
    "Stride_Conv5_FC3": stride_conv5_fc3,
    "resnet18": resnet18,
    "random": random_cnn,
}


class ArchitectureError(ValueError):
    """The architecture is unknown or does not fit the input."""


def build_network(architecture: str, in_shape: tuple[int, ...], output_size: int, dropout: float = 0.5,
                  autoencoder: bool = False, pretrained_weights: Path | None = None,
                  random: RandomSpec | None = None) -> nn.Module:
    """`random`: the description of the "random" architecture (ClinicaDL's random-search family)."""
    factory = _factory(architecture)
    if pretrained_weights is not None and factory is not resnet18:
        raise ArchitectureError(f"pretrained_weights start resnet18 only, not {architecture}; to start from a "
                                "trained MAPS use --transfer_path, whose source is checked against the test set")
    kwargs: dict = {"pretrained_weights": pretrained_weights} if factory is resnet18 else {}
    if factory is random_cnn:
        kwargs["spec"] = random or RandomSpec()
    try:
        model = factory(tuple(in_shape), output_size, dropout, **kwargs)
        if autoencoder:
            if not isinstance(getattr(model, "convolutions", None), nn.Sequential):
                raise ArchitectureError(f"{architecture} has no .convolutions: it cannot become an autoencoder")
            model = AutoEncoder(model)
        out = output_shape(model, tuple(in_shape))
    except (ArchitectureError, PretrainedWeightsError):
        raise
    except (RuntimeError, ValueError) as error:
        raise ArchitectureError(f"{architecture} does not fit inputs of shape {tuple(in_shape)}: {error}") from None
    expected = tuple(in_shape) if autoencoder else (output_size,)
    if out != expected:
        raise ArchitectureError(f"{architecture} maps {tuple(in_shape)} to {out}, expected {expected}")
    return model


def _factory(architecture: str) -> Callable[..., nn.Module]:
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    if ":" in architecture:
        module_name, _, name = architecture.partition(":")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise ArchitectureError(f"cannot import custom architecture '{architecture}': {error}") from None
    raise ArchitectureError(
        f"unknown architecture '{architecture}'; built-in: {', '.join(ARCHITECTURES)}, or 'package.module:function'"
    )


__all__ = ["ARCHITECTURES", "ArchitectureError", "AutoEncoder", "CNN", "PretrainedWeightsError", "RandomSpec",
           "build_network"]
