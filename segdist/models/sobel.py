"""Edge and Sobel modules placed after backbone stages, on FPN laterals or on the logits.

- LearnableSobel (`learnable.sobel`, SPK): learnable 3x3 kernels restricted by fixed masks.
- SobelResBlock (`learnable.sobel.resblock`): the control, a plain residual basic block.
- FixedSobel (`sobel`, `sobellast`, `sobel.head`, `sobel-res234`): l + s * (gx^2 + gy^2).
- EdgeInput (`edge`, `edgescale`, `edge.conv3`): the Canny edge map added to features.
- StageExtras: what sits after one stage (edge input, fixed Sobel, learnable Sobel, in
  that order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Supports of the difference kernels (1 = learnable entry, 0 = always zero).
MASKS = {
    "v": ((1, 1, 1), (0, 0, 0), (1, 1, 1)),  # vertical difference: top row vs bottom row
    "h": ((1, 0, 1), (1, 0, 1), (1, 0, 1)),  # horizontal difference: left vs right column
    "d1": ((0, 1, 1), (1, 0, 1), (1, 1, 0)),  # 45 degrees: zero on the main diagonal
    "d2": ((1, 1, 0), (1, 0, 1), (0, 1, 1)),  # 135 degrees: zero on the anti-diagonal
}
# The Sobel kernels with exactly those supports (used by FixedSobel and `sobelinit`).
SOBEL = {
    "v": ((-1, -2, -1), (0, 0, 0), (1, 2, 1)),
    "h": ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1)),
    "d1": ((0, 1, 2), (-1, 0, 1), (-2, -1, 0)),
    "d2": ((-2, -1, 0), (-1, 0, 1), (0, 1, 2)),
}


class MaskedConv3x3(nn.Module):
    """A C->C 3x3 convolution (groups=C for channelwise) whose kernels are multiplied by a
    fixed 0/1 mask in every forward. Masked entries therefore get exactly zero gradient;
    they are zeroed at init and after every load_state_dict, so with SGD (momentum,
    weight decay), Adam or AdamW they stay exactly zero."""

    def __init__(self, channels: int, mask: str, channelwise: bool, init: str = "random"):
        super().__init__()
        self.groups = channels if channelwise else 1
        self.weight = nn.Parameter(torch.empty(channels, channels // self.groups, 3, 3))
        self.register_buffer("mask", torch.tensor(MASKS[mask], dtype=torch.float32), persistent=False)
        self.kernel = mask
        self.reset_parameters(init)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.apply_mask_())

    def reset_parameters(self, init: str = "random") -> None:
        with torch.no_grad():
            if init == "sobel":
                self.weight.zero_()
                kernel = torch.tensor(SOBEL[self.kernel], dtype=self.weight.dtype, device=self.weight.device)
                if self.groups == 1:  # channelcross: the Sobel kernel on the diagonal (channel c -> c)
                    idx = torch.arange(self.weight.shape[0], device=self.weight.device)
                    self.weight[idx, idx] = kernel
                else:
                    self.weight[:, 0] = kernel
            elif init == "random":  # the original's variance scaling (fan-in, scale 2)
                nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
            else:
                raise ValueError(f"unknown Sobel init {init!r}")
        self.apply_mask_()

    def apply_mask_(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, padding=1, groups=self.groups)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, mask={self.kernel}, groups={self.groups}"


class LearnableSobel(nn.Module):
    """`learnable.sobel`: c_k = masked conv k of l; returns l + sum_k f(c_k) with
    f = identity (1order) or square (2order), after an optional ReLU on c_k.
    Masks: vertical and horizontal (SPK), plus the two diagonals (SPK4)."""

    def __init__(
        self,
        channels: int,
        channelwise: bool = True,
        order: int = 2,
        relu: bool = False,
        init: str = "random",
        masks: tuple[str, ...] = ("v", "h"),
    ):
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.order, self.relu = order, relu
        self.convs = nn.ModuleList(MaskedConv3x3(channels, m, channelwise, init) for m in masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs:
            c = conv(x)
            if self.relu:
                c = F.relu(c)
            out = out + (c * c if self.order == 2 else c)
        return out


class SobelResBlock(nn.Module):
    """`learnable.sobel.resblock`: the control, relu(x + bn(conv(relu(bn(conv(x)))))) of
    the same width, in place of the masked convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def learnable_sobel(channels: int, kind: str, order: int, relu: bool, init: str) -> nn.Module:
    """The module for a Variant's learnable_sobel kind."""
    if kind == "resblock":
        return SobelResBlock(channels)
    if kind not in ("channelwise", "channelcross"):
        raise ValueError(f"unknown learnable Sobel kind {kind!r}")
    return LearnableSobel(channels, channelwise=kind == "channelwise", order=order, relu=relu, init=init)


class FixedSobel(nn.Module):
    """Fixed per-channel Sobel gx, gy; returns l + s * (gx^2 + gy^2), s a per-channel
    learnable scale initialised to 1."""

    def __init__(self, channels: int):
        super().__init__()
        kernels = torch.tensor((SOBEL["h"], SOBEL["v"]), dtype=torch.float32)  # [2,3,3]: gx, gy
        self.register_buffer("kernels", kernels.repeat(channels, 1, 1).unsqueeze(1), persistent=False)
        self.scale = nn.Parameter(torch.ones(channels))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One depthwise conv with 2 outputs per channel: [gx_c, gy_c] for each channel c.
        g = F.conv2d(x, self.kernels.to(x.dtype), padding=1, groups=self.channels)
        magnitude = (g * g).unflatten(1, (self.channels, 2)).sum(2)
        return x + self.scale.view(1, -1, 1, 1).to(x.dtype) * magnitude


class EdgeInput(nn.Module):
    """The Canny edge map (a [N,1,H,W] input in [0,1]) resized by area averaging to the
    feature size and added to the features (broadcast over channels): `add`; times a
    learnable per-channel scale initialised to 1: `scale`; through a 3x3 conv 1->C:
    `conv3`."""

    def __init__(self, mode: str, channels: int):
        super().__init__()
        if mode not in ("add", "scale", "conv3"):
            raise ValueError(f"unknown edge input mode {mode!r}")
        self.mode = mode
        if mode == "scale":
            self.scale = nn.Parameter(torch.ones(channels))
        elif mode == "conv3":
            self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        e = F.interpolate(edges.to(x.dtype), size=x.shape[-2:], mode="area")
        if self.mode == "scale":
            e = self.scale.view(1, -1, 1, 1).to(x.dtype) * e
        elif self.mode == "conv3":
            e = self.conv(e).to(x.dtype)
        return x + e


class StageExtras(nn.Module):
    """The modules after one stage, applied in order: edge input, fixed Sobel, learnable
    Sobel (or its resblock control)."""

    def __init__(self, edge: nn.Module | None = None, sobel: nn.Module | None = None, learnable: nn.Module | None = None):
        super().__init__()
        self.edge, self.sobel, self.learnable = edge, sobel, learnable

    def forward(self, x: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
        if self.edge is not None:
            x = self.edge(x, edges)
        if self.sobel is not None:
            x = self.sobel(x)
        if self.learnable is not None:
            x = self.learnable(x)
        return x
