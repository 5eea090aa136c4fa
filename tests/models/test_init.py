"""Initialisers under model.init "tensorpack" (segdist.models.init): the standard deviations
of the initial weights against TF 1.x's formulas with TF's fans.

variance_scaling_initializer() draws N(0, sqrt(1.3 * 2 / fan)) truncated at 2 std, so a sample
has std TRUNC * sqrt(2.6 / fan) with TRUNC = 0.8796 (the std of a standard normal truncated
at +-2). The tolerances allow the sampling error; the old PyTorch-style fans (9 for a
depthwise 3x3 kernel, fan_in where TF used fan_out) are 4-32x off and fail them.
"""

import math

import pytest
import torch
from torch import nn

from segdist.models import build_model
from segdist.models.fpn import BoundaryRefine, GlobalConv, ResidualBlock, Up
from segdist.models.heads import BasicBlockHead, NakedHead
from segdist.models.init import conv_fan, init_conv, variance_scaling_, xavier_uniform_
from segdist.models.resnet import Bottleneck, ResNet
from segdist.models.sobel import EdgeInput, LearnableSobel, MaskedConv3x3, SobelResBlock
from segdist.resolve import resolve_recipe

TRUNC = 0.8796  # std of N(0, 1) truncated at +-2


def tp_std(fan: int) -> float:
    """The sample std of tensorpack's variance_scaling_initializer() for `fan`."""
    return TRUNC * math.sqrt(2.6 / fan)


def assert_tp(weight: torch.Tensor, fan: int, rel: float = 0.1, where: str = "") -> None:
    """`weight` (the entries that matter, flattened) looks like variance scaling with `fan`:
    std within `rel`, nothing beyond 2 * sqrt(2.6 / fan), mean near 0."""
    w = weight.detach().flatten().double()
    limit = math.sqrt(2.6 / fan)
    std = w.std().item()
    assert std == pytest.approx(tp_std(fan), rel=rel), f"{where}: std {std:.4g}, expected {tp_std(fan):.4g} (fan {fan})"
    assert w.abs().max().item() <= 2 * limit * (1 + 1e-6), f"{where}: not truncated at 2 std"
    assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel()) + 1e-12, f"{where}: mean far from 0"


def unmasked(conv: MaskedConv3x3) -> torch.Tensor:
    return conv.weight.detach()[..., conv.mask == 1]


def model_recipe(variant: str, protocol: str = "original", **fields):
    values = {"model.variant": variant, "model.depth": 18, "model.width": 4, "model.pretrained": None}
    values.update({f"model.{k}": v for k, v in fields.items()})
    return resolve_recipe(values, protocol, "test").model


# ------------------------------------------------------------------ the initialisers themselves


def test_variance_scaling_std_and_truncation():
    w = torch.empty(100_000)
    variance_scaling_(w, 50)
    assert_tp(w, 50, rel=0.02)
    variance_scaling_(w, 200, factor=1.0)
    assert w.std().item() == pytest.approx(TRUNC * math.sqrt(1.3 / 200), rel=0.02)


def test_xavier_uniform_limit():
    w = torch.empty(100_000)
    xavier_uniform_(w, 90, 30)
    limit = math.sqrt(6 / 120)
    assert w.abs().max().item() <= limit and w.abs().max().item() > 0.99 * limit
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.02)


def test_conv_fan_is_tf_kernel_shape():
    conv = nn.Conv2d(6, 10, (3, 5))
    assert conv_fan(conv, "fan_in") == 15 * 6 and conv_fan(conv, "fan_out") == 15 * 10


def test_init_conv_modes_and_bias():
    conv = nn.Conv2d(64, 16, 3, bias=True)
    nn.init.ones_(conv.bias)
    init_conv(conv, "tensorpack", mode="fan_in")
    assert_tp(conv.weight, 9 * 64)
    assert torch.equal(conv.bias, torch.zeros(16))
    init_conv(conv, "tensorpack", mode="fan_out")
    assert_tp(conv.weight, 9 * 16)
    init_conv(conv, "pytorch", mode="fan_out")  # Kaiming normal, untruncated
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.1)


# ------------------------------------------------------------------ learnable Sobel: fan 9C


@pytest.mark.parametrize("channels", [21, 256])
def test_channelwise_sobel_fan_is_9c_not_9(channels):
    """TF's depthwise kernel [3, 3, C, 1] has fan_in 9C: std 0.117 for C=21, 0.034 for C=256
    (before truncation), i.e. sqrt(C) smaller than a true fan-in of 9 would give."""
    module = LearnableSobel(channels, channelwise=True, init="tensorpack")
    values = torch.cat([unmasked(c).flatten() for c in module.convs])
    assert math.sqrt(2.6 / (9 * channels)) == pytest.approx({21: 0.117, 256: 0.0337}[channels], rel=0.01)
    assert_tp(values, 9 * channels, rel=0.15 if channels == 21 else 0.06, where=f"C={channels}")
    for conv in module.convs:  # the masked entries are exactly zero
        assert torch.all(conv.weight.detach()[..., conv.mask == 0] == 0)


def test_channelcross_sobel_fan_is_9c():
    module = LearnableSobel(48, channelwise=False, init="tensorpack")
    assert module.convs[0].weight.shape == (48, 48, 3, 3)
    assert_tp(torch.cat([unmasked(c).flatten() for c in module.convs]), 9 * 48, rel=0.05)


def test_sobel_pytorch_init_is_true_fan_in():
    wise = LearnableSobel(256, channelwise=True, init="pytorch")
    std = torch.cat([unmasked(c).flatten() for c in wise.convs]).std().item()
    assert std == pytest.approx(math.sqrt(2 / 9), rel=0.06)
    cross = MaskedConv3x3(64, "v", channelwise=False, init="pytorch")
    assert unmasked(cross).std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.06)


def test_model_sobel_kernels_follow_the_recipe_init():
    """Through build_model: the original's FPN channelwise Sobel on K-channel laterals (fan 9K)
    and the naked channel-cross Sobel on res2..res4."""
    k = 128
    model = build_model(model_recipe("naked.fpn.learnable.sobel.channelwise"), k)
    convs = [c for extra in model.decoder.lateral_extras for c in extra.convs]
    assert len(convs) == 8 and all(c.weight.shape == (k, 1, 3, 3) for c in convs)
    assert_tp(torch.cat([unmasked(c).flatten() for c in convs]), 9 * k, rel=0.06, where="fpn laterals")

    model = build_model(model_recipe("naked.edge.learnable.sobel", depth=50, width=8), 5)
    for stage in ("res2", "res3", "res4"):
        convs = model.extras[stage].learnable.convs
        c = convs[0].weight.shape[0]
        assert_tp(torch.cat([unmasked(m).flatten() for m in convs]), 9 * c, rel=0.06, where=stage)


def test_spk_logit_module_fan_is_9k():
    k = 200
    model = build_model(model_recipe("naked.spk4"), k)
    convs = model.logit_module.convs
    assert len(convs) == 4 and all(c.groups == k for c in convs)
    assert_tp(torch.cat([unmasked(c).flatten() for c in convs]), 9 * k, rel=0.06)


# ------------------------------------------------------------------ decoders, heads, edge input


def test_gcn_fans():
    for style in ("original", "paper"):
        g = GlobalConv(64, 32, k=15, style=style, init="tensorpack")
        for branch in (g.left, g.right):
            first, second = branch
            assert_tp(first.weight, 15 * 64, rel=0.05, where=f"{style} first")
            assert_tp(second.weight, 15 * 32, rel=0.05, where=f"{style} second")
            assert first.bias is None and second.bias is None


def test_fpn_residual_block_fans_and_zero_gamma():
    block = ResidualBlock(64, 24, init="tensorpack")
    assert_tp(block.conv1.weight, 9 * 64, rel=0.05, where="conv1")
    assert_tp(block.conv2.weight, 9 * 24, rel=0.06, where="conv2")
    assert_tp(block.shortcut[0].weight, 64, rel=0.15, where="shortcut")
    for conv in (block.conv1, block.conv2, block.shortcut[0]):
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert torch.equal(block.bn2.weight, torch.zeros(24))  # the last BN of the branch
    assert torch.equal(block.bn1.weight, torch.ones(24)) and torch.equal(block.shortcut[1].weight, torch.ones(24))
    same = ResidualBlock(24, 24, init="tensorpack")
    assert isinstance(same.shortcut, nn.Identity)
    assert not torch.equal(ResidualBlock(24, 24, init="pytorch").bn2.weight, torch.zeros(24))


def test_model_fpn_decoder_init_under_the_original():
    """Through build_model (naked.fpn, original): every basic block ends in a gamma-0 BN, its
    convs use fan_in, the deconvs are Xavier uniform; the deeplab protocol keeps PyTorch's."""
    k = 64
    model = build_model(model_recipe("naked.fpn", depth=50, width=8), k)
    blocks = [m for m in model.decoder.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 6  # 4 laterals, 2 tail blocks
    for block in blocks:
        assert torch.equal(block.bn2.weight.detach(), torch.zeros(k))
        assert_tp(block.conv1.weight, 9 * block.conv1.in_channels, rel=0.1, where="conv1")
        assert_tp(block.conv2.weight, 9 * k, rel=0.1, where="conv2")
    limit = math.sqrt(6 / (18 * k))
    for up in (*model.decoder.ups, *model.decoder.final_ups):
        w = up.deconv.conv.weight.detach()
        assert w.abs().max().item() <= limit and w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.1)
    deeplab = build_model(model_recipe("naked.fpn", "deeplab", depth=50, width=8), k)
    assert not torch.equal(deeplab.decoder.laterals[0].bn2.weight.detach(), torch.zeros(k))


def test_boundary_refine_fans():
    br = BoundaryRefine(48, init="tensorpack")
    assert_tp(br.conv1.weight, 9 * 48, rel=0.05)
    assert_tp(br.conv2.weight, 9 * 48, rel=0.05)


def test_deconv_is_xavier_uniform():
    k = 40
    up = Up(k, deconv=True, framework="tf1", init="tensorpack")
    w = up.deconv.conv.weight.detach()
    limit = math.sqrt(6 / (9 * k + 9 * k))
    assert w.abs().max().item() <= limit and w.abs().max().item() > 0.95 * limit
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.05)
    assert torch.equal(up.deconv.conv.bias.detach(), torch.zeros(k))


def test_edge_conv3_fan_out():
    edge = EdgeInput("conv3", 256, init="tensorpack")
    assert edge.conv.weight.shape == (256, 1, 3, 3) and edge.conv.bias is None
    assert_tp(edge.conv.weight, 9 * 256, rel=0.06)  # fan_out 9C; fan_in would be 9 (16x larger)


def test_naked_head_fan_in_and_basic_block_head_fan_out():
    head = NakedHead(256, 21, init="tensorpack")
    assert_tp(head.classifier.weight, 9 * 256, rel=0.06)
    assert torch.equal(head.classifier.bias.detach(), torch.zeros(21))
    pytorch_head = NakedHead(256, 21, init="pytorch")
    assert pytorch_head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.06)
    plain = BasicBlockHead(256, 64, init="tensorpack")
    assert_tp(plain.conv1.weight, 9 * 64, rel=0.06, where="conv1 (fan_out)")
    assert_tp(plain.shortcut[0].weight, 64, rel=0.06, where="shortcut (fan_out)")
    assert torch.equal(plain.bn2.weight.detach(), torch.zeros(64))
    assert all(m.bias is None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_resblock_control_is_identity_at_init():
    block = SobelResBlock(6, 6, init="tensorpack").eval()
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(block(x), x)


# ------------------------------------------------------------------ backbone


def test_backbone_tensorpack_init():
    net = ResNet(50, width=16, output_stride=32, init="tensorpack")
    blocks = [m for m in net.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for b in blocks)
    assert all(torch.equal(b.bn1.weight, torch.ones_like(b.bn1.weight)) for b in blocks)
    conv = net.layer3[1].conv2  # [64, 64, 3, 3], fan_out 9 * 64
    assert_tp(conv.weight, 9 * 64, rel=0.05)
    assert_tp(net.layer4[0].conv3.weight, 512, rel=0.05)  # 1x1 128 -> 512: fan_out 512
    assert_tp(net.conv1.weight, 49 * 16, rel=0.1)
    pytorch = ResNet(50, width=16, output_stride=32, init="pytorch")
    assert not torch.equal(pytorch.layer1[0].bn3.weight, torch.zeros_like(pytorch.layer1[0].bn3.weight))


def test_model_backbone_zero_gamma_without_pretrained_weights():
    model = build_model(model_recipe("naked", depth=50, width=4), 5)
    assert all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight))
               for b in model.backbone.modules() if isinstance(b, Bottleneck))
    deeplab = build_model(model_recipe("naked", "deeplab", depth=50, width=4), 5)
    assert not torch.equal(deeplab.backbone.layer1[0].bn3.weight, torch.zeros(16))
