"""How a configuration's values become its recipe (segdist.recipe.Recipe).

Resolution (`resolve_recipe`), in this order:
1. the protocol's defaults for the variant's script family (segdist.protocols): `original`
   reproduces each results-log row's script (reference/recipes.md) with the named bugs of
   reference/variants.md fixed; `deeplab` is DeepLab v2's own recipe, for new studies;
2. what the variant's tokens fix (size512 -> crop 512, bs8 -> batch 8, 4gpu -> 4 workers, ...);
3. the study's own values (its sections and the search's choices), coerced by `coerce_value`.
   A study value that contradicts a token is an error, never a silent override;
4. the values derived from the others (tiles default to the crop, strides from the output stride);
then `check_recipe`'s table of checks. Every mistake found here is one SegdistError line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from segdist import protocols
from segdist.errors import SegdistError
from segdist.models.pretrained import PRETRAINED_NAMES
from segdist.models.variant import parse_variant
from segdist.recipe import (
    GROUPS,
    NAMED_SCALES,
    OPTIMIZERS,
    PRECISIONS,
    PROTOCOLS,
    SECTIONS,
    GroupRule,
    Recipe,
    show,
)

# Fields the variant decides (a study may not set them) and fields derived from others.
FROM_VARIANT = {
    "model.decoder", "model.edge_input", "model.fixed_sobel_at", "model.learnable_sobel",
    "model.learnable_sobel_at", "model.sobel_relu", "model.spk", "train.label_mode", "train.edgemix_radius",
}
DERIVED = {"model.strides", "model.dilations"}


def settable_keys() -> list[str]:
    """Every `section.field` a study may set."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return [k for k in keys if k not in FROM_VARIANT | DERIVED]


def coerce_value(key: str, value: Any, where: str) -> Any:
    """A study's YAML value for `key`, checked and converted to the recipe's type; a wrong
    type is one SegdistError line naming `where` and the key."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise SegdistError(f"{where}: unknown key {key!r}")
    if key in FROM_VARIANT:
        raise SegdistError(f"{where}: {key} comes from the variant's tokens, not from the study")
    if key in DERIVED:
        raise SegdistError(f"{where}: {key} is derived (from model.output_stride and the protocol)")
    here = f"{where}: {key}"
    if key in ("train.crop_size", "eval.tile"):
        if value is None and key == "eval.tile":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        return coerce(value, tuple[int, int], here)
    if key == "train.image_pad":
        return value if value == "mean" else coerce(value, tuple[int, int, int], here)
    if key == "eval.scales" and isinstance(value, str):
        if value not in NAMED_SCALES:
            raise SegdistError(f"{here}: unknown scale set {value!r}; valid: {', '.join(NAMED_SCALES)} or a list")
        return NAMED_SCALES[value]
    if key == "train.multipliers":
        return _coerce_multipliers(value, here)
    return coerce(value, typing.get_type_hints(SECTIONS[section])[name], here)


def _coerce_multipliers(value: Any, where: str) -> dict[str, GroupRule | tuple]:
    """{group: W | [W, b] | [W, b, decay]} -> {group: (W, b or None, decay or None)}: partial rules
    that resolve_recipe completes from the protocol's (a number W keeps the group's bias-to-weight
    ratio: 2 for classifier and decoder, 1 for the naked family's edge/Sobel modules)."""
    if not isinstance(value, dict):
        raise SegdistError(f"{where}: expected a mapping of groups ({', '.join(GROUPS)}) to W, [W, b] or [W, b, decay]")
    out = {}
    for group, rule in value.items():
        if group not in GROUPS:
            raise SegdistError(f"{where}: unknown group {group!r}; valid: {', '.join(GROUPS)}")
        items = list(rule) if isinstance(rule, (list, tuple)) else [rule]
        if not 1 <= len(items) <= 3:
            raise SegdistError(f"{where}.{group}: expected W, [W, b] or [W, b, decay], got {rule!r}")
        weight = coerce(items[0], float, f"{where}.{group}")
        bias = coerce(items[1], float, f"{where}.{group}") if len(items) > 1 else None
        decay = coerce(items[2], bool, f"{where}.{group}") if len(items) > 2 else None
        out[group] = (weight, bias, decay)
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field annotation; convert where YAML is loose."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else coerce(value, options[0], where)
    if origin is tuple and typing.get_args(hint)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise SegdistError(f"{where}: expected a list, got {value!r}")
        return tuple(coerce(v, typing.get_args(hint)[0], where) for v in value)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SegdistError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, t, where) for v, t in zip(value, args, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise SegdistError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SegdistError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SegdistError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            raise SegdistError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SegdistError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


# ----------------------------------------------------------------------------- resolution


def resolve_recipe(values: dict[str, Any], protocol: str, where: str, *, smoke: bool = False) -> Recipe:
    """The recipe of one configuration. `values`: the study's coerced `section.field` values
    (coerce_value) including the search's choices; `protocol`: original | deeplab; `where`:
    the study file, for errors. `smoke`: tiny CPU sizes (segdist.protocols.SMOKE) that no token
    or study value can enlarge. Raises SegdistError (one line) for an unknown token, a study
    value that contradicts a token, or an invalid combination (check_recipe)."""
    if protocol not in PROTOCOLS:
        raise SegdistError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    try:
        variant = parse_variant(values.get("model.variant", "naked"))
    except SegdistError as err:
        raise SegdistError(f"{where}: {err}") from None
    merged = protocols.defaults(protocol, variant)
    for key, (value, token) in protocols.token_values(protocol, variant).items():
        if key in values and values[key] != value:
            raise SegdistError(f"{where}: {key}: {show(key, values[key])} contradicts variant {variant.name!r} "
                               f"(token {token!r} sets {show(key, value)})")
        merged[key] = value
    study = dict(values)
    multipliers = protocols.merge_multipliers(merged["train.multipliers"], study.pop("train.multipliers", {}),
                                              protocols.token_groups(protocol, variant), variant.name, where)
    merged.update(study)
    merged["train.multipliers"] = multipliers
    merged = protocols.derive(merged, protocol, variant, explicit=set(values))
    if smoke:
        merged.update(protocols.smoke_values(merged))
    recipe = _build(merged, protocol, protocols.source(protocol, variant))
    check_recipe(recipe, where)
    return recipe


def _build(merged: dict[str, Any], protocol: str, source: str) -> Recipe:
    sections = {}
    for section, cls in SECTIONS.items():
        sections[section] = cls(**{f.name: merged[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})
    return Recipe(protocol=protocol, source=source, **sections)


def _choices() -> dict[str, tuple]:
    """Allowed values of the enumerated fields, from the modules that use them."""
    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.transforms import AUGMENTATIONS, TRIMAP_BANDS
    from segdist.models.fpn import GCN_STYLES
    from segdist.models.init import INITS
    from segdist.models.resnet import LAYOUTS, NORMS, STRIDES
    from segdist.models.sobel import FIXED_FORMS, LEARNABLE_FORMS, SOBEL_INITS
    from segdist.models.tf1 import FRAMEWORKS

    return {
        "train.dataset": (None, *DATASET_CLASSES), "train.train_list": ("train", "train_aug"),
        "train.optimizer": OPTIMIZERS, "train.schedule": ("poly", "steps"), "train.augmentation": AUGMENTATIONS,
        "train.trimap_band": TRIMAP_BANDS, "train.precision": PRECISIONS, "train.on_bad_sample": ("raise", "skip"),
        "train.on_nan": ("stop", "skip"), "model.depth": tuple(LAYOUTS), "model.output_stride": tuple(STRIDES),
        "model.norm": NORMS, "model.framework": FRAMEWORKS, "model.init": INITS,
        "model.fixed_sobel_form": FIXED_FORMS, "model.learnable_sobel_form": LEARNABLE_FORMS,
        "model.sobel_init": SOBEL_INITS, "model.gcn_style": GCN_STYLES,
    }


def check_recipe(recipe: Recipe, where: str) -> None:
    """The enumerated fields' values (_choices), then the checks that need numbers or more than
    one field; each failure is one SegdistError line naming `where` and the variant."""
    from segdist.models.pretrained import check_pretrained_spec
    from segdist.models.resnet import STRIDE_PLACES
    from segdist.models.variant import FPN_DECODERS

    m, t, e, r = recipe.model, recipe.train, recipe.eval, recipe.resources
    here = f"{where}: (variant {m.variant!r}) "
    for key, allowed in _choices().items():
        value = getattr(getattr(recipe, key.partition(".")[0]), key.partition(".")[2])
        if value not in allowed:
            raise SegdistError(f"{here}{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    low, high = t.scale_range
    steps = [epoch for epoch, _ in t.lr_steps]
    checks = [
        (t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}"),
        (t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}"),
        (min(t.crop_size) >= 16, f"train.crop_size must be at least 16, got {show('train.crop_size', t.crop_size)}"),
        (0 < low <= high, f"train.scale_range must be [low, high] with 0 < low <= high, got {list(t.scale_range)}"),
        (t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a positive number, got {t.lr}"),
        (0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}"),
        (t.poly_power > 0, f"train.poly_power must be positive, got {t.poly_power}"),
        (t.adam_epsilon > 0, f"train.adam_epsilon must be positive, got {t.adam_epsilon}"),
        (steps == sorted(set(steps)) and all(s >= 1 for s in steps) and all(f > 0 for _, f in t.lr_steps),
         f"train.lr_steps must be [epoch, factor] pairs with increasing epochs >= 1, got {list(t.lr_steps)}"),
        (t.weight_decay >= 0 and t.weight_decay_every >= 0 and t.weight_decay_rate > 0,
         "train.weight_decay and weight_decay_every must be >= 0 and weight_decay_rate > 0"),
        (t.epoch_scale > 0, f"train.epoch_scale must be positive, got {t.epoch_scale}"),
        (0 <= t.aspect_jitter < 1, f"train.aspect_jitter must be in [0, 1), got {t.aspect_jitter}"),
        (all(0 <= c <= 255 for c in t.image_pad), f"train.image_pad must be 'mean' or RGB values 0..255, got {t.image_pad}"),
        (t.max_failures >= 0, f"train.max_failures must be >= 0, got {t.max_failures}"),
        (m.width >= 4, f"model.width must be at least 4, got {m.width}"),
        (m.decoder not in (*FPN_DECODERS, "plain") or m.output_stride == 32,
         f"model.output_stride {m.output_stride}: the FPN, GCN and resnet101 models run the plain ResNet "
         "(output stride 32)"),
        (all(place in STRIDE_PLACES for place in m.stride_on),
         f"model.stride_on must name 1x1 or 3x3 for res3, res4 and res5, got {list(m.stride_on)}"),
        (m.pretrained not in PRETRAINED_NAMES or m.width == 64,
         f"model.pretrained {m.pretrained} is for the real network: model.width must be 64, got {m.width}"),
        (len(e.scales) >= 1 and all(0 < x <= 4 for x in e.scales),
         f"eval.scales must be a non-empty list of numbers in (0, 4], got {list(e.scales)}"),
        (e.tile is None or min(e.tile) >= 16, f"eval.tile must be at least 16 pixels, got {e.tile}"),
        (all(k >= 3 and k % 2 == 1 for k in e.boundary_kernels),
         f"eval.boundary_kernels must be odd sizes >= 3, got {list(e.boundary_kernels)}"),
        (r.workers >= 1, f"resources.workers must be at least 1, got {r.workers}"),
        (r.cpus_per_worker >= 1, f"resources.cpus_per_worker must be at least 1, got {r.cpus_per_worker}"),
        (r.gpus_per_worker >= 0, f"resources.gpus_per_worker must be >= 0, got {r.gpus_per_worker}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SegdistError(here + message)
    check_pretrained_spec(m.pretrained, m.depth, f"{where}: model.pretrained", require_file=False)
    check_norm_inputs(recipe, here)


def check_norm_inputs(recipe: Recipe, here: str) -> None:
    """Refuse a recipe whose training would give a BatchNorm one value per channel (PyTorch
    raises "Expected more than 1 value per channel when training" at the first step): a batch
    of one image per norm (batch_size per worker, times the workers under norm "sync") whose
    smallest feature map is 1x1 for the crop, as the recipe's model run on the meta device
    finds it (smallest_norm_input). Only a batch of one needs the model's shapes."""
    from segdist.models.factory import smallest_norm_input

    m, t = recipe.model, recipe.train
    images = t.batch_size * (recipe.resources.workers if m.norm == "sync" else 1)
    if images > 1:
        return
    found = smallest_norm_input(m, t.crop_size)
    if found is not None and found[1] * found[2] == 1:
        raise SegdistError(
            f"{here}BatchNorm {found[0]} would see one value per channel in training: a batch of 1 image "
            f"per norm and a 1x1 map from crop {show('train.crop_size', t.crop_size)} at output stride "
            f"{m.output_stride}; use train.batch_size >= 2, a larger train.crop_size, or model.norm sync "
            f"with resources.workers >= 2")

