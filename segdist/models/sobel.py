"""Edge and Sobel modules placed after backbone stages, on FPN laterals or on the logits.

- LearnableSobel (`learnable.sobel`, SPK): learnable 3x3 kernels restricted by fixed masks.
- SobelResBlock (`learnable.sobel.resblock`): the control, the FPN's residual basic block.
- FixedSobel (`sobel`, `sobellast`, `sobel.head`, `sobel-res234`): l + s * f(gx^2 + gy^2).
- EdgeInput (`edge`, `edgescale`, `edge.conv3`): the Canny edge map added to features.
- StageExtras: what sits after one stage (edge input, fixed Sobel, learnable Sobel, in
  that order).

Every module here is in the `extras` parameter group (`param_group`); segdist.protocols gives
that group its rule (for the resblock control on FPN laterals the decoder's: the original's
FPN patterns hit its convs, unlike the Sobel kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segdist.models import tf1
from segdist.models.fpn import ResidualBlock
from segdist.models.init import init_conv, variance_scaling_
from segdist.models.variant import EDGE_INPUTS

# sqrt(c1^2 + c2^2) is evaluated as sqrt(max(s, SQRT_FLOOR)): the same value wherever the
# magnitude exceeds 1e-6, and a zero gradient (not NaN, TF's 0 * inf) where both responses vanish.
SQRT_FLOOR = 1e-12
LEARNABLE_FORMS = ("1order", "2order", "sqrt")
FIXED_FORMS = ("square", "sqrt", "identity")
SOBEL_INITS = ("random", "sobel")

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
    weight decay), Adam or AdamW they stay exactly zero.

    sobel_init "random" + init "tensorpack": the original's variance_scaling_initializer() on TF's
    kernel shape [3, 3, C, 1] (channelwise) or [3, 3, C, C]: fan_in 9C either way (TF reads the
    depthwise kernel's C as its input channels), std ~ sqrt(2 / 9C). "random" + "pytorch":
    Kaiming normal on the true fan-in (9 channelwise, 9C channel-cross). "sobel": the Sobel
    kernel of the mask's support (channelwise: every channel; channel-cross: channel c -> c)."""

    param_group = "extras"

    def __init__(self, channels: int, mask: str, channelwise: bool, sobel_init: str = "random", init: str = "pytorch"):
        super().__init__()
        self.groups = channels if channelwise else 1
        self.weight = nn.Parameter(torch.empty(channels, channels // self.groups, 3, 3))
        self.register_buffer("mask", torch.tensor(MASKS[mask], dtype=torch.float32), persistent=False)
        self.kernel = mask
        self.reset_parameters(sobel_init, init)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.apply_mask_())

    def reset_parameters(self, sobel_init: str = "random", init: str = "pytorch") -> None:
        with torch.no_grad():
            if sobel_init == "sobel":
                self.weight.zero_()
                kernel = torch.tensor(SOBEL[self.kernel], dtype=self.weight.dtype, device=self.weight.device)
                if self.groups == 1:  # channelcross: the Sobel kernel on the diagonal (channel c -> c)
                    idx = torch.arange(self.weight.shape[0], device=self.weight.device)
                    self.weight[idx, idx] = kernel
                else:
                    self.weight[:, 0] = kernel
            elif sobel_init == "random" and init == "tensorpack":
                variance_scaling_(self.weight, 9 * self.weight.shape[0])
            elif sobel_init == "random":
                nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
            else:
                raise ValueError(f"unknown Sobel init {sobel_init!r}")
        self.apply_mask_()

    def apply_mask_(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, padding=1, groups=self.groups)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, mask={self.kernel}, groups={self.groups}"


class LearnableSobel(nn.Module):
    """`learnable.sobel`: c_k = masked conv k of l (after an optional ReLU on c_k); returns
    l + c1 + c2 (1order), l + c1^2 + c2^2 (2order) or l + sqrt(c1^2 + c2^2) (sqrt; the naked
    channel-cross script's form, see SQRT_FLOOR). Masks: vertical and horizontal (SPK), plus
    the two diagonals (SPK4, summed like 1order/2order)."""

    param_group = "extras"

    def __init__(
        self,
        channels: int,
        channelwise: bool = True,
        form: str = "2order",
        relu: bool = False,
        sobel_init: str = "random",
        masks: tuple[str, ...] = ("v", "h"),
        init: str = "pytorch",
    ):
        super().__init__()
        if form not in LEARNABLE_FORMS:
            raise ValueError(f"form must be one of {LEARNABLE_FORMS}, got {form!r}")
        self.form, self.relu = form, relu
        self.convs = nn.ModuleList(MaskedConv3x3(channels, m, channelwise, sobel_init, init) for m in masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        responses = [conv(x) for conv in self.convs]
        if self.relu:
            responses = [F.relu(c) for c in responses]
        if self.form == "1order":
            return x + sum(responses)
        energy = sum(c * c for c in responses)
        return x + (energy.clamp_min(SQRT_FLOOR).sqrt() if self.form == "sqrt" else energy)


class SobelResBlock(ResidualBlock):
    """`learnable.sobel.resblock`: the control, the FPN's residual basic block K -> K (biases,
    BN with gamma 0 at the end of the branch under tensorpack init, identity shortcut, no final
    ReLU: the identity at init) in place of the masked convolutions."""

    param_group = "extras"


def learnable_sobel(channels: int, kind: str, form: str, relu: bool, sobel_init: str, init: str) -> nn.Module:
    """The module for a recipe's learnable_sobel kind (init: the recipe's model.init)."""
    if kind == "resblock":
        return SobelResBlock(channels, channels, init)
    if kind not in ("channelwise", "channelcross"):
        raise ValueError(f"unknown learnable Sobel kind {kind!r}")
    return LearnableSobel(channels, channelwise=kind == "channelwise", form=form, relu=relu, sobel_init=sobel_init,
                          init=init)


class FixedSobel(nn.Module):
    """Fixed per-channel Sobel gx, gy (zero padding); returns l + s * f(gx^2 + gy^2), s a
    per-channel learnable scale initialised to 1, f = square (the original until 12-25, i.e.
    (gx^2 + gy^2)^2), sqrt (see SQRT_FLOOR) or identity (from 12-25 21:33)."""

    param_group = "extras"

    def __init__(self, channels: int, form: str = "identity"):
        super().__init__()
        if form not in FIXED_FORMS:
            raise ValueError(f"form must be one of {FIXED_FORMS}, got {form!r}")
        kernels = torch.tensor((SOBEL["h"], SOBEL["v"]), dtype=torch.float32)  # [2,3,3]: gx, gy
        self.register_buffer("kernels", kernels.repeat(channels, 1, 1).unsqueeze(1), persistent=False)
        self.scale = nn.Parameter(torch.ones(channels))
        self.channels, self.form = channels, form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One depthwise conv with 2 outputs per channel: [gx_c, gy_c] for each channel c.
        g = F.conv2d(x, self.kernels.to(x.dtype), padding=1, groups=self.channels)
        energy = (g * g).unflatten(1, (self.channels, 2)).sum(2)
        if self.form == "square":
            energy = energy * energy
        elif self.form == "sqrt":
            energy = energy.clamp_min(SQRT_FLOOR).sqrt()
        return x + self.scale.view(1, -1, 1, 1).to(x.dtype) * energy


class EdgeInput(nn.Module):
    """The Canny edge map (a [N,1,H,W] input in [0,1]) resized bilinearly to the feature size
    (tf1.resize_bilinear: TF's legacy mapping under tf1) and added to the features:
    `add`: l + e (broadcast over channels, the original's tile); `scale`: e + l * s, s a
    learnable per-channel scale of the *features*, initialised to 1 (resnet_model_edge_scale.py);
    `conv3`: l + conv3x3(e), a 1 -> C conv without bias, fan_out variance scaling under
    tensorpack init (it sat inside the backbone's argscope)."""

    param_group = "extras"

    def __init__(self, mode: str, channels: int, framework: str = "pytorch", init: str = "pytorch"):
        super().__init__()
        if mode not in EDGE_INPUTS:
            raise ValueError(f"unknown edge input mode {mode!r}")
        self.mode, self.framework = mode, framework
        if mode == "scale":
            self.scale = nn.Parameter(torch.ones(channels))
        elif mode == "conv3":
            self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
            init_conv(self.conv, init, mode="fan_out")

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        e = tf1.resize_bilinear(edges.to(x.dtype), x.shape[-2:], self.framework)
        if self.mode == "scale":
            return e + x * self.scale.view(1, -1, 1, 1).to(x.dtype)
        if self.mode == "conv3":
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
