"""DeepLabv2 classifier heads on res5: `naked` (one atrous conv) and `aspp` (four, summed)."""

from __future__ import annotations

import torch
from torch import nn


def _atrous_classifier(cin: int, num_classes: int, rate: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, num_classes, 3, padding=rate, dilation=rate, bias=True)
    nn.init.normal_(conv.weight, std=0.01)  # DeepLab's classifier init
    nn.init.zeros_(conv.bias)
    return conv


class NakedHead(nn.Module):
    """`naked`: one 3x3 atrous conv (rate 6) from res5 to the class logits."""

    def __init__(self, cin: int, num_classes: int, rate: int = 6):
        super().__init__()
        self.classifier = _atrous_classifier(cin, num_classes, rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class ASPPHead(nn.Module):
    """DeepLabv2 ASPP: four single-conv branches (rates 6/12/18/24) summed."""

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(_atrous_classifier(cin, num_classes, r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
