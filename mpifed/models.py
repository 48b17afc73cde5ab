"""Model registry: torchvision's own classes, adapted to small images and any class count, and LEAF's LSTM.

The image models take (N, C, H, W) inputs at the data's own size; the VGGs need 32x32 (five
poolings), so the data layer pads smaller images for them (MIN_SIDE). The ResNets
get the usual CIFAR stem (3x3 conv, stride 1, no max-pool) because the ImageNet stem would shrink a
32x32 image to 8x8 before the first block; the VGGs get a global-pool head (512 -> classes) instead
of the 25088x4096 ImageNet classifier, which would hold 90% of the parameters for no accuracy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

ModelBuilder = Callable[[int, int], nn.Module]
MODELS: dict[str, ModelBuilder] = {}

MIN_SIDE = {"vgg11": 32, "vgg11_bn": 32}
"""Smallest image side a built-in model takes; smaller images are zero-padded to it."""

TOKEN_MODELS = ("leaf-lstm",)
"""Built-in models of token ids (a next-token task); the others take float images (classification)."""


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return add


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build model `name` for `num_classes` outputs and `in_channels` input planes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, in_channels)


class SmallCNN(nn.Module):
    """Three conv layers and a linear head: trains to well above chance in seconds on one CPU core."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("cnn")
def _cnn(num_classes: int, in_channels: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


def _cifar_resnet(model: tvm.ResNet, in_channels: int) -> tvm.ResNet:
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register("resnet18")
def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    return _cifar_resnet(tvm.resnet18(weights=None, num_classes=num_classes), in_channels)


@register("resnet50")
def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    return _cifar_resnet(tvm.resnet50(weights=None, num_classes=num_classes), in_channels)


def _cifar_vgg(model: tvm.VGG, num_classes: int, in_channels: int) -> tvm.VGG:
    first = model.features[0]
    if in_channels != first.in_channels:
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, num_classes)
    return model


@register("vgg11")
def _vgg11(num_classes: int, in_channels: int) -> nn.Module:
    return _cifar_vgg(tvm.vgg11(weights=None, num_classes=num_classes), num_classes, in_channels)


@register("vgg11_bn")
def _vgg11_bn(num_classes: int, in_channels: int) -> nn.Module:
    return _cifar_vgg(tvm.vgg11_bn(weights=None, num_classes=num_classes), num_classes, in_channels)


@register("leaf-lstm")
def _leaf_lstm(num_classes: int, in_channels: int) -> nn.Module:
    """LEAF's Shakespeare model; `num_classes` is the vocabulary size (in_channels is not used)."""
    from mpifed.learn.shakespeare import CharLSTM

    return CharLSTM(num_classes)
