"""TensorFlow 1 numerics where they differ from PyTorch's (recipe field model.framework = tf1).

The original code base (TF 1.4 / tensorpack, reference/recipes.md) computed three things
differently from PyTorch's defaults; a `tf1` model reproduces them, a `pytorch` model uses
PyTorch's own:

- "SAME" padding of strided layers: TF pads pad_total = max((out - 1) * stride + k - in, 0)
  with floor(pad_total / 2) before and the rest after (the extra pixel at the bottom/right);
  PyTorch's padding is symmetric. They differ on even input sizes (512, 1024): conv0 7x7/2 on
  512 pads 2/3 in TF, 3/3 in PyTorch. (TF's conv2d / max_pool "SAME" documentation.)
- `tf.image.resize_bilinear(x, size)` with the TF 1.x default align_corners=False and no
  half-pixel centres: source coordinate = destination x in/out, the upper neighbour clamped
  to the last row (TF < 1.13; tensorflow/tensorflow#6720). PyTorch's align_corners=False
  samples at (destination + 0.5) x in/out - 0.5.
- `conv2d_transpose` 3x3 stride 2 "SAME": input pixel i feeds output rows 2i .. 2i+2 and the
  output is the first 2H rows of the full (2H+1) result; PyTorch's padding=1/output_padding=1
  is shifted by one pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FRAMEWORKS = ("tf1", "pytorch")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one axis of `size` pixels."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding computed from the input size (its own `padding` is
    ignored); the same parameters and state-dict keys as nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = same_padding(x.shape[-2], kh, sh, dh)
        left, right = same_padding(x.shape[-1], kw, sw, dw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with TF "SAME" padding (padded positions never win, as in TF)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, k, s, 0)


def conv2d(framework: str, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
           bias: bool = False, groups: int = 1) -> nn.Conv2d:
    """A conv with "SAME" output size: TF's asymmetric padding under tf1 when strided,
    PyTorch's symmetric padding otherwise (the two agree for stride 1 and odd kernels)."""
    cls = SameConv2d if framework == "tf1" and stride > 1 else nn.Conv2d
    return cls(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation,
               bias=bias, groups=groups)


def max_pool(framework: str) -> nn.MaxPool2d:
    """The stem's 3x3 stride-2 pool."""
    return SameMaxPool2d(3, stride=2) if framework == "tf1" else nn.MaxPool2d(3, stride=2, padding=1)


def _legacy_taps(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = in_size / out_size
    src = torch.arange(out_size, device=device, dtype=torch.float64) * scale
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, (src - low).to(torch.float32)


def resize_bilinear(x: torch.Tensor, size, framework: str) -> torch.Tensor:
    """Bilinear resize of [N, C, h, w] to size (H, W): TF 1.x's resize_bilinear (legacy
    mapping, see the module docstring) under tf1, F.interpolate(align_corners=False) under
    pytorch. Differentiable; float32 arithmetic for the tf1 taps."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if framework != "tf1":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y0, y1, wy = _legacy_taps(x.shape[-2], size[0], x.device)
    x0, x1, wx = _legacy_taps(x.shape[-1], size[1], x.device)
    wy = wy.to(x.dtype).view(-1, 1)
    wx = wx.to(x.dtype)
    rows = x.index_select(-2, y0) * (1 - wy) + x.index_select(-2, y1) * wy
    return rows.index_select(-1, x0) * (1 - wx) + rows.index_select(-1, x1) * wx


class Deconv(nn.Module):
    """3x3 stride-2 transposed conv (with bias) to an exact output size: tf1 = TF's "SAME"
    conv2d_transpose, i.e. the adjoint of a "SAME" 3x3 stride-2 conv from the output size: the
    full (padding 0) result cut from the forward conv's padding before (0 rows for an even
    target 2H, 1 for an odd one); pytorch = PyTorch's padding=1 with the output_padding the
    size needs."""

    def __init__(self, channels: int, framework: str):
        super().__init__()
        self.framework = framework
        self.conv = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=0 if framework == "tf1" else 1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        h, w = int(size[0]), int(size[1])
        if self.framework == "tf1":
            top, left = same_padding(h, 3, 2)[0], same_padding(w, 3, 2)[0]
            return self.conv(x)[..., top:top + h, left:left + w]
        return self.conv(x, output_size=[h, w])
