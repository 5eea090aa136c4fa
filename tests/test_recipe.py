"""segdist.recipe / segdist.protocols: how a variant and a study's values resolve."""

import dataclasses

import pytest

from segdist.errors import SegdistError
from segdist.recipe import GroupRule, Recipe, explain_table, from_dict
from segdist.resolve import resolve_recipe


def resolve(variant="naked", protocol="original", **values):
    return resolve_recipe({"model.variant": variant, **{k.replace("__", "."): v for k, v in values.items()}},
                          protocol, "study.yaml")


def test_an_absent_token_means_what_the_family_script_did():
    naked, fpn, cs_fpn, plain = resolve("naked"), resolve("naked.fpn"), resolve("cs.naked.fpn"), resolve("cs.resnet101")
    assert (naked.train.crop_size, naked.train.batch_size, naked.train.epoch_scale) == ((321, 321), 10, 8)
    assert (fpn.train.crop_size, fpn.train.batch_size) == ((512, 512), 10)
    assert (cs_fpn.train.crop_size, cs_fpn.train.batch_size, cs_fpn.train.epoch_scale) == ((1024, 2048), 1, 3)
    assert (plain.model.decoder, plain.model.stride_on, plain.model.output_stride) == ("plain", ("3x3",) * 3, 32)
    assert naked.model.stride_on[:2] == ("1x1", "1x1") and naked.model.dilations == (1, 2, 4)
    assert fpn.train.multipliers.decoder == GroupRule(10, 20, True)  # every FPN script: ('fpn.*W', 10)
    assert fpn.train.multipliers.extras == GroupRule(1, 1, False)  # Sobel/GCN kernels: matched by nothing
    assert cs_fpn.train.multipliers.decoder == GroupRule(1, 1, True)  # ('aspp.*', ...) matched nothing
    assert resolve("cs.naked.fpn.lr10").train.multipliers == cs_fpn.train.multipliers  # "(lr10)" too
    assert resolve("naked.fpn.lr1").train.multipliers.decoder == GroupRule(1, 2, True)
    assert resolve("naked.sobel.lr10").train.multipliers.extras == GroupRule(10, 10, False)
    assert resolve("naked.edge.conv3.lr10").train.multipliers.extras == GroupRule(10, 10, True)  # edge_conv_group/W
    assert naked.model.classifier_bias and not resolve("voc.size512").model.classifier_bias
    assert not resolve("naked.learnable.sobel.channelwise.newcode").model.classifier_bias


def test_the_deeplab_protocol_is_deeplabs_recipe():
    r = resolve("naked", "deeplab")
    assert (r.train.optimizer, r.train.schedule, r.train.weight_decay, r.model.output_stride) == ("sgd", "poly", 5e-4, 8)
    assert r.train.multipliers.classifier == GroupRule(10, 20, True) and r.eval.tile is None
    assert (r.model.framework, r.model.init, r.train.augmentation) == ("pytorch", "pytorch", "deeplab")
    assert resolve("naked.fpn", "deeplab").model.output_stride == 32


def test_steps_per_epoch_each_gpu_draws_its_own_batch_in_the_original():
    four, one = resolve("naked.4gpu.bs8"), resolve("naked.bs8")
    assert four.passes_per_epoch == 32 and one.passes_per_epoch == 8
    assert four.steps_per_epoch(10582, 4) == (10582 // 8) * 8 == one.steps_per_epoch(10582, 1)
    deeplab = resolve("naked", "deeplab", resources__workers=2)
    assert deeplab.passes_per_epoch == 1 and deeplab.steps_per_epoch(100, 2) == 7  # ceil(100 / 16)


def test_full_is_the_cityscapes_frame_and_aug_its_random_resize():
    full, aug = resolve("cs.naked.full"), resolve("cs.naked.full.aug")
    assert (full.train.crop_size, full.train.scale_range, full.eval.tile) == ((1024, 2048), (1.0, 1.0), (1024, 2048))
    assert aug.train.scale_range == (0.7, 1.5)
    with pytest.raises(SegdistError, match="'full' is the whole 1024x2048 Cityscapes frame"):
        resolve("naked.full")


def test_study_values_override_defaults_and_are_coerced():
    r = resolve("naked", train__crop_size=(400, 400), train__image_pad="mean", eval__scales=(0.5, 1.0))
    assert r.train.crop_size == (400, 400) and r.eval.tile == (400, 400)  # EVAL-A(t): tiles of the crop
    assert r.train.image_pad == (124, 116, 104)
    from segdist.resolve import coerce_value

    assert coerce_value("train.crop_size", 321, "w") == (321, 321)
    assert coerce_value("eval.scales", "deeplab", "w") == (0.5, 0.75, 1.0, 1.25, 1.5)
    assert coerce_value("train.multipliers", {"decoder": 5, "extras": [3, 3, False]}, "w") == {
        "decoder": (5.0, None, None), "extras": (3.0, 3.0, False)}  # None: the group's bias ratio
    with pytest.raises(SegdistError, match="unknown group 'head'"):
        coerce_value("train.multipliers", {"head": 10}, "w")
    r = resolve_recipe({"model.variant": "naked.fpn", "train.multipliers": {"extras": (3.0, 3.0, True)}},
                       "original", "w")
    assert r.train.multipliers.extras == GroupRule(3, 3, True) and r.train.multipliers.decoder == GroupRule(10, 20, True)


def test_smoke_pins_the_tiny_sizes_whatever_the_tokens_say():
    r = resolve_recipe({"model.variant": "cs.naked.fpn.4gpu.bs8.scale12"}, "original", "w", smoke=True)
    assert (r.model.depth, r.model.width, r.model.pretrained) == (18, 4, None)
    assert (r.train.crop_size, r.train.batch_size, r.train.epoch_scale, r.resources.workers) == ((32, 32), 2, 1.0, 1)
    assert r.eval.tile == (32, 32) and r.train.dataset is None


def test_a_recipe_round_trips_through_plain_dicts_and_flattens_every_field():
    r = resolve("naked.fpn.learnable.sobel.channelwise.1order.lr10")
    assert from_dict(Recipe, dataclasses.asdict(r)) == r
    flat = r.flat()
    for section in ("model", "train", "eval", "resources"):
        for f in dataclasses.fields(getattr(r, section)):
            assert any(key == f"{section}.{f.name}" or key.startswith(f"{section}.{f.name}.") for key in flat), f.name
    assert flat["train.multipliers.decoder"] == "W x10, b x20, decay" and flat["train.crop_size"] == "512x512"


def test_explain_table_has_the_common_fields_once_and_the_differences_per_row():
    recipes = [resolve("naked.fpn"), resolve("naked.fpn.lr1")]
    table = explain_table(recipes, ["a naked.fpn", "b naked.fpn.lr1"])
    assert "| train.optimizer | adam_tf1 |" in table
    rows = [line for line in table.splitlines() if line.startswith(("| a ", "| b "))]
    assert len(rows) == 2 and "W x1, b x2, decay" in rows[1] and "W x10, b x20, decay" in rows[0]
    header = next(line for line in table.splitlines() if line.startswith("| configuration"))
    assert "train.multipliers.decoder" in header and "train.optimizer" not in header
