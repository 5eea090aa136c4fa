import dataclasses

import pytest

from segdist.errors import SegdistError
from segdist.models.variant import Variant, parse_variant, valid_tokens
from segdist.resolve import resolve_recipe

# Every dotted name in reference/000_228ee7611dc2548c.txt, as written there.
LOG_NAMES = [
    "deeplabv2.naked.fpn.standard(lr10,scale8)",
    "deeplabv2.naked.fpnstandard.learnable.sobel.channelwise(lr10)",
    "deeplabv2.naked.fpn.standard.scale10(lr10)",
    "deeplabv2.naked.fpn.standard.scale10(lr12)",
    "deeplabv2.naked.fpn(lr10,scale8)",
    "deeplabv2.naked.fpn.learnable.sobel.channelwise(lr10,2order)",
    "deeplabv2.naked.fpn.learnable.sobel.channelwise.1order(lr10)",
    "deeplabv2.naked.fpn.learnable.sobel.channelcross.1order.py(lr10)",
    "deeplabv2.naked.fpn.learnable.sobel.channelwise.1order.relu",
    "deeplabv2.naked.fpn.learnable.sobel.resblock.1order.py(lr10)",
    "deeplabv2.cs.naked.fpn(lr10)",
    "deeplabv2.cs.naked.fpn.learnable.sobel.resblock.1order",
    "deeplabv2.cs.naked.fpn.learnable.sobel.channelwise.1order(lr10)",
    "deeplabv2.naked.fpn.scale10(lr10)",
    "deeplabv2.naked.fpn.scale12(lr10)",
    "deeplabv2.naked.fpn.bilinear(lr10)",
    "deeplabv2.naked.fpn.lr1",
    "deeplabv2.naked.fpn.learnable.sobel.channelwise.lr1",
    "deeplabv2.naked.fpn.learnable.sobel.channelcross.lr1",
    "deeplabv2.naked.gcn(lr10)",
    "deeplabv2.naked",
    "deeplabv2.naked.edge.learnable.sobel",
    "deeplabv2.naked.edge.learnable.sobel.channelwise",
    "deeplabv2.naked.edge.learnable.sobel.channelwise.lr10",
    "deeplabv2.naked.edge.learnable.sobel.channelwise.lr1.newcode",
    "deeplabv2.naked.edge.learnable.sobel.channelwise.lr10.newcode",
    "deeplabv2.voc.size512",
    "deeplabv2.voc.size512.randomresizefix",
    "deeplabv2.cs.resnet101.scale8",
    "deeplabv2.cs.resnet101.scale3",
    "deeplabv2.cs.resnet101.scale8(randomresizefix,full,aug,bs1,msf)",
    # the bracketed descriptions' tokens, written as names
    "naked.edge", "naked.edgescale", "naked.edge.conv3", "naked.sobel.lr10", "naked.sobel",
    "naked.sobel-res234", "naked.sobellast", "naked.sobel.head", "naked.trimap", "cs.naked.edgemix",
    "naked.spk", "naked.spk4",
    # the log's multi-GPU row (deeplabv2.naked.4gpu.py) and the fixed Sobel's earlier forms
    "deeplabv2.naked.4gpu", "naked.sobel.square", "naked.sobel.sqrt", "naked.learnable.sobel.sqrt",
]


@pytest.mark.parametrize("name", LOG_NAMES)
def test_every_log_name_parses(name):
    v = parse_variant(name)
    assert isinstance(v, Variant) and v.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.decoder = "aspp"


def test_fpn_family():
    v = parse_variant("deeplabv2.naked.fpn.learnable.sobel.channelwise.1order")
    assert (v.decoder, v.family, v.learnable_sobel, v.sobel_form, v.learnable_sobel_at) == (
        "fpn", "fpn", "channelwise", "1order", ("laterals",))
    assert v.edge_input is None and v.sobel_init == "random" and not v.sobel_relu
    assert parse_variant("naked.fpnstandard").decoder == "fpn.standard"
    assert parse_variant("naked.fpn.standard").decoder == "fpn.standard"
    assert parse_variant("naked.fpn.bilinear").decoder == "fpn.bilinear"
    assert (parse_variant("naked.gcn").decoder, parse_variant("naked.gcn").family) == ("gcn", "fpn")
    assert parse_variant("naked.fpn.learnable.sobel.channelwise.1order.relu").sobel_relu
    v = parse_variant("deeplabv2.naked.fpn.learnable.sobel.channelwise(lr10,2order)")
    assert (v.sobel_form, v.lr_mult) == ("2order", 10.0)
    v = parse_variant("deeplabv2.naked.fpn.learnable.sobel.resblock.1order.py(lr10)")
    assert (v.learnable_sobel, v.sobel_form) == ("resblock", "1order")


def test_families_and_plain_decoder():
    assert (parse_variant("deeplabv2.naked").decoder, parse_variant("deeplabv2.naked").family) == ("naked", "naked")
    assert parse_variant("aspp").family == "naked"
    v = parse_variant("deeplabv2.voc.size512")
    assert (v.decoder, v.family, v.dataset) == ("naked", "voc", "voc")
    assert parse_variant("voc.naked").family == "naked"  # an explicit decoder names the root family
    v = parse_variant("deeplabv2.cs.resnet101.scale8")
    assert (v.decoder, v.family, v.dataset) == ("plain", "plain", "cityscapes")
    assert "resnet101" in valid_tokens() and "plain" not in valid_tokens()


def test_plain_learnable_sobel_and_edge_family():
    v = parse_variant("deeplabv2.naked.edge.learnable.sobel")
    # `edge` before `learnable.sobel` names the script family: no Canny input
    assert v.edge_family and v.edge_input is None
    # no form token: the recipe decides (the original's naked channel-cross script: sqrt)
    assert (v.decoder, v.learnable_sobel, v.sobel_form) == ("naked", "channelcross", None)
    assert v.learnable_sobel_at == ("res2", "res3", "res4")
    v = parse_variant("deeplabv2.naked.edge.learnable.sobel.channelwise.lr10.newcode")
    assert v.newcode and v.learnable_sobel_at == ("res2", "res3", "res4", "res5")
    assert (v.learnable_sobel, v.lr_mult) == ("channelwise", 10.0)
    assert parse_variant("naked.learnable.sobel.sobelinit").sobel_init == "sobel"
    assert parse_variant("naked.spk.sobelinit").sobel_init == "sobel"


def test_sobel_forms():
    assert parse_variant("naked.learnable.sobel.sqrt").sobel_form == "sqrt"
    v = parse_variant("naked.sobel.square")
    assert (v.sobel_form, v.fixed_sobel_at, v.learnable_sobel) == ("square", ("res2",), None)
    assert parse_variant("naked.sobel-res234.sqrt").sobel_form == "sqrt"
    assert parse_variant("naked.sobel").sobel_form is None  # the recipe's fixed_sobel_form decides
    assert parse_variant("naked.sobel.square.learnable.sobel").sobel_form == "square"  # square: fixed only


def test_edge_inputs_and_fixed_sobel():
    assert parse_variant("naked.edge").edge_input == "add"
    assert parse_variant("naked.edgescale").edge_input == "scale"
    v = parse_variant("naked.edge.conv3")
    assert v.edge_input == "conv3" and not v.fixed_sobel_at
    assert parse_variant("naked.sobel").fixed_sobel_at == ("res2",)
    assert parse_variant("naked.sobel.lr10").fixed_sobel_at == ("res2",)
    assert parse_variant("naked.sobellast").fixed_sobel_at == ("res4",)
    assert parse_variant("naked.sobel.head").fixed_sobel_at == ("stem",)
    assert parse_variant("naked.sobel-res234").fixed_sobel_at == ("res2", "res3", "res4")
    assert parse_variant("naked.sobellast.sobel.head").fixed_sobel_at == ("stem", "res4")  # stage order
    assert parse_variant("naked").fixed_sobel_at == () and parse_variant("naked").learnable_sobel is None


def test_spk_labels_and_training_tokens():
    assert parse_variant("naked.spk").spk == 2 and parse_variant("naked.spk4").spk == 4
    assert parse_variant("naked").label_mode == "hard"
    assert parse_variant("naked.trimap").label_mode == "trimap"
    v = parse_variant("cs.naked.edgemix.r3")
    assert (v.label_mode, v.edgemix_radius, v.dataset) == ("edgemix", 3, "cityscapes")
    assert parse_variant("naked.edgemix").edgemix_radius == 1
    v = parse_variant("deeplabv2.voc.size512.randomresizefix")
    assert (v.dataset, v.crop_size, v.randomresizefix) == ("voc", 512, True)
    v = parse_variant("deeplabv2.naked.fpn.standard(lr10,scale8)")
    assert (v.decoder, v.lr_mult, v.epoch_scale) == ("fpn.standard", 10.0, 8.0)
    v = parse_variant("deeplabv2.cs.resnet101.scale8(randomresizefix,full,aug,bs1,msf)")
    assert (v.batch_size, v.full, v.aug, v.epoch_scale, v.crop_size) == (1, True, True, 8.0, None)
    assert parse_variant("naked.imagesize473").crop_size == 473
    assert parse_variant("Deeplabv2.Naked.FPN").decoder == "fpn"
    v = parse_variant("deeplabv2.naked.fpn.learnable.sobel.lr1.scale8.size512.bs4.2gpu")
    assert (v.lr_mult, v.epoch_scale, v.crop_size, v.batch_size, v.workers) == (1.0, 8.0, 512, 4, 2)
    assert parse_variant("deeplabv2.naked.4gpu").workers == 4
    assert parse_variant("naked").workers is None and parse_variant("naked").lr_mult is None
    assert parse_variant("cs.naked.full").full and not parse_variant("cs.naked.full").aug


def model_recipe(variant, protocol="deeplab"):
    values = {"model.variant": variant, "model.depth": 18, "model.width": 4, "model.pretrained": None}
    return resolve_recipe(values, protocol, "test").model


@pytest.mark.parametrize("protocol", ["original", "deeplab"])
def test_form_tokens_reach_the_model_recipe(protocol):
    assert model_recipe("naked.learnable.sobel.channelwise.1order", protocol).learnable_sobel_form == "1order"
    assert model_recipe("naked.fpn.learnable.sobel.channelwise.2order", protocol).learnable_sobel_form == "2order"
    assert model_recipe("naked.learnable.sobel.sqrt", protocol).learnable_sobel_form == "sqrt"
    m = model_recipe("naked.sobel.square", protocol)
    assert (m.fixed_sobel_form, m.fixed_sobel_at) == ("square", ("res2",))
    assert model_recipe("naked.sobel.sqrt", protocol).fixed_sobel_form == "sqrt"
    assert model_recipe("naked.sobel", protocol).fixed_sobel_form == "identity"
    m = model_recipe("naked.sobel.square.learnable.sobel.channelwise", protocol)
    assert (m.fixed_sobel_form, m.learnable_sobel) == ("square", "channelwise")


@pytest.mark.parametrize("protocol", ["original", "deeplab"])
def test_learnable_form_with_a_fixed_sobel_too(protocol):
    m = model_recipe("naked.sobel.learnable.sobel.channelwise.1order", protocol)
    assert (m.learnable_sobel_form, m.fixed_sobel_form) == ("1order", "identity")


@pytest.mark.parametrize(
    "name, words",
    [
        ("naked.bogus", "unknown token 'bogus'"),
        ("naked.aspp", "more than one decoder"),
        ("fpn.gcn", "more than one decoder"),
        ("fpn.standard.fpn.bilinear", "more than one decoder"),
        ("naked.learnable.sobel.1order.2order", "contradict"),
        ("naked.learnable.sobel.channelwise.channelcross", "contradict"),
        ("naked.learnable.sobel.resblock.channelwise", "contradict"),
        ("naked.spk.spk4", "contradict"),
        ("naked.trimap.edgemix", "contradict"),
        ("naked.edge.edgescale", "contradict"),
        ("cs.voc.naked", "contradict"),
        ("naked.lr10.lr1", "contradict"),
        ("naked.learnable", "'learnable' must be followed by 'sobel'"),
        ("naked.head", "unknown token 'head'"),
        ("naked.standard", "unknown token 'standard'"),
        ("naked.conv3", "unknown token 'conv3'"),
        ("naked.channelwise", "only means something with 'learnable.sobel'"),
        ("naked.1order", "only means something with 'learnable.sobel'"),
        ("naked.relu", "only means something with 'learnable.sobel'"),
        ("naked.sobelinit", "only means something"),
        ("naked.learnable.sobel.resblock.relu", "contradict"),
        ("naked.r3", "needs 'edgemix'"),
        ("naked..fpn", "empty token"),
        ("naked.fpn(lr10", "brackets"),
        ("", "empty token"),
        ("naked.lr0", "non-positive"),
        ("naked.0gpu", "non-positive"),
        ("naked.resnet101", "more than one decoder"),
        ("resnet101.fpn", "more than one decoder"),
        ("cs.naked.aug", "'aug' only means something with 'full'"),
        ("cs.naked.full.size512", "contradict"),
        ("naked.full", "'full' is the whole 1024x2048 Cityscapes frame: it needs 'cs'"),
        ("cs.naked.imagesize473.full", "contradict"),
        ("naked.square", "'square' only means something with a fixed 'sobel'"),
        ("naked.learnable.sobel.square", "'square' only means something with a fixed 'sobel'"),
        ("naked.sqrt", "'sqrt' only means something"),
        ("naked.sobel.learnable.sobel.sqrt", "ambiguous"),
        ("naked.learnable.sobel.resblock.sqrt", "contradict"),
        ("naked.learnable.sobel.sqrt.1order", "contradict"),
        ("naked.sobel.2gpu.4gpu", "contradict"),
    ],
)
def test_bad_variants_one_line(name, words):
    with pytest.raises(SegdistError) as info:
        parse_variant(name)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_error_lists_valid_tokens():
    with pytest.raises(SegdistError) as info:
        parse_variant("naked.fpn.learnable.sobel.channelwise.1order.2order")
    for token in ("learnable.sobel", "channelwise", "1order", "spk4", "sobel-res234", "edge.conv3", "trimap", "lrN"):
        assert token in str(info.value)
    assert "randomresizefix" in valid_tokens() and "fpnstandard" in valid_tokens()
