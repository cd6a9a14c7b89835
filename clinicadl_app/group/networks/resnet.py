"""ResNet-18 for 2D slices, as ClinicaDL wraps it (convolutions -> fc 1000 -> dropout -> out).

ClinicaDL downloads ImageNet weights at run time; here the network starts from random weights, or from a
file the user provides (`pretrained_weights`, pretrained.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .cnn import CNN, output_shape
from .pretrained import load_pretrained


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(in_planes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet18(in_shape: tuple[int, ...], output_size: int, dropout: float = 0.5,
             pretrained_weights: Path | None = None) -> CNN:
    if len(in_shape) != 3:
        raise ValueError(f"resnet18 takes 2D slices (channels, height, width), not inputs of shape {in_shape}")
    stem = [nn.Conv2d(in_shape[0], 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    stages = [_stage(64, 64, 2, 1), _stage(64, 128, 2, 2), _stage(128, 256, 2, 2), _stage(256, 512, 2, 2)]
    trunk = nn.Sequential(*stem, *stages)
    height, width = output_shape(trunk, in_shape)[1:]
    convolutions = nn.Sequential(*stem, *stages, nn.AvgPool2d((height, width), stride=1))
    for module in convolutions.modules():
        if isinstance(module, nn.Conv2d):
            fan = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan))
    fc = nn.Sequential(nn.Flatten(), nn.Linear(512, 1000))
    fc.add_module("drop_out", nn.Dropout(p=dropout))
    fc.add_module("fc_out", nn.Linear(1000, output_size))
    model = CNN(convolutions, fc, in_shape)
    return model if pretrained_weights is None else load_pretrained(model, pretrained_weights)
