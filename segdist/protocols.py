"""The defaults a variant resolves to (segdist.resolve.resolve_recipe), per protocol.

`original` reproduces the script behind each results-log row (reference/recipes.md; the
facts below cite its codes: OPT, M-NAKED, M-FPN, AUG-A, EVAL-A, T), with the named bugs of
reference/variants.md fixed. The original's scripts come in families, and an absent token
means what that family's script did:

| family (variant)            | script                                            | crop       | batch | passes | multipliers (ScaleGradient)                   |
|-----------------------------|---------------------------------------------------|------------|-------|--------|-----------------------------------------------|
| naked, VOC                  | deeplabv2.naked.py (and its edge/sobel/trimap kin) | 321        | 10    | 8      | classifier W x10 b x20; lrN: extra modules    |
| voc (deeplabv2.voc.*)       | experiments/deeplabv2.voc.*.py                    | 321        | 10    | 8      | as naked; the classifier has no bias          |
| naked, Cityscapes           | deeplabv2.naked.cs.py                             | 321        | 8     | 8      | as naked                                      |
| naked, Cityscapes, full     | deeplabv2.naked.cs.full.py                        | 1024x2048  | 1     | 3      | as naked; no random resize unless `aug`       |
| fpn / gcn, VOC              | experiments/deeplabv2.naked.fpn*.py, ...gcn.py     | 512        | 10    | 8      | lrN (default 10): decoder W xN b x2N          |
| fpn, Cityscapes             | experiments/deeplabv2.cs.naked.fpn*.py            | 1024x2048  | 1     | 3      | none matched anything: everything x1 (lrN too)|
| plain (cs.resnet101)        | experiments/deeplabv2.cs.resnet101.scale*.py      | 1024x2048  | 1     | 8      | none matched anything: everything x1          |

Every family: Adam (TF1 form, epsilon 2.5e-4), lr 2.5e-4 with steps to 1e-4 / 1e-5 / 8e-6
after epochs 2 / 4 / 6 of 10; L2 2e-4 x 0.7 every 80k steps on conv kernels (`.*/W`); one
epoch = N passes per GPU (each GPU draws its own batch); tensorpack's augmentation (random
resize 0.7-1.5 with a 0.15 aspect limit, centred padding with the image padded (B,G,R) =
(255,0,0), random crop, flip); evaluation at scales 0.9/1/1.1 with tiles of the crop.
Fixed by default: flip at evaluation, tiles overlapping by 1/3 and padded with the mean,
labels resized nearest, GCN with both branch orders and Boundary Refinement.

`deeplab` is DeepLab v2's own recipe (Chen et al., TPAMI 2017), the default for new studies:
SGD (momentum 0.9), poly 0.9, weight decay 5e-4, classifier x10/x20, lrN on the decoder and
extra modules (default 10), random resize 0.5-1.5, mean padding, whole-image evaluation.
"""

from __future__ import annotations

from typing import Any

from segdist.data.transforms import MEAN_RGB as MEAN_PAD
from segdist.errors import SegdistError
from segdist.models.resnet import STRIDES as DEEPLAB_STRIDES
from segdist.models.variant import Variant
from segdist.recipe import GROUPS, GroupRule, Multipliers

CITYSCAPES_FRAME = (1024, 2048)
# OPT: lr 2.5e-4 -> 1e-4 after epoch 2, 1e-5 after 4, 8e-6 after 6 (ScheduledHyperParamSetter)
ORIGINAL_LR_STEPS = ((2, 0.4), (4, 0.04), (6, 0.032))
# RandomCropWithPadding's cv2.copyMakeBorder(value=255) on a 3-channel BGR image pads with
# Scalar(255, 0, 0): blue. In RGB:
ORIGINAL_IMAGE_PAD = (0, 0, 255)
# M-NAKED: res4 strides on its 1x1 conv AND dilates its 3x3 convs by 2; res5 dilation 4.
ORIGINAL_NAKED_STRIDES = ((2, 2, 1), (1, 2, 4))

COMMON = {
    "model.depth": 101,
    "model.width": 64,
    "model.norm": "batch",
    "model.sobel_init": "random",
    "model.gcn_style": "paper",
    "model.fixed_sobel_form": "identity",
    "train.epochs": 10,
    "train.flip": True,
    "train.momentum": 0.9,
    "train.poly_power": 0.9,
    "train.precision": "auto",
    "train.channels_last": False,
    "train.on_bad_sample": "raise",
    "train.on_nan": "stop",
    "train.max_failures": 3,  # worker-group restarts from the last checkpoint (lost workers, preemptions)
    "eval.boundary_kernels": (),
    "resources.workers": 1,
    "resources.cpus_per_worker": 1,
    "resources.gpus_per_worker": 0.0,
}

ORIGINAL = {
    **COMMON,
    "train.precision": "fp32",  # TF 1.4 trained in fp32 (bf16 is a choice a study may make, and say so)
    "model.framework": "tf1",
    "model.init": "tensorpack",
    "model.pretrained": "tensorpack",
    "train.optimizer": "adam_tf1",
    "train.lr": 2.5e-4,
    "train.adam_epsilon": 2.5e-4,
    "train.schedule": "steps",
    "train.lr_steps": ORIGINAL_LR_STEPS,
    "train.weight_decay": 2e-4,
    "train.weight_decay_rate": 0.7,
    "train.weight_decay_every": 80000,
    "train.epoch_scale_per_worker": True,
    "train.whole_batches": True,
    "train.augmentation": "tensorpack",
    "train.scale_range": (0.7, 1.5),
    "train.aspect_jitter": 0.15,
    "train.image_pad": ORIGINAL_IMAGE_PAD,
    "train.trimap_band": "original",
    "eval.scales": (0.9, 1.0, 1.1),
    "eval.flip": True,  # fixed: the log claims flip; the original never applied it
}

DEEPLAB = {
    **COMMON,
    "model.framework": "pytorch",
    "model.init": "pytorch",
    "model.pretrained": None,  # no ImageNet weights unless a study sets model.pretrained
    "model.stride_on": ("3x3", "3x3", "3x3"),
    "model.classifier_bias": True,
    "model.learnable_sobel_form": "2order",
    "train.optimizer": "sgd",
    "train.lr": 2.5e-4,
    "train.adam_epsilon": 1e-8,
    "train.schedule": "poly",
    "train.lr_steps": (),
    "train.weight_decay": 5e-4,
    "train.weight_decay_rate": 1.0,
    "train.weight_decay_every": 0,
    "train.epoch_scale": 1.0,
    "train.epoch_scale_per_worker": False,
    "train.whole_batches": False,
    "train.batch_size": 8,
    "train.crop_size": (321, 321),
    "train.augmentation": "deeplab",
    "train.scale_range": (0.5, 1.5),
    "train.aspect_jitter": 0.0,
    "train.image_pad": MEAN_PAD,
    "train.trimap_band": "3x3",
    "eval.scales": (1.0,),
    "eval.flip": False,
    "eval.tile": None,
}

# What --smoke pins, whatever the tokens and the study say (tiny sizes on CPU, one worker).
SMOKE = {
    "model.depth": 18, "model.width": 4, "model.pretrained": None,
    "train.epochs": 1, "train.batch_size": 2, "train.crop_size": (32, 32), "train.epoch_scale": 1.0,
    "train.precision": "fp32", "train.channels_last": False, "train.dataset": None,
    "train.lr_steps": (),
    "resources.workers": 1, "resources.cpus_per_worker": 1, "resources.gpus_per_worker": 0.0,
}  # fmt: skip


def defaults(protocol: str, variant: Variant) -> dict[str, Any]:
    """Every recipe field's value before tokens and study values (`section.field` keys)."""
    values = dict(ORIGINAL if protocol == "original" else DEEPLAB)
    values.update(_from_variant(variant))
    if protocol == "original":
        values.update(_original_family(variant))
    else:
        values["model.output_stride"] = 32 if variant.family in ("fpn", "plain") else 8
        values["train.dataset"] = variant.dataset
        values["train.train_list"] = "train" if variant.dataset == "cityscapes" else "train_aug"
    values["train.multipliers"] = _multipliers(protocol, variant, lr=None)
    return values


def _from_variant(v: Variant) -> dict[str, Any]:
    return {
        "model.variant": v.name,
        "model.decoder": v.decoder,
        "model.edge_input": v.edge_input,
        "model.fixed_sobel_at": v.fixed_sobel_at,
        "model.learnable_sobel": v.learnable_sobel,
        "model.learnable_sobel_at": v.learnable_sobel_at,
        "model.sobel_relu": v.sobel_relu,
        "model.sobel_init": v.sobel_init,
        "model.spk": v.spk,
        "train.label_mode": v.label_mode,
        "train.edgemix_radius": v.edgemix_radius,
    }


def _original_family(v: Variant) -> dict[str, Any]:
    """The script family's own values (reference/recipes.md, section 2)."""
    cityscapes = v.dataset == "cityscapes"
    out: dict[str, Any] = {
        "train.dataset": v.dataset or "voc",
        "train.train_list": "train" if cityscapes or v.label_mode == "trimap" else "train_aug",
        # naked learnable Sobel: l + sqrt(c1^2 + c2^2) in resnet_model_learnable_sobel.py (every
        # version) and in ..._channelwise.py until b30ebaad (12-27 13:28, after the rows' results);
        # c1^2 + c2^2 + l from then on (newcode) and in every FPN script
        "model.learnable_sobel_form": "sqrt" if v.family in ("naked", "voc") and not v.newcode else "2order",
        "model.classifier_bias": v.family == "naked" and not v.newcode,  # AtrousConv2D had a bias until 01-06
    }
    if v.family in ("fpn", "plain"):
        # M-FPN: res3/res4 stride on the 1x1 conv, res5 on the 3x3; cs.resnet101: all on the 3x3
        out["model.stride_on"] = ("1x1", "1x1", "3x3") if v.family == "fpn" else ("3x3", "3x3", "3x3")
        out["model.output_stride"] = 32
    else:
        out["model.stride_on"] = ("1x1", "1x1", "3x3")  # M-NAKED (stride_first in res3/res4)
        out["model.output_stride"] = 16
    if cityscapes and (v.family in ("fpn", "plain") or v.full):
        out.update({"train.crop_size": CITYSCAPES_FRAME, "train.batch_size": 1,
                    "train.epoch_scale": 8.0 if v.family == "plain" else 3.0})
    elif v.family == "fpn":
        out.update({"train.crop_size": (512, 512), "train.batch_size": 10, "train.epoch_scale": 8.0})
    else:
        out.update({"train.crop_size": (321, 321), "train.batch_size": 8 if cityscapes else 10,
                    "train.epoch_scale": 8.0})
    out["eval.tile"] = out["train.crop_size"]
    return out


def token_values(protocol: str, v: Variant) -> dict[str, tuple[Any, str]]:
    """The fields the variant's training tokens fix: {key: (value, token)}. A study value
    that differs from one of these is an error (segdist.resolve.resolve_recipe)."""
    out: dict[str, tuple[Any, str]] = {}
    if v.epoch_scale is not None:
        out["train.epoch_scale"] = (v.epoch_scale, f"scale{v.epoch_scale:g}")
    if v.crop_size is not None:
        out["train.crop_size"] = ((v.crop_size, v.crop_size), f"size{v.crop_size}")
    if v.batch_size is not None:
        out["train.batch_size"] = (v.batch_size, f"bs{v.batch_size}")
    if v.workers is not None:
        out["resources.workers"] = (v.workers, f"{v.workers}gpu")
    if v.dataset is not None:
        out["train.dataset"] = (v.dataset, "cs" if v.dataset == "cityscapes" else "voc")
    if v.decoder == "plain":
        out["model.depth"] = (101, "resnet101")
    if v.full:
        out["train.crop_size"] = (CITYSCAPES_FRAME, "full")
        if not v.aug:
            out["train.scale_range"] = ((1.0, 1.0), "full")  # the whole frame, flipped only
    if v.sobel_form is not None:  # square: the fixed Sobel's; 1order/2order: the learnable's; sqrt: whichever there is
        fixed = v.sobel_form == "square" or v.learnable_sobel is None
        out["model.fixed_sobel_form" if fixed else "model.learnable_sobel_form"] = (v.sobel_form, v.sobel_form)
    if v.newcode and protocol == "original":
        out["model.classifier_bias"] = (False, "newcode")
    return out


def token_groups(protocol: str, v: Variant) -> dict[str, tuple[GroupRule, str]]:
    """The groups whose rule the lrN token fixes: {group: (rule, token)}."""
    if v.lr_mult is None:
        return {}
    base = _multipliers(protocol, v, lr=v.lr_mult)
    token = f"lr{v.lr_mult:g}"
    return {g: (getattr(base, g), token) for g in _lr_groups(protocol, v)}


def _lr_groups(protocol: str, v: Variant) -> tuple[str, ...]:
    """The groups an lrN token scales: in the original, what that family's patterns matched."""
    if protocol == "deeplab":
        return ("decoder", "extras")
    if v.family == "fpn":
        return () if v.dataset == "cityscapes" else (("decoder", "extras") if v.learnable_sobel == "resblock"
                                                       else ("decoder",))
    if v.family == "plain":
        return ()
    return ("extras",)  # naked/voc: ('edge.*'|'edge_.*'|'scale.*', N) hit the edge/Sobel modules


def _multipliers(protocol: str, v: Variant, lr: float | None) -> Multipliers:
    """The protocol's rule for every group; `lr`: the lrN token (None: absent)."""
    if protocol == "deeplab":
        n = 10.0 if lr is None else lr
        return Multipliers(GroupRule(1, 1, True), GroupRule(10, 20, True), GroupRule(n, 2 * n, True),
                           GroupRule(n, 2 * n, True))
    # `.*/W` decays conv kernels: the edge conv3 and the resblock control's convs, not the
    # Sobel/GCN kernels (`sobel_W1`, `gcn_W1_1n`) or per-channel scales.
    extras_decay = v.edge_input == "conv3" or v.learnable_sobel == "resblock"
    if v.family == "plain" or (v.family == "fpn" and v.dataset == "cityscapes"):
        return Multipliers(GroupRule(1, 1, True), GroupRule(1, 1, True), GroupRule(1, 1, True),
                           GroupRule(1, 1, extras_decay))
    if v.family == "fpn":
        n = 10.0 if lr is None else lr  # ('fpn.*W', N), ('fpn.*b', 2N)
        extras = GroupRule(n, 2 * n, True) if v.learnable_sobel == "resblock" else GroupRule(1, 1, False)
        return Multipliers(GroupRule(1, 1, True), GroupRule(1, 1, True), GroupRule(n, 2 * n, True), extras)
    n = 1.0 if lr is None else lr
    return Multipliers(GroupRule(1, 1, True), GroupRule(10, 20, True), GroupRule(1, 1, True),
                       GroupRule(n, n, extras_decay))


def merge_multipliers(base: Multipliers, study: dict[str, tuple], tokens: dict[str, tuple[GroupRule, str]],
                      variant: str, where: str) -> Multipliers:
    """The protocol's rules, then the lrN token's, then the study's (W, b, decay) per group (b
    None: the group's bias-to-weight ratio; decay None: the group's); a study rule that
    contradicts the token's is an error."""
    rules = {g: getattr(base, g) for g in GROUPS}
    for group, (rule, _) in tokens.items():
        rules[group] = rule
    for group, (weight, bias, decay) in study.items():
        now = rules[group]
        rule = GroupRule(weight, weight * now.bias / now.weight if bias is None else bias,
                         now.decay if decay is None else decay)
        if group in tokens and (rule.weight, rule.bias) != (tokens[group][0].weight, tokens[group][0].bias):
            raise SegdistError(f"{where}: train.multipliers.{group}: {rule} contradicts variant {variant!r} "
                               f"(token {tokens[group][1]!r} sets {tokens[group][0]})")
        rules[group] = rule
    return Multipliers(**rules)


def derive(values: dict[str, Any], protocol: str, v: Variant, explicit: set[str]) -> dict[str, Any]:
    """Fields that follow from others: strides and dilations, the evaluation tile, the
    image padding colour."""
    out = dict(values)
    os_ = out["model.output_stride"]
    if protocol == "original" and v.family in ("naked", "voc") and os_ == 16:
        out["model.strides"], out["model.dilations"] = ORIGINAL_NAKED_STRIDES
    else:  # an output stride outside the table is check_recipe's to report
        out["model.strides"], out["model.dilations"] = DEEPLAB_STRIDES.get(os_, DEEPLAB_STRIDES[32])
    if out["train.image_pad"] == "mean":
        out["train.image_pad"] = MEAN_PAD
    if protocol == "original" and "eval.tile" not in explicit:
        out["eval.tile"] = out["train.crop_size"]  # EVAL-A(t): tiles of the training crop
    return out


def smoke_values(values: dict[str, Any]) -> dict[str, Any]:
    """SMOKE, with the evaluation tile shrunk to the smoke crop (whole-image stays whole)."""
    out = dict(SMOKE)
    if values.get("eval.tile") is not None:
        out["eval.tile"] = SMOKE["train.crop_size"]
    return out


def source(protocol: str, v: Variant) -> str:
    """The script(s) a recipe follows, for --explain and MLflow."""
    if protocol == "deeplab":
        return "DeepLab v2 (Chen et al., TPAMI 2017): SGD, poly, classifier x10"
    cityscapes = v.dataset == "cityscapes"
    if v.family == "plain":
        return "experiments/deeplabv2.cs.resnet101.scale*.py"
    if v.family == "fpn":
        name = "gcn" if v.decoder == "gcn" else "fpn*"
        return f"experiments/deeplabv2.{'cs.' if cityscapes else ''}naked.{name}.py"
    if v.family == "voc":
        return "experiments/deeplabv2.voc.*.py"
    if cityscapes:
        if v.label_mode == "edgemix":
            return "deeplabv2.naked.edgemix.r3.cs.py"
        return "deeplabv2.naked.cs.full.py" if v.full else "deeplabv2.naked.cs.py"
    if v.workers:
        return "deeplabv2.naked.4gpu.py"
    return "deeplabv2.naked*.py (root; deeplabv2.voc.py from 01-12)"
