"""Initialisers of the layers that ImageNet weights do not cover (recipe field model.init).

`tensorpack` is the original's (TF 1.x, reference/recipes.md "M-FPN" and the Sobel notes):
- convolutions: `tf.contrib.layers.variance_scaling_initializer(factor=2.0, mode, uniform=False)`,
  a normal of std sqrt(1.3 * 2 / n) truncated at 2 std (the 1.3 undoes the truncation), where
  TF computes n from its kernel shape [kh, kw, in, out] as kh * kw * in (FAN_IN) or
  kh * kw * out (FAN_OUT). A depthwise kernel [3, 3, C, 1] therefore has n = 9C, not 9;
- transposed convolutions (Deconv2D): `xavier_initializer_conv2d()`, uniform in
  +-sqrt(6 / (fan_in + fan_out));
- biases 0; BatchNorm gamma 1, beta 0, except gamma 0 on the last BN of a residual branch
  (tensorpack's get_bn(zero_init=True)).
`pytorch` keeps segdist's earlier PyTorch-style choices (Kaiming normal, fan_out for ReLU
convs, N(0, 0.01) for the classifier).
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("tensorpack", "pytorch")


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor, fan: int, factor: float = 2.0) -> torch.Tensor:
    """TF 1.x variance_scaling_initializer(factor, uniform=False) with the given fan (the
    caller computes it from TF's kernel shape): truncated normal, std sqrt(1.3 factor / fan)
    before truncation at +-2 std (std of the result ~ sqrt(factor / fan))."""
    std = math.sqrt(1.3 * factor / fan)
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


@torch.no_grad()
def xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """TF's xavier_initializer_conv2d(): uniform in +-sqrt(6 / (fan_in + fan_out))."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(weight, -limit, limit)


def conv_fan(conv: nn.Conv2d, mode: str) -> int:
    """TF's fan of a dense conv's kernel [kh, kw, in, out]: kh * kw * in (fan_in) or
    kh * kw * out (fan_out). (TF's depthwise kernel [kh, kw, C, 1] has fan_in kh * kw * C, not
    the true kh * kw: segdist.models.sobel passes that fan to variance_scaling_ itself.)"""
    kh, kw = conv.kernel_size
    return kh * kw * (conv.in_channels if mode == "fan_in" else conv.out_channels)


def init_conv(conv: nn.Conv2d, init: str, mode: str = "fan_in") -> None:
    """A new conv's kernel (and zero bias) under `init`: tensorpack variance scaling with
    TF's fan (`mode`: fan_in for layers outside the backbone's argscope, fan_out inside it);
    pytorch: Kaiming normal for ReLU with the same mode."""
    if init == "tensorpack":
        variance_scaling_(conv.weight, conv_fan(conv, mode))
    else:
        nn.init.kaiming_normal_(conv.weight, mode=mode, nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
