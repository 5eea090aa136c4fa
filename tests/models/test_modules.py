"""The modules' formulas (segdist.models.sobel, fpn, heads) against explicit references written
from the original code's description (reference/recipes.md, the modules' docstrings)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segdist.models.fpn import BoundaryRefine, FPNDecoder, GlobalConv, ResidualBlock
from segdist.models.heads import ASPPHead, BasicBlockHead, NakedHead
from segdist.models.sobel import (
    MASKS,
    SOBEL,
    SQRT_FLOOR,
    EdgeInput,
    FixedSobel,
    LearnableSobel,
    MaskedConv3x3,
    SobelResBlock,
    StageExtras,
    learnable_sobel,
)
from segdist.models.tf1 import resize_bilinear

SOBEL_X = torch.tensor(SOBEL["h"], dtype=torch.float32)
SOBEL_Y = torch.tensor(SOBEL["v"], dtype=torch.float32)


def responses(module: LearnableSobel, x: torch.Tensor) -> list[torch.Tensor]:
    """c_k by hand: the masked kernel, zero padding 1."""
    out = []
    for conv in module.convs:
        mask = torch.tensor(MASKS[conv.kernel], dtype=torch.float32)
        out.append(F.conv2d(x, conv.weight * mask, padding=1, groups=conv.groups))
    return out


def depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    return F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)


# ------------------------------------------------------------------ learnable Sobel


def test_masks_match_the_original():
    assert MASKS["v"] == ((1, 1, 1), (0, 0, 0), (1, 1, 1))  # W1
    assert MASKS["h"] == ((1, 0, 1), (1, 0, 1), (1, 0, 1))  # W2
    for key, kernel in SOBEL.items():  # every Sobel kernel lives on its mask's support
        assert all((k != 0) == bool(m) for kr, mr in zip(kernel, MASKS[key], strict=True)
                   for k, m in zip(kr, mr, strict=True)), key


@pytest.mark.parametrize("channelwise", [True, False])
@pytest.mark.parametrize("form", ["1order", "2order", "sqrt"])
@pytest.mark.parametrize("relu", [False, True])
def test_learnable_sobel_formulas(channelwise, form, relu):
    m = LearnableSobel(3, channelwise=channelwise, form=form, relu=relu, init="tensorpack")
    x = torch.randn(2, 3, 8, 7)
    c1, c2 = responses(m, x)
    if relu:
        c1, c2 = c1.relu(), c2.relu()
    expected = {"1order": x + c1 + c2, "2order": x + c1**2 + c2**2, "sqrt": x + (c1**2 + c2**2).sqrt()}[form]
    assert torch.allclose(m(x), expected, atol=1e-5)


def test_learnable_sobel_bad_form():
    with pytest.raises(ValueError, match="form"):
        LearnableSobel(3, form="square")


def test_learnable_sobel_sqrt_finite_gradient_where_both_responses_vanish():
    m = LearnableSobel(2, channelwise=True, form="sqrt", init="tensorpack")
    x = torch.zeros(1, 2, 6, 6, requires_grad=True)  # c1 = c2 = 0 everywhere
    out = m(x)
    assert torch.allclose(out, torch.full_like(out, SQRT_FLOOR**0.5))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(c.weight.grad).all() for c in m.convs)
    # the magnitude itself where it is not tiny
    y = torch.randn(1, 2, 6, 6)
    c1, c2 = responses(m, y)
    assert torch.allclose(m(y) - y, (c1**2 + c2**2).sqrt(), atol=1e-5)


def test_spk4_sums_four_masked_responses():
    m = LearnableSobel(3, channelwise=True, form="1order", masks=("v", "h", "d1", "d2"), init="tensorpack")
    x = torch.randn(1, 3, 7, 7)
    assert [c.kernel for c in m.convs] == ["v", "h", "d1", "d2"]
    assert torch.allclose(m(x), x + sum(responses(m, x)), atol=1e-5)


def test_sobel_init_values():
    wise = LearnableSobel(3, channelwise=True, sobel_init="sobel", masks=("v", "h", "d1", "d2"))
    for conv, key in zip(wise.convs, ("v", "h", "d1", "d2"), strict=True):
        for c in range(3):
            assert torch.equal(conv.weight[c, 0], torch.tensor(SOBEL[key], dtype=torch.float32))
    cross = LearnableSobel(3, channelwise=False, sobel_init="sobel")
    w = cross.convs[1].weight
    assert torch.equal(w[1, 1], SOBEL_X) and w[0, 1].abs().sum() == 0 and w[2, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="Sobel init"):
        MaskedConv3x3(3, "v", channelwise=True, sobel_init="bogus")


def test_masked_entries_zeroed_on_load():
    conv = MaskedConv3x3(4, "v", channelwise=True)
    conv.load_state_dict({"weight": torch.ones(4, 1, 3, 3)})
    assert torch.equal(conv.weight[0, 0], torch.tensor(((1.0, 1, 1), (0, 0, 0), (1, 1, 1))))
    assert set(conv.state_dict()) == {"weight"}  # the mask is not a checkpoint entry


def test_learnable_sobel_factory():
    assert isinstance(learnable_sobel(4, "resblock", "1order", False, "random", "tensorpack"), SobelResBlock)
    wise = learnable_sobel(4, "channelwise", "sqrt", True, "random", "tensorpack")
    assert (wise.form, wise.relu, wise.convs[0].groups) == ("sqrt", True, 4)
    assert learnable_sobel(4, "channelcross", "2order", False, "random", "pytorch").convs[0].groups == 1
    with pytest.raises(ValueError, match="kind"):
        learnable_sobel(4, "bogus", "2order", False, "random", "pytorch")


# ------------------------------------------------------------------ fixed Sobel


@pytest.mark.parametrize("form", ["square", "sqrt", "identity"])
def test_fixed_sobel_forms(form):
    m = FixedSobel(3, form=form)
    with torch.no_grad():
        m.scale.copy_(torch.tensor([1.0, 0.5, -2.0]))
    x = torch.randn(2, 3, 7, 9)
    energy = depthwise(x, SOBEL_X) ** 2 + depthwise(x, SOBEL_Y) ** 2
    f = {"square": energy**2, "sqrt": energy.sqrt(), "identity": energy}[form]
    assert torch.allclose(m(x), x + m.scale.view(1, 3, 1, 1) * f, rtol=1e-4, atol=1e-4)


def test_fixed_sobel_is_true_sobel_magnitude():
    m = FixedSobel(2)
    assert m.form == "identity"
    x = torch.zeros(1, 2, 6, 6)
    x[:, :, :, 3:] = 1.0  # a vertical step edge
    out = m(x)
    # interior pixels next to the step: gx = 4 -> gx^2 = 16 added; flat interior unchanged
    assert torch.allclose(out[0, :, 2, 2], torch.full((2,), 16.0))
    assert torch.allclose(out[0, :, 2, 3], torch.full((2,), 17.0))
    assert torch.equal(out[0, :, 2, 1], x[0, :, 2, 1]) and torch.equal(out[0, :, 2, 4], x[0, :, 2, 4])
    assert torch.allclose(FixedSobel(2, "square")(x)[0, :, 2, 2], torch.full((2,), 256.0))
    assert torch.allclose(FixedSobel(2, "sqrt")(x)[0, :, 2, 2], torch.full((2,), 4.0))
    assert m.scale.shape == (2,) and torch.equal(m.scale, torch.ones(2))
    assert set(m.state_dict()) == {"scale"}
    with pytest.raises(ValueError, match="form"):
        FixedSobel(2, "2order")


def test_fixed_sobel_sqrt_finite_gradient_on_flat_input():
    m = FixedSobel(2, "sqrt")
    x = torch.ones(1, 2, 5, 5, requires_grad=True)  # gx = gy = 0 in the interior
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.scale.grad).all()


# ------------------------------------------------------------------ edge input


@pytest.mark.parametrize("framework", ["tf1", "pytorch"])
def test_edge_input_modes(framework):
    x = torch.randn(2, 4, 9, 9)
    edges = torch.rand(2, 1, 33, 33)
    e = resize_bilinear(edges, (9, 9), framework)
    add = EdgeInput("add", 4, framework)
    assert list(add.parameters()) == []
    assert torch.allclose(add(x, edges), x + e, atol=1e-6)

    scale = EdgeInput("scale", 4, framework)
    with torch.no_grad():
        scale.scale.copy_(torch.tensor([2.0, 0.0, -1.0, 3.0]))
    # edgescale scales the features, not the edge: e + l * s
    assert torch.allclose(scale(x, edges), e + x * scale.scale.view(1, 4, 1, 1), atol=1e-6)

    conv3 = EdgeInput("conv3", 4, framework, init="tensorpack")
    assert conv3.conv.bias is None
    assert torch.allclose(conv3(x, edges), x + F.conv2d(e, conv3.conv.weight, padding=1), atol=1e-5)
    with pytest.raises(ValueError, match="edge input"):
        EdgeInput("mul", 4)


def test_stage_extras_order():
    """Edge input, then fixed Sobel, then the learnable Sobel."""
    edge, fixed, learn = EdgeInput("add", 3), FixedSobel(3), LearnableSobel(3, init="tensorpack")
    extras = StageExtras(edge=edge, sobel=fixed, learnable=learn)
    x, edges = torch.randn(1, 3, 8, 8), torch.rand(1, 1, 16, 16)
    assert torch.allclose(extras(x, edges), learn(fixed(edge(x, edges))))
    assert torch.equal(StageExtras()(x), x)


# ------------------------------------------------------------------ FPN/GCN decoders


def test_residual_block_has_no_relu_after_the_sum():
    block = ResidualBlock(5, 5, init="tensorpack").eval()  # gamma 0: the branch is zero at init
    x = -torch.rand(1, 5, 6, 6) - 0.1
    assert torch.equal(block(x), x)  # negative values survive: no final ReLU
    projected = ResidualBlock(7, 5, init="tensorpack").eval()
    x = torch.randn(1, 7, 6, 6)
    with torch.no_grad():
        expected = projected.shortcut(x)  # branch zero, projection + BN
        assert torch.allclose(projected(x), expected)
        assert (expected < 0).any()


def test_residual_block_formula():
    block = ResidualBlock(6, 4, init="pytorch").eval()
    for bn in (block.bn1, block.bn2, block.shortcut[1]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), branch + block.shortcut[1](block.shortcut[0](x)), atol=1e-5)


@pytest.mark.parametrize("style", ["paper", "original"])
def test_gcn_branch_orders(style):
    g = GlobalConv(3, 4, k=15, style=style)
    left = [tuple(c.kernel_size) for c in g.left]
    right = [tuple(c.kernel_size) for c in g.right]
    # original: both branches 1 x k then k x 1; paper: k x 1 -> 1 x k and 1 x k -> k x 1
    assert left == ([(1, 15), (15, 1)] if style == "original" else [(15, 1), (1, 15)])
    assert right == [(1, 15), (15, 1)]
    x = torch.randn(1, 3, 9, 9)
    assert torch.allclose(g(x), g.right(x) + g.left(x))
    assert g(x).shape == (1, 4, 9, 9)


def test_boundary_refine_formula():
    br = BoundaryRefine(3)
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(br(x), x + br.conv2(F.relu(br.conv1(x))))


def reference_decoder(dec: FPNDecoder, feats, size, style, gcn_style="paper"):
    """The module docstring's table, written out: laterals, top-down sums, the tail."""
    framework = dec.framework

    def lateral(i):
        x = dec.laterals[i](feats[i])
        return x if dec.lateral_extras is None else dec.lateral_extras[i](x)

    def up(module, x, target):
        if style in ("fpn", "gcn"):
            return F.relu(module.bn(module.deconv(x, target)))
        return resize_bilinear(x, target, framework)

    p = lateral(3)
    for i in (2, 1, 0):
        u = up(dec.ups[i], p, feats[i].shape[-2:])
        if style == "fpn.standard":
            p = lateral(i) + dec.smooths[i](u)  # smooth the upsampled map BEFORE the sum
        else:
            p = lateral(i) + u
        if style == "gcn" and gcn_style == "paper":
            p = dec.merges[i](p)
    h, w = size
    p = dec.finals[0](up(dec.final_ups[0], p, ((h + 1) // 2, (w + 1) // 2)))
    return dec.finals[1](up(dec.final_ups[1], p, (h, w)))


@pytest.mark.parametrize("style, gcn_style", [("fpn", "paper"), ("fpn.bilinear", "paper"), ("fpn.standard", "paper"),
                                              ("gcn", "paper"), ("gcn", "original")])
@pytest.mark.parametrize("framework", ["tf1", "pytorch"])
def test_decoder_follows_the_table(style, gcn_style, framework):
    torch.manual_seed(3)
    channels, k = (8, 16, 32, 64), 3
    extra = (lambda c: LearnableSobel(c, init="tensorpack", form="1order")) if style == "fpn" else None
    dec = FPNDecoder(channels, k, style, extra, gcn_k=5, gcn_style=gcn_style, framework=framework,
                     init="pytorch").eval()
    for m in dec.modules():  # non-trivial BNs, so that a misplaced block shows
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
    size = (65, 47)
    feats = [torch.randn(1, c, s, t) for c, (s, t) in zip(channels, ((17, 12), (9, 6), (5, 3), (3, 2)), strict=True)]
    with torch.no_grad():
        out = dec(feats, size)
        assert out.shape == (1, k, *size)
        assert torch.allclose(out, reference_decoder(dec, feats, size, style, gcn_style), atol=1e-5)
        assert (out < 0).any()  # logits: no ReLU at the end


def test_decoder_structure_per_style():
    channels = (8, 16, 32, 64)
    fpn = FPNDecoder(channels, 3, "fpn")
    assert all(isinstance(lat, ResidualBlock) for lat in fpn.laterals)
    assert all(up.deconv is not None for up in (*fpn.ups, *fpn.final_ups))
    assert fpn.smooths is None and fpn.merges is None and fpn.lateral_extras is None
    bilinear = FPNDecoder(channels, 3, "fpn.bilinear")
    assert all(up.deconv is None for up in (*bilinear.ups, *bilinear.final_ups))
    assert sum(p.numel() for p in bilinear.ups.parameters()) == 0
    standard = FPNDecoder(channels, 3, "fpn.standard")
    assert len(standard.smooths) == 3 and all(up.deconv is None for up in standard.ups)
    original = FPNDecoder(channels, 3, "gcn", gcn_style="original")
    assert all(isinstance(lat, GlobalConv) for lat in original.laterals) and original.merges is None
    assert not any(isinstance(m, BoundaryRefine) for m in original.modules())
    paper = FPNDecoder(channels, 3, "gcn", gcn_style="paper")
    assert all(isinstance(lat[0], GlobalConv) and isinstance(lat[1], BoundaryRefine) for lat in paper.laterals)
    assert len(paper.merges) == 3
    assert all(up.deconv is not None for up in paper.ups)
    with pytest.raises(ValueError, match="FPN style"):
        FPNDecoder(channels, 3, "unet")


# ------------------------------------------------------------------ heads


def test_naked_and_aspp_heads():
    x = torch.randn(1, 16, 9, 9)
    naked = NakedHead(16, 4, bias=False, init="tensorpack")
    conv = naked.classifier
    assert (conv.dilation, conv.padding, conv.bias) == ((6, 6), (6, 6), None)
    assert torch.allclose(naked(x), F.conv2d(x, conv.weight, padding=6, dilation=6))
    assert NakedHead(16, 4, bias=True).classifier.bias is not None
    aspp = ASPPHead(16, 4, bias=True)
    assert [b.dilation[0] for b in aspp.branches] == [6, 12, 18, 24]
    assert torch.allclose(aspp(x), sum(b(x) for b in aspp.branches), atol=1e-6)


def test_basic_block_head_no_bias_no_final_relu():
    head = BasicBlockHead(16, 4, init="tensorpack").eval()
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        out = head(x)
        assert torch.allclose(out, head.shortcut(x))  # gamma 0 on bn2: only the projection at init
        assert (out < 0).any()
