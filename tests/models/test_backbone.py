import pytest
import torch
from torch import nn

from segdist.errors import SegdistError
from segdist.models.resnet import LAYOUTS, FrozenBatchNorm2d, ResNet, load_torchvision_weights


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_strides(depth, output_stride):
    with torch.device("meta"):
        net = ResNet(depth, width=4, output_stride=output_stride)
        feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(net.channels)
    assert [f.shape[-1] for f in feats] == [16, 8, max(64 // output_stride, 64 // 16), 64 // output_stride]


def test_odd_input_sizes_ceil():
    net = ResNet(18, width=4, output_stride=8)
    feats = net(torch.randn(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 9, 9, 9]


def test_full_resnet101_param_count_matches_torchvision():
    # torchvision resnet101: 44,549,160 parameters including fc (2048*1000 + 1000).
    with torch.device("meta"):
        net = ResNet(101, width=64)
    assert sum(p.numel() for p in net.parameters()) == 44_549_160 - 2_049_000
    with torch.device("meta"):
        net50 = ResNet(50, width=64)
    assert sum(p.numel() for p in net50.parameters()) == 25_557_032 - 2_049_000


def _torchvision_state_dict(net: ResNet) -> dict:
    """A torchvision-format state dict for `net` with random values and an fc."""
    sd = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
          for k, v in net.state_dict().items()}
    sd = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in sd.items()}
    sd["fc.weight"] = torch.randn(1000, net.channels[-1])
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_torchvision_key_names():
    net = ResNet(50, width=4)
    keys = set(net.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "layer3.5.conv3.weight", "layer4.2.bn3.bias"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_load_round_trip(tmp_path):
    source = ResNet(50, width=4)
    sd = _torchvision_state_dict(source)
    for k in [k for k in sd if k.endswith("num_batches_tracked")][:3]:
        del sd[k]  # old torchvision files have none
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)
    target = ResNet(50, width=4, output_stride=8)
    load_torchvision_weights(target, path)
    for key, value in target.state_dict().items():
        if key in sd:
            assert torch.equal(value, sd[key]), key


def test_load_errors_name_file_and_key(tmp_path):
    net = ResNet(18, width=4)
    sd = _torchvision_state_dict(net)
    path = tmp_path / "w.pth"

    bad = dict(sd)
    del bad["layer2.1.conv2.weight"]
    torch.save(bad, path)
    with pytest.raises(SegdistError, match=r"w\.pth.*missing key 'layer2\.1\.conv2\.weight'"):
        load_torchvision_weights(ResNet(18, width=4), path)

    bad = dict(sd, **{"layer9.0.conv1.weight": torch.zeros(1)})
    torch.save(bad, path)
    with pytest.raises(SegdistError, match=r"w\.pth.*unexpected key 'layer9\.0\.conv1\.weight'"):
        load_torchvision_weights(ResNet(18, width=4), path)

    torch.save(sd, path)
    with pytest.raises(SegdistError, match=r"w\.pth.*'conv1\.weight' has shape"):
        load_torchvision_weights(ResNet(18, width=8), path)

    with pytest.raises(SegdistError, match="not found"):
        load_torchvision_weights(net, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(SegdistError, match="junk.pth"):
        load_torchvision_weights(net, tmp_path / "junk.pth")


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


def test_unknown_depth():
    with pytest.raises(SegdistError, match="depth"):
        ResNet(42)
    assert set(LAYOUTS) == {18, 34, 50, 101, 152}
