"""An autoencoder derived from any CNN, as ClinicaDL's CNN_Transformer builds it.

The encoder is the CNN's convolutions (pooling returns its indices); the decoder mirrors them with
transposed convolutions and CropMaxUnpool, ReLU moved before each transposed convolution.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .cnn import CNN
from .fused import run_layer
from .layers import CropMaxUnpool, PadMaxPool


class AutoEncoder(nn.Module):
    def __init__(self, cnn: CNN):
        super().__init__()
        self.in_shape = cnn.in_shape
        self.encoder = copy.deepcopy(cnn.convolutions)
        for layer in self.encoder:
            if isinstance(layer, PadMaxPool):
                layer.return_indices = True
        self.decoder = nn.Sequential(*_mirror(self.encoder))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        saved = []
        for layer in self.encoder:
            if isinstance(layer, PadMaxPool):
                x, indices, pad = layer(x)
                saved.append((indices, pad))
            else:
                x = run_layer(layer, x)
        for layer in self.decoder:
            x = layer(x, *saved.pop()) if isinstance(layer, CropMaxUnpool) else run_layer(layer, x)
        if x.shape[2:] != size:  # strided convolutions may round sizes: crop or pad back
            x = x[(slice(None), slice(None), *(slice(0, s) for s in size))]
            pad = [p for s, o in zip(reversed(size), reversed(x.shape[2:]), strict=True) for p in (0, s - o)]
            x = nn.functional.pad(x, pad)
        return x


def _mirror(encoder: nn.Sequential) -> list[nn.Module]:
    inverse: list[nn.Module] = []
    for layer in encoder:
        if isinstance(layer, nn.Conv3d | nn.Conv2d):
            transpose = nn.ConvTranspose3d if isinstance(layer, nn.Conv3d) else nn.ConvTranspose2d
            inverse.append(transpose(layer.out_channels, layer.in_channels, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding))
        elif isinstance(layer, PadMaxPool):
            inverse.append(CropMaxUnpool(layer.kernel_size, layer.stride, layer.spatial_dims))
        else:
            inverse.append(copy.deepcopy(layer))
    # ReLU before each transposed convolution (ClinicaDL: "gives empirically better results")
    conv_at = relu_at = -1
    for index, layer in enumerate(inverse):
        if isinstance(layer, nn.ConvTranspose3d | nn.ConvTranspose2d):
            conv_at = index
        elif isinstance(layer, nn.ReLU | nn.LeakyReLU):
            relu_at = index
        if conv_at != -1 and relu_at != -1:
            inverse[relu_at], inverse[conv_at] = inverse[conv_at], inverse[relu_at]
            conv_at = relu_at = -1
    for index, layer in enumerate(inverse):
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and index + 1 < len(inverse):
            following = inverse[index + 1]
            if hasattr(following, "out_channels"):
                inverse[index] = type(layer)(following.out_channels)
    inverse.reverse()
    return inverse
