"""Multi-level decoders on the plain (output stride 32) ResNet, as the original built them
(experiments/resnet_model_fpn*.py, resnet_model_gcn.py; reference/recipes.md "M-FPN"):
`fpn`, `fpn.bilinear`, `fpn.standard` and `gcn` ("Large Kernel Matters", Peng et al. 2017).

All work at K = num_classes channels throughout. With lat_i the lateral of level i (C5..C2),
up_i an x2 upsampling to level i's size and bb a residual basic block K -> K:

| decoder      | lateral           | top-down                             | tail (stride 4 -> 2 -> 1)             |
|--------------|-------------------|--------------------------------------|---------------------------------------|
| fpn          | bb(C -> K)        | P_i = lat_i + deconv_i(P_{i+1})      | deconv, bb, deconv, bb                |
| fpn.bilinear | bb(C -> K)        | P_i = lat_i + resize(P_{i+1})        | resize, bb, resize, bb                |
| fpn.standard | bb(C -> K)        | P_i = lat_i + bb_i(resize(P_{i+1}))  | resize, bb, resize, bb                |
| gcn original | GCN(C -> K)       | as fpn                               | as fpn                                |
| gcn paper    | BR(GCN(C -> K))   | P_i = BR(lat_i + deconv_i(P_{i+1}))  | as fpn                                |

- bb (`resnet_basicblock`): conv3x3 + bias + BN + ReLU, conv3x3 + bias + BN (gamma 0 under
  tensorpack init), plus the input (K -> K) or a 1x1 conv + bias + BN (C -> K); no ReLU after
  the sum, so the last block's logits can be negative.
- deconv: 3x3 stride-2 transposed conv + bias, BN, ReLU (segdist.models.tf1.Deconv).
- GCN: two branches of k x 1 and 1 x k convs (k = 15, K channels in between, no bias, BN or
  nonlinearity), summed. The original ran both branches 1 x k then k x 1 (the same order
  twice) and had no Boundary Refinement; `gcn_style: paper` (segdist's default, a named fix
  of variants.md) runs k x 1 -> 1 x k and 1 x k -> k x 1 and adds the paper's BR
  x + conv3(relu(conv3(x))) after each GCN and after each top-down sum. The tail stays the
  original's in both styles.
- `lateral_extra(K)` builds the module applied to each lateral output before the sum (the
  learnable Sobel modules of the FPN rows, or their resblock control).

Every upsampling targets the exact size of the level it joins (odd sizes such as 65x65 come
out at 65x65); the tail's first target is the stem conv's output size, ceil(H / 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segdist.models import tf1
from segdist.models.init import init_conv, variance_scaling_, xavier_uniform_

FPN_STYLES = ("fpn", "fpn.bilinear", "fpn.standard", "gcn")
GCN_STYLES = ("paper", "original")


class ResidualBlock(nn.Module):
    """The original's resnet_basicblock outside the backbone: see the module docstring."""

    def __init__(self, cin: int, cout: int, init: str = "pytorch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))
        convs = [self.conv1, self.conv2] + ([] if cin == cout else [self.shortcut[0]])
        for conv in convs:
            init_conv(conv, init, mode="fan_in" if init == "tensorpack" else "fan_out")
        if init == "tensorpack":
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)


class GlobalConv(nn.Module):
    """GCN block (k x 1 and 1 x k branches, summed; see the module docstring). Its kernels are
    the `extras` parameter group: the original's `gcn_W*` were hit by no multiplier pattern."""

    param_group = "extras"

    def __init__(self, cin: int, cout: int, k: int = 15, style: str = "paper", init: str = "pytorch"):
        super().__init__()
        p = k // 2
        row = lambda c: nn.Conv2d(c, cout, (1, k), padding=(0, p), bias=False)  # noqa: E731
        col = lambda c: nn.Conv2d(c, cout, (k, 1), padding=(p, 0), bias=False)  # noqa: E731
        self.left = nn.Sequential(row(cin), col(cout)) if style == "original" else nn.Sequential(col(cin), row(cout))
        self.right = nn.Sequential(row(cin), col(cout))
        for conv in (*self.left, *self.right):
            if init == "tensorpack":
                variance_scaling_(conv.weight, k * conv.in_channels)  # TF kernel [1, k, in, out]: fan_in k * in
            else:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """BR block of the GCN paper: x + conv3(relu(conv3(x)))."""

    def __init__(self, channels: int, init: str = "pytorch"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            init_conv(conv, init, mode="fan_in" if init == "tensorpack" else "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Up(nn.Module):
    """x2 upsampling to an exact size: deconv + BN + ReLU, or a plain bilinear resize."""

    def __init__(self, channels: int, deconv: bool, framework: str = "pytorch", init: str = "pytorch"):
        super().__init__()
        self.framework = framework
        self.deconv = tf1.Deconv(channels, framework) if deconv else None
        self.bn = nn.BatchNorm2d(channels) if deconv else None
        if deconv:
            weight = self.deconv.conv.weight
            if init == "tensorpack":  # Deconv2D: xavier_initializer_conv2d(), bias 0
                xavier_uniform_(weight, 9 * channels, 9 * channels)
            else:
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.deconv.conv.bias)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.deconv is None:
            return tf1.resize_bilinear(x, size, self.framework)
        return F.relu(self.bn(self.deconv(x, size)))


class FPNDecoder(nn.Module):
    """See the module docstring."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        style: str = "fpn",
        lateral_extra: Callable[[int], nn.Module] | None = None,
        gcn_k: int = 15,
        *,
        gcn_style: str = "paper",
        framework: str = "pytorch",
        init: str = "pytorch",
    ):
        super().__init__()
        if style not in FPN_STYLES or gcn_style not in GCN_STYLES:
            raise ValueError(f"unknown FPN style {style!r} or GCN style {gcn_style!r}")
        k = num_classes
        self.style, self.framework = style, framework
        paper_gcn = style == "gcn" and gcn_style == "paper"
        deconv = style in ("fpn", "gcn")
        if style == "gcn":
            def gcn(c: int) -> nn.Module:
                block = GlobalConv(c, k, gcn_k, gcn_style, init)
                return nn.Sequential(block, BoundaryRefine(k, init)) if paper_gcn else block
            self.laterals = nn.ModuleList(gcn(c) for c in in_channels)
        else:
            self.laterals = nn.ModuleList(ResidualBlock(c, k, init) for c in in_channels)
        self.lateral_extras = nn.ModuleList(lateral_extra(k) for _ in in_channels) if lateral_extra else None
        self.ups = nn.ModuleList(Up(k, deconv, framework, init) for _ in range(len(in_channels) - 1))
        self.smooths = nn.ModuleList(ResidualBlock(k, k, init) for _ in self.ups) if style == "fpn.standard" else None
        self.merges = nn.ModuleList(BoundaryRefine(k, init) for _ in self.ups) if paper_gcn else None
        self.final_ups = nn.ModuleList(Up(k, deconv, framework, init) for _ in range(2))
        self.finals = nn.ModuleList(ResidualBlock(k, k, init) for _ in range(2))

    def _lateral(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.laterals[i](x)
        return x if self.lateral_extras is None else self.lateral_extras[i](x)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        n = len(feats)
        p = self._lateral(n - 1, feats[-1])
        for i in range(n - 2, -1, -1):
            up = self.ups[i](p, feats[i].shape[-2:])
            if self.smooths is not None:
                up = self.smooths[i](up)
            p = self._lateral(i, feats[i]) + up
            if self.merges is not None:
                p = self.merges[i](p)
        # stride 4 -> 2 -> 1: the stem conv's output size is ceil(H/2)
        h, w = int(size[0]), int(size[1])
        for up, block, target in zip(self.final_ups, self.finals, ((-(-h // 2), -(-w // 2)), (h, w)), strict=True):
            p = block(up(p, target))
        return p
