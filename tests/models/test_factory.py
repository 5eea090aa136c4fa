import pytest
import torch
from torch import nn

from segdist.config import ModelConfig
from segdist.models import build_model, describe_model, param_groups


def tiny(variant="naked", **kw):
    kw = {"depth": 18, "width": 4, "output_stride": 8, **kw}
    return ModelConfig(variant=variant, **kw)


@pytest.mark.parametrize("variant", ["naked", "aspp"])
@pytest.mark.parametrize("size", [(65, 65), (33, 47)])
def test_output_at_input_resolution_and_gradients(variant, size):
    model = build_model(tiny(variant, depth=50), num_classes=5)
    images = torch.randn(2, 3, *size)
    logits = model(images)
    assert logits.shape == (2, 5, *size)
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.needs_edges is False


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_strides(output_stride):
    model = build_model(tiny(output_stride=output_stride), num_classes=3)
    assert model.output_stride == output_stride
    assert model(torch.randn(1, 3, 65, 65)).shape == (1, 3, 65, 65)


def test_param_groups_partition_and_multipliers():
    model = build_model(tiny("aspp"), num_classes=4)
    groups = param_groups(model, lr=0.01, head_lr_mult=10, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_norm", "head_weight", "head_bias"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01) and by_name["backbone"]["weight_decay"] == 5e-4
    assert by_name["backbone_norm"]["weight_decay"] == 0
    assert by_name["head_weight"]["lr"] == pytest.approx(0.1) and by_name["head_weight"]["weight_decay"] == 5e-4
    assert by_name["head_bias"]["lr"] == pytest.approx(0.2) and by_name["head_bias"]["weight_decay"] == 0
    assert all(g["lr"] == pytest.approx(0.01 * g["lr_mult"]) for g in groups)
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in by_name["head_weight"]["params"]} | {id(p) for p in by_name["head_bias"]["params"]} == head
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as is


def test_param_groups_frozen_bn_excluded():
    model = build_model(tiny(norm="frozen"), num_classes=4)
    groups = param_groups(model, lr=0.01)
    assert "backbone_norm" not in {g["name"] for g in groups}
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_sync_norm_converts_and_runs_without_process_group():
    model = build_model(tiny(norm="sync"), num_classes=3)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    model(torch.randn(2, 3, 33, 33)).sum().backward()


def test_pretrained_loads_into_model(tmp_path):
    from segdist.models.resnet import ResNet

    source = ResNet(18, width=4)
    for p in source.parameters():
        nn.init.normal_(p)
    sd = dict(source.state_dict(), **{"fc.weight": torch.zeros(1000, 32), "fc.bias": torch.zeros(1000)})
    torch.save(sd, tmp_path / "r18.pth")
    model = build_model(tiny(pretrained=str(tmp_path / "r18.pth")), num_classes=3)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_resnet101_naked_figures():
    with torch.device("meta"):
        model = build_model(ModelConfig(variant="naked", depth=101, width=64), num_classes=21)
    info = describe_model(model, 21, input_size=65)
    # 42,500,160 backbone (torchvision R101 without fc) + 2048*9*21 + 21 classifier
    assert info["params"] == 42_887_253
    assert info["size_mb"] == pytest.approx(163.6, abs=0.05)  # the log's ~164 MB checkpoints
    assert info["gflops"] > 0


def test_describe_tiny_counts_flops_without_touching_model():
    model = build_model(tiny(), num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = describe_model(model, 3, input_size=33)
    assert set(info) == {"params", "size_mb", "gflops"}
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < info["gflops"] < 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("variant", ["naked.fpn.learnable.sobel.resblock", "naked.gcn", "naked.edgescale.spk"])
@pytest.mark.parametrize("norm", ["sync", "frozen"])
def test_norm_options_with_decoders(variant, norm):
    model = build_model(tiny(variant, norm=norm), num_classes=3)
    if norm == "sync":
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    else:  # frozen: only the backbone's BN
        assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if ".bn" in n or n.startswith("bn"))
        assert all(p.requires_grad for p in model.head.parameters())
    images = torch.randn(2, 3, 33, 33)
    out = model(images, torch.rand(2, 1, 33, 33)) if model.needs_edges else model(images)
    out.sum().backward()
    groups = param_groups(model, lr=0.1)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
