"""Every variant: tiny forward/backward at 65x65, gradients, masks, channels_last + bf16."""

import pytest
import torch

from segdist.config import ModelConfig
from segdist.models import build_model, describe_model, param_groups
from segdist.models.fpn import BoundaryRefine, GlobalConv
from segdist.models.sobel import SOBEL, EdgeInput, FixedSobel, LearnableSobel, MaskedConv3x3, SobelResBlock

VARIANTS = [
    "naked",
    "aspp",
    "naked.fpn",
    "naked.fpn.standard",
    "naked.fpnstandard.learnable.sobel.channelwise",
    "naked.fpn.bilinear",
    "naked.gcn",
    "naked.gcn.learnable.sobel.channelwise.1order",
    "naked.fpn.learnable.sobel.channelwise.1order",
    "naked.fpn.learnable.sobel.channelwise.2order",
    "naked.fpn.learnable.sobel.channelcross.1order",
    "naked.fpn.learnable.sobel.channelwise.1order.relu",
    "naked.fpn.learnable.sobel.resblock.1order",
    "naked.edge.learnable.sobel",
    "naked.edge.learnable.sobel.channelwise",
    "naked.edge.learnable.sobel.channelwise.newcode",
    "naked.learnable.sobel.channelwise.1order.sobelinit",
    "naked.learnable.sobel.resblock",
    "naked.sobel",
    "naked.sobellast",
    "naked.sobel.head",
    "naked.sobel-res234",
    "naked.edge",
    "naked.edgescale",
    "naked.edge.conv3",
    "naked.spk",
    "naked.spk4",
    "naked.fpn.spk",
    "naked.trimap",
    "naked.edgemix",
]
CLASSES = 5


def tiny_cfg(variant, **kw):
    return ModelConfig(variant=variant, **{"depth": 18, "width": 4, "output_stride": 8, **kw})


def run(model, size=(65, 65), n=2, channels_last=False):
    images = torch.randn(n, 3, *size)
    edges = torch.rand(n, 1, *size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        edges = edges.contiguous(memory_format=torch.channels_last)
    return model(images, edges) if model.needs_edges else model(images)


def extra_weights(model):
    """The parameters of the modules a variant adds (Sobel, edge, GCN, SPK)."""
    kinds = (MaskedConv3x3, FixedSobel, EdgeInput, SobelResBlock, GlobalConv, BoundaryRefine)
    return {f"{mn}.{pn}": p for mn, m in model.named_modules() if isinstance(m, kinds)
            for pn, p in m.named_parameters(recurse=False)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_every_param_gets_gradient(variant):
    model = build_model(tiny_cfg(variant), CLASSES)
    logits = run(model)
    assert logits.shape == (2, CLASSES, 65, 65)
    assert torch.isfinite(logits).all()
    (logits.logsumexp(1).mean() - logits[:, 0].mean()).backward()
    # DDP without find_unused_parameters needs every trainable parameter used.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for name, p in extra_weights(model).items():
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("variant", ["naked.fpn", "naked.gcn", "naked.fpn.standard", "naked.fpn.bilinear"])
@pytest.mark.parametrize("size", [(64, 64), (33, 47), (97, 65)])
def test_fpn_decoders_any_size(variant, size):
    model = build_model(tiny_cfg(variant, output_stride=8), CLASSES)
    assert model.output_stride == 32  # FPN/GCN use the plain ResNet
    assert run(model, size, n=1).shape == (1, CLASSES, *size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_and_bf16_autocast(variant):
    model = build_model(tiny_cfg(variant), CLASSES).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = run(model, (33, 33), channels_last=True)
    assert logits.shape == (2, CLASSES, 33, 33)
    assert torch.isfinite(logits.float()).all()
    logits.float().logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_groups_partition_every_variant(variant):
    model = build_model(tiny_cfg(variant), CLASSES)
    groups = param_groups(model, lr=1e-3, head_lr_mult=10, weight_decay=5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    backbone = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        assert all((id(p) in backbone) == g["name"].startswith("backbone") for p in g["params"]), g["name"]


@pytest.mark.parametrize(
    "variant",
    ["naked.edge.learnable.sobel", "naked.learnable.sobel.channelwise.newcode",
     "naked.fpn.learnable.sobel.channelwise.1order.relu", "naked.spk4", "naked.learnable.sobel.sobelinit"],
)
def test_masked_entries_stay_zero_after_optimizer_steps(variant):
    model = build_model(tiny_cfg(variant), CLASSES)
    masked = [m for m in model.modules() if isinstance(m, MaskedConv3x3)]
    assert masked
    before = {id(m): m.weight.detach().clone() for m in masked}
    for opt in (torch.optim.SGD(param_groups(model, lr=1e-3, head_lr_mult=10, weight_decay=0.1), lr=1e-3, momentum=0.9),
                torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)):
        for _ in range(3):
            opt.zero_grad()
            run(model, (33, 33)).logsumexp(1).mean().backward()
            opt.step()
    for m in masked:
        zero = m.mask == 0
        assert torch.isfinite(m.weight).all()
        assert torch.all(m.weight[..., zero] == 0), m
        assert torch.all(m.weight.grad[..., zero] == 0)
        assert not torch.equal(m.weight, before[id(m)])  # the other entries did learn


def test_masked_entries_zeroed_on_load():
    conv = MaskedConv3x3(4, "v", channelwise=True)
    conv.load_state_dict({"weight": torch.ones(4, 1, 3, 3)})
    assert torch.equal(conv.weight[0, 0], torch.tensor(((1.0, 1, 1), (0, 0, 0), (1, 1, 1))))
    assert set(conv.state_dict()) == {"weight"}  # the mask is not a checkpoint entry


def test_sobel_init_values():
    wise = LearnableSobel(3, channelwise=True, init="sobel", masks=("v", "h", "d1", "d2"))
    for conv, key in zip(wise.convs, ("v", "h", "d1", "d2"), strict=True):
        assert torch.equal(conv.weight[2, 0], torch.tensor(SOBEL[key], dtype=torch.float32))
    cross = LearnableSobel(3, channelwise=False, init="sobel")
    w = cross.convs[1].weight
    assert torch.equal(w[1, 1], torch.tensor(SOBEL["h"], dtype=torch.float32)) and w[0, 1].abs().sum() == 0


def test_learnable_sobel_orders_and_relu():
    x = torch.randn(1, 2, 8, 8)
    for order, relu in ((1, False), (2, False), (1, True)):
        m = LearnableSobel(2, channelwise=True, order=order, relu=relu, init="sobel")
        c1, c2 = (conv(x) for conv in m.convs)
        if relu:
            c1, c2 = c1.relu(), c2.relu()
        expected = x + (c1 + c2 if order == 1 else c1 * c1 + c2 * c2)
        assert torch.allclose(m(x), expected)


def test_fixed_sobel_is_true_sobel_magnitude():
    m = FixedSobel(2)
    x = torch.zeros(1, 2, 6, 6)
    x[:, :, :, 3:] = 1.0  # a vertical step edge
    out = m(x)
    # interior pixels next to the step: gx = 4 -> gx^2 = 16 added; flat interior unchanged
    assert torch.allclose(out[0, :, 2, 2], torch.full((2,), 16.0))
    assert torch.allclose(out[0, :, 2, 3], torch.full((2,), 17.0))
    assert torch.equal(out[0, :, 2, 1], x[0, :, 2, 1]) and torch.equal(out[0, :, 2, 4], x[0, :, 2, 4])
    assert m.scale.shape == (2,) and torch.equal(m.scale, torch.ones(2))


def test_gcn_branch_orders():
    g = GlobalConv(3, 4, k=15)
    assert [tuple(c.kernel_size) for c in g.left] == [(15, 1), (1, 15)]
    assert [tuple(c.kernel_size) for c in g.right] == [(1, 15), (15, 1)]
    assert g(torch.randn(1, 3, 9, 9)).shape == (1, 4, 9, 9)


def test_edge_variants_use_the_edge_map():
    for variant in ("naked.edge", "naked.edgescale", "naked.edge.conv3"):
        model = build_model(tiny_cfg(variant), CLASSES).eval()
        assert model.needs_edges
        images = torch.randn(1, 3, 33, 33)
        with pytest.raises(ValueError, match="edge"):
            model(images)
        with torch.no_grad():
            a = model(images, torch.zeros(1, 1, 33, 33))
            b = model(images, torch.ones(1, 1, 33, 33))
        assert not torch.allclose(a, b)
    assert not build_model(tiny_cfg("naked.edge.learnable.sobel"), CLASSES).needs_edges


def test_label_modes_do_not_change_the_model():
    base = sum(p.numel() for p in build_model(tiny_cfg("naked"), CLASSES).parameters())
    for variant in ("naked.trimap", "naked.edgemix.r3", "naked.lr10.scale8.size512.bs4.randomresizefix"):
        assert sum(p.numel() for p in build_model(tiny_cfg(variant), CLASSES).parameters()) == base


def test_placements():
    m = build_model(tiny_cfg("naked.sobel-res234"), CLASSES)
    assert sorted(m.extras) == ["res2", "res3", "res4"]
    assert sorted(build_model(tiny_cfg("naked.sobel.head"), CLASSES).extras) == ["stem"]
    assert sorted(build_model(tiny_cfg("naked.sobellast"), CLASSES).extras) == ["res4"]
    m = build_model(tiny_cfg("naked.learnable.sobel.newcode"), CLASSES)
    assert sorted(m.extras) == ["res2", "res3", "res4", "res5"]
    m = build_model(tiny_cfg("naked.fpn.learnable.sobel.channelwise"), CLASSES)
    assert not m.extras and len(m.head.lateral_extras) == 4
    assert m.head.lateral_extras[0].convs[0].weight.shape == (CLASSES, 1, 3, 3)
    assert build_model(tiny_cfg("naked.spk4"), CLASSES).logit_module is not None


# ------------------------------------------------------------- full-size figures (meta device)


def r101(variant, classes=21):
    with torch.device("meta"):
        return build_model(ModelConfig(variant=variant, depth=101, width=64, output_stride=8), classes)


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def test_full_size_figures():
    naked = nparams(r101("deeplabv2.naked"))
    assert naked == 42_887_253 and abs(naked - 42.9e6) < 0.05e6
    cross = nparams(r101("deeplabv2.naked.edge.learnable.sobel")) - naked
    # two full C->C 3x3 convs on res2 (256), res3 (512), res4 (1024): 18 * (256^2 + 512^2 + 1024^2)
    assert cross == 18 * (256**2 + 512**2 + 1024**2) and abs(cross - 24.8e6) < 0.05e6
    wise = nparams(r101("deeplabv2.naked.edge.learnable.sobel.channelwise")) - naked
    assert 0 < wise < 0.1e6
    # the log's checkpoint sizes: 164 / 258 / 163.75 / 165.41 MB
    assert describe_model(r101("deeplabv2.naked.edge.learnable.sobel"), 21, 65)["size_mb"] == pytest.approx(258, abs=0.5)
    assert describe_model(r101("deeplabv2.naked.edge.learnable.sobel.channelwise"), 21, 65)["size_mb"] == pytest.approx(163.75, abs=0.1)
    assert describe_model(r101("deeplabv2.naked.fpn"), 21, 65)["size_mb"] == pytest.approx(165.41, abs=0.1)
    assert describe_model(r101("deeplabv2.cs.naked.fpn"), 19, 65)["size_mb"] == pytest.approx(165.41, abs=0.5)


def test_describe_cli(capsys):
    import json

    from segdist.models.__main__ import main

    assert main(["describe", "naked.fpn.learnable.sobel.channelwise.1order", "--json", "--depth", "18",
                 "--width", "4", "--size", "65", "--classes", "5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"variant", "params", "size_mb", "gflops"} and info["params"] > 0
    assert main(["describe", "naked.fpn.gcn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than one decoder" in err
