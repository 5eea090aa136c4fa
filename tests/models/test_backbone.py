"""segdist.models.resnet: feature strides, the STRIDES table, stride placement, torchvision
names, frozen BN. (Loading ImageNet weights: test_pretrained.py.)"""

import pytest
import torch
from torch import nn

from segdist.errors import SegdistError
from segdist.models.resnet import LAYOUTS, STRIDES, BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet
from segdist.models.tf1 import SameConv2d


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("framework", ["pytorch", "tf1"])
def test_feature_strides(depth, output_stride, framework):
    net = ResNet(depth, width=4, output_stride=output_stride, framework=framework)
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(net.channels)
    assert [f.shape[-1] for f in feats] == [16, 8, max(64 // output_stride, 64 // 16), 64 // output_stride]
    assert net.output_stride == output_stride


@pytest.mark.parametrize("framework", ["pytorch", "tf1"])
def test_odd_input_sizes_ceil(framework):
    net = ResNet(18, width=4, output_stride=8, framework=framework)
    feats = net(torch.randn(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 9, 9, 9]


def test_strides_table_is_deeplabs():
    assert STRIDES == {8: ((2, 1, 1), (1, 2, 4)), 16: ((2, 2, 1), (1, 1, 2)), 32: ((2, 2, 2), (1, 1, 1))}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_default_placement_follows_strides_table(output_stride):
    net = ResNet(50, width=4, output_stride=output_stride)
    strides, dilations = STRIDES[output_stride]
    for layer, stride, dilation in zip((net.layer2, net.layer3, net.layer4), strides, dilations, strict=True):
        # torchvision v1.5: the stride on the 3x3 conv2; every block of the stage dilated, block 0 included
        assert layer[0].conv1.stride == (1, 1) and layer[0].conv2.stride == (stride, stride)
        assert all(block.conv2.dilation == (dilation, dilation) for block in layer)
        assert all(block.conv2.padding == (dilation, dilation) for block in layer)
        assert all(block.conv2.stride == (1, 1) for block in list(layer)[1:])


def test_stride_on_1x1_and_explicit_strides():
    net = ResNet(50, width=4, output_stride=16, strides=(2, 2, 1), dilations=(1, 2, 4), stride_on=("1x1", "1x1", "3x3"))
    for layer in (net.layer2, net.layer3):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (2, 2)  # the shortcut carries the stride either way
    assert [b.conv2.dilation for b in net.layer3] == [(2, 2)] * 6
    assert [b.conv2.dilation for b in net.layer4] == [(4, 4)] * 3
    feats = net(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 4]
    # the stride's position changes the function, not the shapes or the parameters
    other = ResNet(50, width=4, output_stride=16, strides=(2, 2, 1), dilations=(1, 2, 4))
    other.load_state_dict(net.state_dict())
    assert [f.shape for f in other(torch.randn(1, 3, 64, 64))] == [f.shape for f in feats]


def test_tf1_framework_uses_same_padding_on_strided_layers_only():
    net = ResNet(50, width=4, output_stride=32, framework="tf1")
    same = {n for n, m in net.named_modules() if isinstance(m, SameConv2d)}
    assert same == {"conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}
    assert set(net.state_dict()) == set(ResNet(50, width=4, output_stride=32).state_dict())
    assert not any(isinstance(m, SameConv2d) for m in ResNet(50, width=4, output_stride=32).modules())


def test_basic_block_strides_on_its_first_conv():
    net = ResNet(18, width=4, output_stride=16, stride_on=("1x1", "1x1", "1x1"))
    assert isinstance(net.layer2[0], BasicBlock)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)


def test_full_resnet101_param_count_matches_torchvision():
    # torchvision resnet101: 44,549,160 parameters including fc (2048*1000 + 1000).
    with torch.device("meta"):
        net = ResNet(101, width=64)
    assert sum(p.numel() for p in net.parameters()) == 44_549_160 - 2_049_000
    with torch.device("meta"):
        net50 = ResNet(50, width=64)
    assert sum(p.numel() for p in net50.parameters()) == 25_557_032 - 2_049_000
    assert sum(isinstance(m, Bottleneck) for m in net.modules()) == 3 + 4 + 23 + 3


def test_torchvision_key_names():
    net = ResNet(50, width=4)
    keys = set(net.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "layer3.5.conv3.weight", "layer4.2.bn3.bias"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)
    assert not any("bias" in k for k in keys if "conv" in k or "downsample.0" in k)  # backbone convs: no bias


def test_frozen_bn_stays_frozen():
    net = ResNet(18, width=4, norm="frozen")
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, FrozenBatchNorm2d) for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(2, 3, 33, 33))[-1].sum().backward()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments():
    with pytest.raises(SegdistError, match="depth"):
        ResNet(42)
    assert set(LAYOUTS) == {18, 34, 50, 101, 152}
    with pytest.raises(SegdistError, match="output stride"):
        ResNet(18, width=4, output_stride=4)
    with pytest.raises(SegdistError, match="give output stride 16, not 8"):
        ResNet(18, width=4, output_stride=8, strides=(2, 2, 1), dilations=(1, 1, 2))
    with pytest.raises(SegdistError, match="width"):
        ResNet(18, width=0)
    with pytest.raises(SegdistError, match="norm"):
        ResNet(18, width=4, norm="group")
