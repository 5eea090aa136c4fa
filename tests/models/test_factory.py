"""segdist.models.factory: build_model from a recipe, SegModel, parameter_groups, describe_model."""

import hashlib

import pytest
import torch
from torch import nn

from segdist.errors import SegdistError
from segdist.models import SegModel, build_model, count_params, describe_model, parameter_groups
from segdist.models.heads import ASPPHead, NakedHead
from segdist.models.resnet import ResNet
from segdist.optim import make_optimizer
from segdist.resolve import resolve_recipe


def tiny_recipe(variant="naked", protocol="deeplab", **fields):
    values = {"model.variant": variant, "model.depth": 18, "model.width": 4, "model.pretrained": None}
    values.update({f"model.{k}": v for k, v in fields.items()})
    return resolve_recipe(values, protocol, "test")


def tiny(variant="naked", protocol="deeplab", **fields):
    return tiny_recipe(variant, protocol, **fields).model


@pytest.mark.parametrize("variant", ["naked", "aspp"])
@pytest.mark.parametrize("protocol", ["deeplab", "original"])
@pytest.mark.parametrize("size", [(65, 65), (33, 47)])
def test_output_at_input_resolution_and_gradients(variant, protocol, size):
    model = build_model(tiny(variant, protocol, depth=50), num_classes=5)
    images = torch.randn(2, 3, *size)
    logits = model(images)
    assert logits.shape == (2, 5, *size)
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.needs_edges is False
    assert isinstance(model.classifier, NakedHead if variant == "naked" else ASPPHead) and model.decoder is None


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_strides(output_stride):
    model = build_model(tiny(output_stride=output_stride), num_classes=3)
    assert model.output_stride == output_stride
    assert model(torch.randn(1, 3, 65, 65)).shape == (1, 3, 65, 65)


def test_final_upsampling_follows_the_framework():
    """The logits are resized to the input with TF's legacy mapping under tf1."""
    from segdist.models.tf1 import resize_bilinear

    for protocol, framework in (("original", "tf1"), ("deeplab", "pytorch")):
        model = build_model(tiny("naked", protocol), 3).eval()
        images = torch.randn(1, 3, 40, 40)
        with torch.no_grad():
            b = model.backbone
            low = model.classifier(b.layer4(b.layer3(b.layer2(b.layer1(b.stem(images))))))
            assert torch.allclose(model(images), resize_bilinear(low, (40, 40), framework), atol=1e-6)


def test_segmodel_needs_exactly_one_of_classifier_and_decoder():
    backbone = ResNet(18, width=4)
    with pytest.raises(ValueError, match="exactly one"):
        SegModel(backbone, None, None)
    with pytest.raises(ValueError, match="exactly one"):
        SegModel(backbone, nn.Identity(), nn.Identity())


def test_bad_num_classes():
    with pytest.raises(SegdistError, match="num_classes"):
        build_model(tiny(), 0)


def test_parameter_groups_naked_and_aspp():
    for variant in ("naked", "aspp"):
        model = build_model(tiny(variant), num_classes=4)
        groups = parameter_groups(model)
        assert {g: set(r) for g, r in groups.items()} == {"backbone": {"kernel", "norm"},
                                                          "classifier": {"kernel", "bias"}}
        ids = [id(p) for roles in groups.values() for params in roles.values() for p in params]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for p in model.classifier.parameters()} == {
            id(p) for params in groups["classifier"].values() for p in params}
        assert all(p.dim() == 4 for p in groups["classifier"]["kernel"])
        assert all(p.dim() == 1 for p in groups["classifier"]["bias"])
    original = build_model(tiny("naked.newcode", "original"), 4)  # the January scripts: no head bias
    assert set(parameter_groups(original)["classifier"]) == {"kernel"}


def test_parameter_groups_look_through_ddp_like_wrapper(monkeypatch):
    model = build_model(tiny(), 3)

    class Wrapper(nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    wrapped = Wrapper(model)
    assert {g: {r: len(p) for r, p in roles.items()} for g, roles in parameter_groups(wrapped).items()} == {
        g: {r: len(p) for r, p in roles.items()} for g, roles in parameter_groups(model).items()}


def test_make_optimizer_param_groups():
    recipe = tiny_recipe("aspp")
    model = build_model(recipe.model, 4)
    optimizer = make_optimizer(model, recipe.train)
    assert isinstance(optimizer, torch.optim.SGD)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {"backbone.kernel", "backbone.norm", "classifier.kernel", "classifier.bias"}
    # deeplab: classifier x10 / x20, weight decay on kernels only
    assert (by_name["classifier.kernel"]["grad_mult"], by_name["classifier.kernel"]["decay"]) == (10.0, True)
    assert (by_name["classifier.bias"]["grad_mult"], by_name["classifier.bias"]["decay"]) == (20.0, False)
    assert (by_name["backbone.norm"]["grad_mult"], by_name["backbone.norm"]["decay"]) == (1.0, False)
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups)  # L2 is added by apply_gradient_rules


def test_param_groups_frozen_bn_excluded():
    model = build_model(tiny(norm="frozen"), num_classes=4)
    groups = parameter_groups(model)
    assert "norm" not in groups["backbone"]
    ids = {id(p) for roles in groups.values() for params in roles.values() for p in params}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_sync_norm_converts_and_runs_without_process_group():
    model = build_model(tiny(norm="sync"), num_classes=3)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    model(torch.randn(2, 3, 33, 33)).sum().backward()
    assert "norm" in parameter_groups(model)["backbone"]


def test_pretrained_loads_into_model(tmp_path):
    source = ResNet(18, width=4)
    for p in source.parameters():
        nn.init.normal_(p)
    sd = dict(source.state_dict(), **{"fc.weight": torch.zeros(1000, 32), "fc.bias": torch.zeros(1000)})
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    recipe = tiny(pretrained=str(path))
    model = build_model(recipe, num_classes=3)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.pretrained_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    fresh = build_model(recipe, num_classes=3, load_pretrained=False)  # a checkpoint brings its own
    assert fresh.pretrained_sha256 is None
    assert not torch.equal(fresh.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    # tensorpack init: ImageNet weights replace the zero gammas
    original = build_model(tiny("naked", "original", pretrained=str(path)), 3)
    assert torch.equal(original.backbone.layer1[0].bn2.weight, source.layer1[0].bn2.weight)
    assert original.backbone.layer1[0].bn2.weight.abs().sum() > 0


def test_describe_tiny_counts_flops_without_touching_model():
    model = build_model(tiny(), num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = describe_model(model, 3, input_size=33)
    assert set(info) == {"params", "size_mb", "gflops"}
    assert info["params"] == sum(p.numel() for p in model.parameters()) == count_params(model)
    assert 0 < info["gflops"] < 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
    edge = build_model(tiny("naked.edge"), 3)
    assert describe_model(edge, 3, input_size=(33, 41))["gflops"] > 0  # the edge input is fed too


@pytest.mark.parametrize("variant", ["naked.fpn.learnable.sobel.resblock", "naked.gcn", "naked.edgescale.spk"])
@pytest.mark.parametrize("norm", ["sync", "frozen"])
def test_norm_options_with_decoders(variant, norm):
    model = build_model(tiny(variant, norm=norm), num_classes=3)
    if norm == "sync":
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    else:  # frozen: only the backbone's BN
        assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if ".bn" in n or n.startswith("bn"))
        head = model.decoder if model.decoder is not None else model.classifier
        assert all(p.requires_grad for p in head.parameters())
    images = torch.randn(2, 3, 33, 33)
    out = model(images, torch.rand(2, 1, 33, 33)) if model.needs_edges else model(images)
    out.sum().backward()
    groups = parameter_groups(model)
    assert sum(len(p) for roles in groups.values() for p in roles.values()) == len(
        [p for p in model.parameters() if p.requires_grad])
