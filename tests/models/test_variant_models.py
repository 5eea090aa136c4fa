"""Every variant under both protocols: tiny forward/backward at 65x65, gradients, parameter
groups, masks after optimizer steps, channels_last + bf16, placements."""

import pytest
import torch

from segdist.models import build_model, parameter_groups
from segdist.models.factory import ROLES
from segdist.models.fpn import BoundaryRefine, GlobalConv, ResidualBlock, Up
from segdist.models.heads import BasicBlockHead
from segdist.models.sobel import EdgeInput, FixedSobel, LearnableSobel, MaskedConv3x3, SobelResBlock
from segdist.optim import apply_gradient_rules, make_optimizer
from segdist.recipe import GROUPS
from segdist.resolve import resolve_recipe

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
    "naked.learnable.sobel.sqrt",
    "naked.learnable.sobel.resblock",
    "naked.sobel",
    "naked.sobel.square",
    "naked.sobel.sqrt",
    "naked.sobellast",
    "naked.sobel.head",
    "naked.sobel-res234",
    "naked.edge",
    "naked.edgescale",
    "naked.edge.conv3",
    "naked.edgescale.spk",
    "naked.spk",
    "naked.spk4",
    "naked.fpn.spk",
    "naked.trimap",
    "naked.edgemix",
    "deeplabv2.voc.size512",
    "cs.resnet101",
]
PROTOCOLS = ["original", "deeplab"]
CLASSES = 5


def tiny_recipe(variant, protocol="deeplab", **fields):
    """The model recipe at test sizes (depth 18, width 4; the plain ResNet-101 of `resnet101` at width 4)."""
    values = {"model.variant": variant, "model.depth": 101 if "resnet101" in variant else 18, "model.width": 4,
              "model.pretrained": None}
    values.update({f"model.{k}": v for k, v in fields.items()})
    return resolve_recipe(values, protocol, "test")


def tiny(variant, protocol="deeplab", **fields):
    return build_model(tiny_recipe(variant, protocol, **fields).model, CLASSES)


def run(model, size=(65, 65), n=2, channels_last=False):
    images = torch.randn(n, 3, *size)
    edges = torch.rand(n, 1, *size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        edges = edges.contiguous(memory_format=torch.channels_last)
    return model(images, edges) if model.needs_edges else model(images)


def extra_weights(model):
    """The parameters of the modules a variant adds (Sobel, edge, GCN, BR, SPK); not the
    resblock control, whose branch starts at gamma 0 under tensorpack init."""
    kinds = (MaskedConv3x3, FixedSobel, EdgeInput, GlobalConv, BoundaryRefine)
    return {f"{mn}.{pn}": p for mn, m in model.named_modules() if isinstance(m, kinds)
            for pn, p in m.named_parameters()}


def group_of(model):
    """{parameter name: (group, role)} from parameter_groups; asserts nothing is listed twice."""
    ids = {}
    for group, roles in parameter_groups(model).items():
        assert group in GROUPS
        for role, params in roles.items():
            assert role in ROLES and params
            for p in params:
                assert id(p) not in ids, "a parameter in two groups"
                ids[id(p)] = (group, role)
    return {name: ids.get(id(p)) for name, p in model.named_parameters()}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_every_param_gets_gradient(variant, protocol):
    model = tiny(variant, protocol)
    logits = run(model)
    assert logits.shape == (2, CLASSES, 65, 65)
    assert torch.isfinite(logits).all()
    (logits.logsumexp(1).mean() - logits[:, 0].mean()).backward()
    # DDP without find_unused_parameters needs every trainable parameter used.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for name, p in extra_weights(model).items():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for control in (m for m in model.modules() if isinstance(m, SobelResBlock)):
        assert control.bn2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("variant", ["naked.fpn", "naked.gcn", "naked.fpn.standard", "naked.fpn.bilinear"])
@pytest.mark.parametrize("size", [(64, 64), (33, 47), (97, 65)])
def test_fpn_decoders_any_size(variant, size, protocol):
    model = tiny(variant, protocol)
    assert model.output_stride == 32  # FPN/GCN use the plain ResNet
    assert run(model, size, n=1).shape == (1, CLASSES, *size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_and_bf16_autocast(variant):
    # each variant under one protocol (both numerics covered), a few under both
    both = variant in ("naked", "naked.fpn", "naked.learnable.sobel.sqrt")
    for protocol in PROTOCOLS if both else [PROTOCOLS[VARIANTS.index(variant) % 2]]:
        model = tiny(variant, protocol).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = run(model, (33, 33), channels_last=True)
        assert logits.shape == (2, CLASSES, 33, 33)
        assert torch.isfinite(logits.float()).all()
        logits.float().logsumexp(1).mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ parameter groups


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_groups_partition_every_variant(variant, protocol):
    recipe = tiny_recipe(variant, protocol)
    model = build_model(recipe.model, CLASSES)
    where = group_of(model)
    params = dict(model.named_parameters())
    for name, place in where.items():
        assert (place is not None) == params[name].requires_grad, name  # every trainable one, exactly once
    for name, (group, role) in ((n, p) for n, p in where.items() if p is not None):
        top = name.split(".")[0]
        if top == "backbone":
            assert group == "backbone", name
        elif top in ("extras", "logit_module"):
            assert group == "extras", name
        elif top == "classifier":
            assert group == "classifier", name
        else:
            assert top == "decoder" and group in ("decoder", "extras"), name
        if ".bn" in name or name.startswith("backbone.bn1") or ".downsample.1." in name:
            assert role == "norm", name
    # the optimizer side: one param group per (group, role), all trainable parameters once
    optimizer = make_optimizer(model, recipe.train)
    listed = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == sum(p.requires_grad for p in model.parameters())
    names = [g["name"] for g in optimizer.param_groups]
    assert len(names) == len(set(names))
    for g in optimizer.param_groups:
        group, role = g["name"].split(".")
        rule = getattr(recipe.train.multipliers, group)
        assert g["grad_mult"] == (1.0 if role == "norm" else rule.bias if role == "bias" else rule.weight)
        assert g["decay"] == (rule.decay and role == "kernel")


def _names_in(model, group, role=None):
    return {n for n, place in group_of(model).items()
            if place is not None and place[0] == group and (role is None or place[1] == role)}


def test_groups_fpn_decoder_and_sobel_extras():
    model = tiny("naked.fpn.learnable.sobel.channelwise.1order", "original")
    extras = _names_in(model, "extras")
    sobel = {f"decoder.{n}" for n, m in model.decoder.named_modules() if isinstance(m, MaskedConv3x3)}
    assert extras == {f"{n}.weight" for n in sobel} and len(sobel) == 8
    assert _names_in(model, "extras", "kernel") == extras
    decoder = _names_in(model, "decoder")
    convs = {f"decoder.{n}.weight" for n, m in model.decoder.named_modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)}
    assert convs <= _names_in(model, "decoder", "kernel")
    deconvs = {f"decoder.{n}" for n, m in model.decoder.named_modules() if isinstance(m, Up)}
    assert {f"{n}.deconv.conv.bias" for n in deconvs} <= _names_in(model, "decoder", "bias")
    assert {f"{n}.bn.weight" for n in deconvs} <= _names_in(model, "decoder", "norm")
    assert decoder | extras == {n for n in group_of(model) if n.startswith("decoder.")}
    assert "classifier" not in parameter_groups(model)
    # the original: decoder W x10, b x20 with decay; Sobel kernels x1 without decay
    optimizer = make_optimizer(model, tiny_recipe("naked.fpn.learnable.sobel.channelwise.1order", "original").train)
    rules = {g["name"]: (g["grad_mult"], g["decay"]) for g in optimizer.param_groups}
    assert rules["decoder.kernel"] == (10.0, True) and rules["decoder.bias"] == (20.0, False)
    assert rules["decoder.norm"] == (1.0, False) and rules["extras.kernel"] == (1.0, False)
    assert rules["backbone.kernel"] == (1.0, True) and rules["backbone.norm"] == (1.0, False)


@pytest.mark.parametrize("gcn_style", ["paper", "original"])
def test_groups_gcn_kernels_are_extras_br_is_decoder(gcn_style):
    model = tiny("naked.gcn", "original", gcn_style=gcn_style)
    gcn = {f"decoder.{n}.weight" for n, m in model.decoder.named_modules()
           if isinstance(m, torch.nn.Conv2d) and any(isinstance(p, GlobalConv) and m in p.modules()
                                                      for p in model.decoder.modules())}
    assert len(gcn) == 16  # 4 laterals x 2 branches x 2 convs
    assert _names_in(model, "extras") == gcn == _names_in(model, "extras", "kernel")
    br = {f"decoder.{n}.{p}" for n, m in model.decoder.named_modules() if isinstance(m, BoundaryRefine)
          for p, _ in m.named_parameters()}
    assert len(br) == (4 * 4 + 3 * 4 if gcn_style == "paper" else 0)
    assert br <= _names_in(model, "decoder")


def test_groups_resblock_control_edge_and_spk_are_extras():
    model = tiny("naked.fpn.learnable.sobel.resblock.1order", "original")
    control = {f"decoder.{n}.{p}" for n, m in model.decoder.named_modules() if isinstance(m, SobelResBlock)
               for p, _ in m.named_parameters()}
    assert control and control == _names_in(model, "extras")
    assert {n for n in control if ".bn" in n} == _names_in(model, "extras", "norm")
    # the original's FPN resblock scripts: the control's convs trained like the decoder
    rules = {g["name"]: (g["grad_mult"], g["decay"]) for g in make_optimizer(
        model, tiny_recipe("naked.fpn.learnable.sobel.resblock.1order", "original").train).param_groups}
    assert rules["extras.kernel"] == (10.0, True) and rules["extras.bias"] == (20.0, False)

    model = tiny("naked.edgescale.spk", "original")
    assert _names_in(model, "extras", "scale") == {f"extras.{s}.edge.scale" for s in ("res2", "res3", "res4")}
    assert {n for n in _names_in(model, "extras") if n.startswith("logit_module.")} == {
        "logit_module.convs.0.weight", "logit_module.convs.1.weight"}
    assert _names_in(model, "classifier") == {"classifier.classifier.weight", "classifier.classifier.bias"}

    model = tiny("naked.sobel.head")
    assert _names_in(model, "extras") == {"extras.stem.sobel.scale"}
    assert _names_in(model, "extras", "scale") == {"extras.stem.sobel.scale"}
    model = tiny("naked.edge.conv3", "original")
    assert _names_in(model, "extras", "kernel") == {f"extras.{s}.edge.conv.weight" for s in ("res2", "res3", "res4")}


def test_groups_plain_classifier_and_frozen_bn():
    model = tiny("cs.resnet101", "original")
    assert isinstance(model.classifier, BasicBlockHead)
    assert _names_in(model, "classifier", "bias") == set()
    assert _names_in(model, "classifier", "norm") == {f"classifier.{n}" for n in (
        "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "shortcut.1.weight", "shortcut.1.bias")}
    model = tiny("naked.fpn", norm="frozen")
    assert "norm" not in parameter_groups(model)["backbone"]
    assert "norm" in parameter_groups(model)["decoder"]  # decoder BNs are not ImageNet's: they train
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.") for n in frozen)
    assert all(group_of(model)[n] is None for n in frozen)


@pytest.mark.parametrize(
    "variant, protocol",
    [("naked.edge.learnable.sobel", "original"), ("naked.learnable.sobel.channelwise.newcode", "deeplab"),
     ("naked.fpn.learnable.sobel.channelwise.1order.relu", "original"), ("naked.spk4", "deeplab"),
     ("naked.learnable.sobel.sobelinit", "deeplab"), ("naked.learnable.sobel.sqrt", "original")],
)
def test_masked_entries_stay_zero_after_optimizer_steps(variant, protocol):
    recipe = tiny_recipe(variant, protocol)
    model = build_model(recipe.model, CLASSES)
    masked = [m for m in model.modules() if isinstance(m, MaskedConv3x3)]
    assert masked
    before = {id(m): m.weight.detach().clone() for m in masked}
    optimizers = [make_optimizer(model, recipe.train), torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)]
    for opt in optimizers:
        for _ in range(3):
            opt.zero_grad()
            run(model, (33, 33)).logsumexp(1).mean().backward()
            apply_gradient_rules(opt, 0.1)  # L2 on the decayed kernels, the multipliers
            opt.step()
    for m in masked:
        zero = m.mask == 0
        assert torch.isfinite(m.weight).all()
        assert torch.all(m.weight[..., zero] == 0), m
        assert torch.all(m.weight.grad[..., zero] == 0)
        assert not torch.equal(m.weight, before[id(m)])  # the other entries did learn


# ------------------------------------------------------------------ what each variant builds


def test_edge_variants_use_the_edge_map():
    for variant in ("naked.edge", "naked.edgescale", "naked.edge.conv3"):
        model = tiny(variant).eval()
        assert model.needs_edges
        images = torch.randn(1, 3, 33, 33)
        with pytest.raises(ValueError, match="edge"):
            model(images)
        with torch.no_grad():
            a = model(images, torch.zeros(1, 1, 33, 33))
            b = model(images, torch.ones(1, 1, 33, 33))
        assert not torch.allclose(a, b)
    assert not tiny("naked.edge.learnable.sobel").needs_edges


def test_label_and_training_tokens_do_not_change_the_model():
    base = sum(p.numel() for p in tiny("naked").parameters())
    for variant in ("naked.trimap", "naked.edgemix.r3", "naked.lr10.scale8.size512.bs4.randomresizefix.2gpu"):
        assert sum(p.numel() for p in tiny(variant).parameters()) == base


def test_placements():
    m = tiny("naked.sobel-res234")
    assert sorted(m.extras) == ["res2", "res3", "res4"]
    assert all(isinstance(m.extras[s].sobel, FixedSobel) for s in m.extras)
    assert sorted(tiny("naked.sobel.head").extras) == ["stem"]
    assert sorted(tiny("naked.sobellast").extras) == ["res4"]
    m = tiny("naked.learnable.sobel.newcode")
    assert sorted(m.extras) == ["res2", "res3", "res4", "res5"]
    m = tiny("naked.fpn.learnable.sobel.channelwise")
    assert not m.extras and len(m.decoder.lateral_extras) == 4 and m.classifier is None
    assert m.decoder.lateral_extras[0].convs[0].weight.shape == (CLASSES, 1, 3, 3)
    m = tiny("naked.fpn.learnable.sobel.resblock")
    assert all(type(e) is SobelResBlock and isinstance(e, ResidualBlock) for e in m.decoder.lateral_extras)
    assert tiny("naked.spk4").logit_module is not None and tiny("naked").logit_module is None
    m = tiny("naked.edgescale.sobel.learnable.sobel.channelwise")
    stage = m.extras["res2"]
    assert isinstance(stage.edge, EdgeInput) and isinstance(stage.sobel, FixedSobel)
    assert isinstance(stage.learnable, LearnableSobel)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_recipe_decides_formulas(protocol):
    """Form tokens, and the original's per-family defaults (naked learnable Sobel: sqrt, the
    model file in force at the rows' dates; newcode and FPN: 2order)."""
    m = tiny("naked.edge.learnable.sobel", protocol)
    assert m.extras["res2"].learnable.form == ("sqrt" if protocol == "original" else "2order")
    channelwise = tiny("naked.edge.learnable.sobel.channelwise", protocol).extras["res3"].learnable.form
    assert channelwise == ("sqrt" if protocol == "original" else "2order")
    assert tiny("naked.edge.learnable.sobel.channelwise.newcode", protocol).extras["res5"].learnable.form == "2order"
    assert tiny("naked.edge.learnable.sobel.channelwise.2order", protocol).extras["res3"].learnable.form == "2order"
    assert tiny("naked.fpn.learnable.sobel.channelwise.1order", protocol).decoder.lateral_extras[0].form == "1order"
    assert tiny("naked.sobel.square", protocol).extras["res2"].sobel.form == "square"
    assert tiny("naked.sobel", protocol).extras["res2"].sobel.form == "identity"
    m = tiny("naked.fpn.learnable.sobel.channelwise.1order.relu.sobelinit", protocol)
    extra = m.decoder.lateral_extras[0]
    assert extra.relu and torch.equal(extra.convs[0].weight[0, 0], torch.tensor(
        ((-1.0, -2, -1), (0, 0, 0), (1, 2, 1))))
    assert tiny("naked.spk", protocol).logit_module.form == "1order"
    assert tiny("naked.gcn", protocol, gcn_style="original").decoder.merges is None
    assert tiny("naked.gcn", protocol).decoder.merges is not None  # paper by default (a named fix)


def test_framework_reaches_every_resize():
    """tf1 numerics in the backbone, the FPN deconvs, the edge resize and the final upsampling."""
    m = tiny("naked.edge", "original")
    assert m.framework == "tf1" and m.extras["res2"].edge.framework == "tf1"
    m = tiny("naked.fpn.bilinear", "original")
    assert m.decoder.framework == "tf1" and all(up.framework == "tf1" for up in m.decoder.ups)
    assert tiny("naked.fpn", "deeplab").decoder.ups[0].deconv.framework == "pytorch"
