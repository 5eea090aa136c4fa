"""Multi-level decoders on a plain (output stride 32) ResNet: the original's FPN, its
`fpn.bilinear` and `fpn.standard` versions, and GCN ("Large Kernel Matters", Peng et al. 2017).

All of them work at `num_classes` channels throughout (the laterals map C2..C5 straight
to class maps), go top-down from C5 to C2 (stride 4), then take two more upsampling
steps to the full input resolution, so their output needs no final resize:

    P5 = lat5(C5)
    Pi = lat_i(C_i) + up_i(P_{i+1})            i = 4, 3, 2    (then merge_i(Pi) if any)
    out = final_2(up(final_1(up(P2))))       stride 4 -> 2 -> 1

| decoder      | lateral                     | up                                  | merge        | final block  |
|--------------|-----------------------------|-------------------------------------|--------------|--------------|
| fpn          | residual basic block C->K   | 3x3 stride-2 transposed conv+BN+ReLU| -            | basic block  |
| fpn.bilinear | residual basic block C->K   | bilinear                            | -            | basic block  |
| fpn.standard | residual basic block C->K   | bilinear                            | basic block  | basic block  |
| gcn          | GCN (k=15) then BR          | 3x3 stride-2 transposed conv+BN+ReLU| BR           | BR           |

(K = num_classes, BR = Boundary Refinement x + conv3(relu(conv3(x))).) The last final
block has no closing ReLU, so logits can be negative. Every upsampling step targets the
exact size of the level it joins (transposed convs get `output_size`), so odd input sizes
such as 65x65 come out at 65x65.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FPN_STYLES = ("fpn", "fpn.bilinear", "fpn.standard", "gcn")


class ResidualBlock(nn.Module):
    """A basic residual block cin -> cout (1x1 conv + BN shortcut when cin != cout)."""

    def __init__(self, cin: int, cout: int, relu_out: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )
        self.relu_out = relu_out
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.relu_out else out


class GlobalConv(nn.Module):
    """GCN block: (kx1 -> 1xk) + (1xk -> kx1), no nonlinearity, summed. The two branches
    take the two different orders (the original had both in the same order)."""

    def __init__(self, cin: int, cout: int, k: int = 15):
        super().__init__()
        p = k // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cout, (k, 1), padding=(p, 0)), nn.Conv2d(cout, cout, (1, k), padding=(0, p))
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, cout, (1, k), padding=(0, p)), nn.Conv2d(cout, cout, (k, 1), padding=(p, 0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """BR block of the GCN paper: x + conv3(relu(conv3(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Up(nn.Module):
    """x2 upsampling to an exact size: transposed conv (+BN+ReLU) or bilinear."""

    def __init__(self, channels: int, deconv: bool):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, bias=False) if deconv else None
        self.bn = nn.BatchNorm2d(channels) if deconv else None

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.deconv is None:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.deconv(x, output_size=list(size))))


class FPNDecoder(nn.Module):
    """See the module docstring. `lateral_extra(K)` builds the module applied to each
    lateral output before the top-down sum (learnable Sobel on the laterals)."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        style: str = "fpn",
        lateral_extra: Callable[[int], nn.Module] | None = None,
        gcn_k: int = 15,
    ):
        super().__init__()
        if style not in FPN_STYLES:
            raise ValueError(f"unknown FPN style {style!r}")
        k = num_classes
        self.style = style
        gcn = style == "gcn"
        deconv = style in ("fpn", "gcn")
        if gcn:
            self.laterals = nn.ModuleList(nn.Sequential(GlobalConv(c, k, gcn_k), BoundaryRefine(k)) for c in in_channels)
        else:
            self.laterals = nn.ModuleList(ResidualBlock(c, k) for c in in_channels)
        self.lateral_extras = nn.ModuleList(lateral_extra(k) for _ in in_channels) if lateral_extra else None
        self.ups = nn.ModuleList(Up(k, deconv) for _ in range(len(in_channels) - 1))
        if gcn:
            self.merges = nn.ModuleList(BoundaryRefine(k) for _ in range(len(in_channels) - 1))
        elif style == "fpn.standard":
            self.merges = nn.ModuleList(ResidualBlock(k, k) for _ in range(len(in_channels) - 1))
        else:
            self.merges = None
        self.final_ups = nn.ModuleList(Up(k, deconv) for _ in range(2))
        if gcn:
            self.finals = nn.ModuleList(BoundaryRefine(k) for _ in range(2))
        else:
            self.finals = nn.ModuleList([ResidualBlock(k, k), ResidualBlock(k, k, relu_out=False)])

    def _lateral(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.laterals[i](x)
        return x if self.lateral_extras is None else self.lateral_extras[i](x)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        n = len(feats)
        p = self._lateral(n - 1, feats[-1])
        for i in range(n - 2, -1, -1):
            p = self._lateral(i, feats[i]) + self.ups[i](p, feats[i].shape[-2:])
            if self.merges is not None:
                p = self.merges[i](p)
        # stride 4 -> 2 -> 1: the stem conv's output size is ceil(H/2)
        h, w = int(size[0]), int(size[1])
        for up, block, target in zip(self.final_ups, self.finals, ((-(-h // 2), -(-w // 2)), (h, w)), strict=True):
            p = block(up(p, target))
        return p
