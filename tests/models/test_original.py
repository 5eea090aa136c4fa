"""The original's models (reference/recipes.md "M-NAKED", "M-FPN", cs.resnet101) as the
`original` protocol builds them: stride placement, dilations, numerics, heads, and the
checkpoint sizes of the results log (`describe`, on the meta device)."""

import json

import pytest
import torch
from torch import nn

from segdist.errors import SegdistError
from segdist.models import build_model, describe_model
from segdist.models.__main__ import main
from segdist.models.fpn import FPNDecoder
from segdist.models.heads import BasicBlockHead, NakedHead
from segdist.models.tf1 import SameConv2d, SameMaxPool2d
from segdist.resolve import resolve_recipe

R101_BACKBONE = 42_500_160  # torchvision ResNet-101 without fc


def model_recipe(variant: str, protocol: str = "original", **fields):
    values = {"model.variant": variant, "model.depth": 50, "model.width": 4, "model.pretrained": None}
    values.update({f"model.{k}": v for k, v in fields.items()})
    return resolve_recipe(values, protocol, "test").model


def blocks(layer):
    return list(layer)


def test_naked_original_structure():
    """M-NAKED: res3 and res4 stride on the 1x1 conv1, res4's 3x3 convs dilation 2 (block 0
    included), res5 dilation 4, output stride 16, TF padding, aspp6 head with a bias."""
    m = model_recipe("naked")
    assert (m.strides, m.dilations, m.stride_on) == ((2, 2, 1), (1, 2, 4), ("1x1", "1x1", "3x3"))
    assert (m.output_stride, m.framework, m.init, m.classifier_bias) == (16, "tf1", "tensorpack", True)
    model = build_model(m, 21)
    b = model.backbone
    assert model.output_stride == 16 and b.output_stride == 16
    assert isinstance(b.conv1, SameConv2d) and isinstance(b.maxpool, SameMaxPool2d)
    for layer in (b.layer2, b.layer3):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (2, 2)
    assert all(block.conv2.dilation == (1, 1) for block in b.layer2)
    assert all(block.conv2.dilation == (2, 2) for block in b.layer3)
    assert all(block.conv2.dilation == (4, 4) for block in b.layer4)
    assert all(block.conv2.stride == (1, 1) and block.conv1.stride == (1, 1) for block in b.layer4)
    assert isinstance(model.classifier, NakedHead) and model.decoder is None
    head = model.classifier.classifier
    assert head.dilation == (6, 6) and head.bias is not None
    with torch.no_grad():
        feats = b(torch.zeros(1, 3, 321, 321))
    assert [f.shape[-1] for f in feats] == [81, 41, 21, 21]
    # newcode: the January scripts' AtrousConv2D had no bias
    assert build_model(model_recipe("naked.edge.learnable.sobel.channelwise.newcode"), 21).classifier.classifier.bias is None


def test_fpn_original_structure():
    """M-FPN: res3/res4 stride on the 1x1 conv1, res5 on the 3x3 conv2, no dilation, OS 32."""
    m = model_recipe("naked.fpn")
    assert (m.strides, m.dilations, m.stride_on, m.output_stride) == ((2, 2, 2), (1, 1, 1), ("1x1", "1x1", "3x3"), 32)
    model = build_model(m, 21)
    b = model.backbone
    for layer in (b.layer2, b.layer3):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert b.layer4[0].conv1.stride == (1, 1) and b.layer4[0].conv2.stride == (2, 2)
    assert isinstance(b.layer4[0].conv2, SameConv2d)
    assert all(block.conv2.dilation == (1, 1) for layer in (b.layer2, b.layer3, b.layer4) for block in layer)
    assert model.classifier is None and isinstance(model.decoder, FPNDecoder)
    assert all(up.deconv is not None and up.deconv.framework == "tf1" for up in model.decoder.ups)
    with torch.no_grad():
        feats = b(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_cs_resnet101_structure():
    """cs.resnet101: the plain ResNet-101, every stride on the 3x3, OS 32, a basic-block
    classifier without biases."""
    m = model_recipe("cs.resnet101.scale8", depth=101)
    assert (m.decoder, m.depth, m.stride_on, m.output_stride, m.strides) == (
        "plain", 101, ("3x3", "3x3", "3x3"), 32, (2, 2, 2))
    model = build_model(m, 19)
    b = model.backbone
    assert len(b.layer3) == 23
    for layer in (b.layer2, b.layer3, b.layer4):
        assert layer[0].conv1.stride == (1, 1) and layer[0].conv2.stride == (2, 2)
    assert isinstance(model.classifier, BasicBlockHead) and model.decoder is None
    assert all(c.bias is None for c in model.classifier.modules() if isinstance(c, nn.Conv2d))
    assert model.output_stride == 32
    with pytest.raises(SegdistError, match="resnet101"):
        model_recipe("cs.resnet101.scale8", depth=50)  # the token fixes the depth


def test_deeplab_protocol_structure():
    m = model_recipe("naked", "deeplab")
    assert (m.output_stride, m.strides, m.dilations, m.stride_on, m.framework) == (
        8, (2, 1, 1), (1, 2, 4), ("3x3", "3x3", "3x3"), "pytorch")
    b = build_model(m, 5).backbone
    assert b.layer2[0].conv1.stride == (1, 1) and b.layer2[0].conv2.stride == (2, 2)
    assert type(b.conv1) is nn.Conv2d and type(b.layer2[0].conv2) is nn.Conv2d
    assert all(block.conv2.dilation == (2, 2) for block in b.layer3)
    assert model_recipe("naked.fpn", "deeplab").output_stride == 32
    with pytest.raises(SegdistError, match="output stride 32"):
        model_recipe("naked.gcn", "deeplab", output_stride=8)


def test_original_output_stride_override_uses_deeplab_placement():
    m = model_recipe("naked", output_stride=8)
    assert (m.strides, m.dilations) == ((2, 1, 1), (1, 2, 4))


def test_original_naked_explicit_output_stride_16_is_the_same_model():
    assert model_recipe("naked", output_stride=16) == model_recipe("naked")


# ------------------------------------------------------------------ the log's checkpoint sizes


def _k_block(c: int, k: int) -> int:
    """Parameters of the FPN basic block C -> K (biases, BN, 1x1 projection when C != K)."""
    branch = 9 * c * k + k + 2 * k + 9 * k * k + k + 2 * k
    return branch + (c * k + k + 2 * k if c != k else 0)


@pytest.mark.parametrize(
    "variant, log_mb, params",
    [
        # deeplabv2.naked.fpn: 165.41MB; 4 laterals, 5 deconvs (+BN), 2 tail blocks
        ("naked.fpn", 165.41, R101_BACKBONE + sum(_k_block(c, 21) for c in (256, 512, 1024, 2048))
         + 5 * (9 * 21 * 21 + 21 + 2 * 21) + 2 * _k_block(21, 21)),
        # deeplabv2.naked.edge.learnable.sobel: "258MB" (rounded; 258.1 MiB); two C x C masked kernels on
        # res2..res4, biased head
        ("naked.edge.learnable.sobel", 258.1, R101_BACKBONE + 9 * 2048 * 21 + 21 + 18 * (256**2 + 512**2 + 1024**2)),
        # ...channelwise: 163.75MB; two depthwise kernels on res2..res4
        ("naked.edge.learnable.sobel.channelwise", 163.75, R101_BACKBONE + 9 * 2048 * 21 + 21 + 18 * (256 + 512 + 1024)),
    ],
)
def test_describe_matches_the_log_sizes(capsys, variant, log_mb, params):
    assert main(["describe", variant, "--protocol", "original", "--classes", "21", "--json", "--size", "33"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"variant", "protocol", "params", "size_mb", "gflops"}
    assert (info["variant"], info["protocol"]) == (variant, "original")
    assert info["params"] == params
    assert info["size_mb"] == pytest.approx(log_mb, abs=0.1)
    assert info["size_mb"] == round(params * 4 / 2**20, 2)


def test_naked_resnet101_figures():
    with torch.device("meta"):
        model = build_model(model_recipe("deeplabv2.naked", depth=101, width=64), 21)
    info = describe_model(model, 21, input_size=65)
    assert info["params"] == R101_BACKBONE + 9 * 2048 * 21 + 21 == 42_887_253
    assert info["size_mb"] == pytest.approx(163.6, abs=0.05)  # the log's ~164 MB checkpoints
    assert info["gflops"] > 0


def test_describe_cli_text_and_errors(capsys):
    assert main(["describe", "naked.fpn.learnable.sobel.channelwise.1order", "--depth", "18", "--width", "4",
                 "--size", "65", "--classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "params:" in out and "size_mb:" in out and "protocol: deeplab" in out
    assert main(["describe", "naked.fpn.gcn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than one decoder" in err
    assert main(["describe", "naked", "--classes", "0"]) == 2
    assert "--classes" in capsys.readouterr().err
