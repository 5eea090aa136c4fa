"""Classifiers on res5: DeepLab v2's `naked` (one atrous conv) and `aspp` (four, summed), and
the basic-block classifier of the original's plain ResNet-101 (`resnet101`, cs.resnet101)."""

from __future__ import annotations

import torch
from torch import nn

from segdist.models.init import init_conv


def _atrous_classifier(cin: int, num_classes: int, rate: int, bias: bool, init: str) -> nn.Conv2d:
    """3x3 conv of dilation `rate`. init pytorch: N(0, 0.01) (DeepLab's caffe classifier);
    tensorpack: AtrousConv2D's variance_scaling_initializer() (factor 2, fan_in 9 cin, truncated)."""
    conv = nn.Conv2d(cin, num_classes, 3, padding=rate, dilation=rate, bias=bias)
    if init == "tensorpack":
        init_conv(conv, init, mode="fan_in")
    else:
        nn.init.normal_(conv.weight, std=0.01)
        if bias:
            nn.init.zeros_(conv.bias)
    return conv


class NakedHead(nn.Module):
    """`naked`: one 3x3 atrous conv (rate 6) from res5 to the class logits (the original's
    `aspp6_conv`; with a bias in the scripts of December 2017)."""

    def __init__(self, cin: int, num_classes: int, rate: int = 6, bias: bool = True, init: str = "pytorch"):
        super().__init__()
        self.classifier = _atrous_classifier(cin, num_classes, rate, bias, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class ASPPHead(nn.Module):
    """DeepLab v2 ASPP: four single-conv branches (rates 6/12/18/24) summed."""

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24), bias: bool = True,
                 init: str = "pytorch"):
        super().__init__()
        self.branches = nn.ModuleList(_atrous_classifier(cin, num_classes, r, bias, init) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class BasicBlockHead(nn.Module):
    """`resnet101` (experiments/resnet_model.py, cs.resnet101): resnet_basicblock(res5 -> classes)
    inside the backbone's argscope: conv3x3 + BN + ReLU, conv3x3 + BN (gamma 0 under tensorpack
    init), plus a 1x1 conv + BN shortcut; no biases, no final ReLU; fan_out init."""

    def __init__(self, cin: int, num_classes: int, init: str = "pytorch"):
        super().__init__()
        bn = nn.BatchNorm2d
        self.conv1 = nn.Conv2d(cin, num_classes, 3, padding=1, bias=False)
        self.bn1 = bn(num_classes)
        self.conv2 = nn.Conv2d(num_classes, num_classes, 3, padding=1, bias=False)
        self.bn2 = bn(num_classes)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, num_classes, 1, bias=False), bn(num_classes))
        for conv in (self.conv1, self.conv2, self.shortcut[0]):
            init_conv(conv, init, mode="fan_out")
        if init == "tensorpack":
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)
