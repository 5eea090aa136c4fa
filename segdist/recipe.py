"""The typed recipe: every model, training, data and evaluation setting of one configuration
as a plain value, resolved once from a variant string and a study's values.

    recipe = resolve_recipe({"model.variant": "naked.fpn.lr10", "train.epochs": 4}, "original", "study.yaml")
    recipe.train.crop_size      # (512, 512): the FPN scripts' crop
    recipe.flat()               # {"model.variant": ..., "train.multipliers.decoder": "W x10, b x20, decay", ...}

Resolution (`resolve_recipe`), in this order:
1. the protocol's defaults for the variant's script family (segdist.protocols): `original`
   reproduces each results-log row's script (reference/recipes.md) with the named bugs of
   reference/variants.md fixed; `deeplab` is DeepLab v2's own recipe, for new studies;
2. what the variant's tokens fix (size512 -> crop 512, bs8 -> batch 8, 4gpu -> 4 workers, ...);
3. the study's own values (its sections and the search's choices). A study value that
   contradicts a token is an error, never a silent override;
4. the values derived from the others (tiles default to the crop, strides from the output stride).

Training, data and evaluation read only the recipe; nothing downstream parses the variant.
Keys are `section.field` (model, train, eval, resources), the names a study file uses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from segdist.errors import SegdistError

PROTOCOLS = ("deeplab", "original")
GROUPS = ("backbone", "classifier", "decoder", "extras")
OPTIMIZERS = ("sgd", "adam", "adam_tf1")
NAMED_SCALES = {"original": (0.9, 1.0, 1.1), "deeplab": (0.5, 0.75, 1.0, 1.25, 1.5)}


@dataclass(frozen=True)
class GroupRule:
    """How one parameter group trains: gradient multipliers (the original's ScaleGradient,
    applied to the gradient after the L2 term is added; under SGD the same as learning-rate
    multipliers) for its kernels and per-channel scales (`weight`) and its biases (`bias`), and
    whether L2 weight decay covers its kernels. Norm parameters always train at x1, undecayed."""

    weight: float
    bias: float
    decay: bool

    def __str__(self) -> str:
        return f"W x{self.weight:g}, b x{self.bias:g}, {'decay' if self.decay else 'no decay'}"


@dataclass(frozen=True)
class Multipliers:
    """One GroupRule per named parameter group (segdist.models.factory.parameter_group says
    which parameter is in which): the backbone, the classifier (naked/aspp/basic-block head),
    the decoder (FPN/GCN top-down path and tail), the extra modules (edge inputs, Sobel modules,
    GCN kernels, the resblock control)."""

    backbone: GroupRule
    classifier: GroupRule
    decoder: GroupRule
    extras: GroupRule


@dataclass(frozen=True)
class ModelRecipe:
    variant: str  # as the study wrote it
    decoder: str  # naked | aspp | plain | fpn | fpn.standard | fpn.bilinear | gcn (from the variant)
    depth: int
    width: int  # stem channels; 64 is the real network
    output_stride: int  # 8 | 16 | 32
    strides: tuple[int, int, int]  # of res3, res4, res5 (derived)
    dilations: tuple[int, int, int]  # of the 3x3 convs of res3, res4, res5 (derived)
    stride_on: tuple[str, str, str]  # where a strided bottleneck of res3..res5 puts its stride: 1x1 | 3x3
    framework: str  # tf1 | pytorch: padding of strided layers, transposed-conv alignment, in-model resize
    classifier_bias: bool
    norm: str  # batch (per worker) | sync | frozen
    init: str  # tensorpack | pytorch: initialisers of the layers ImageNet weights do not cover
    pretrained: str | None  # torchvision | tensorpack | a local file | None
    edge_input: str | None  # add | scale | conv3 (from the variant)
    fixed_sobel_at: tuple[str, ...]  # (from the variant)
    fixed_sobel_form: str  # square: l + s(gx^2+gy^2)^2 | sqrt | identity: l + s(gx^2+gy^2)
    learnable_sobel: str | None  # channelwise | channelcross | resblock (from the variant)
    learnable_sobel_at: tuple[str, ...]  # stages, or ("laterals",) (from the variant)
    learnable_sobel_form: str  # 2order: l + c1^2 + c2^2 | 1order: l + c1 + c2 | sqrt: l + sqrt(c1^2 + c2^2)
    sobel_relu: bool  # (from the variant)
    sobel_init: str  # random (variance scaling) | sobel
    spk: int  # (from the variant)
    gcn_style: str  # paper: both branch orders + Boundary Refinement | original: same order, no BR


@dataclass(frozen=True)
class TrainRecipe:
    dataset: str | None  # voc | cityscapes | None (any: the shards decide)
    train_list: str  # train_aug | train: the image list (fills {train_list} in data.train_shards)
    epochs: int
    batch_size: int  # per worker (per GPU)
    epoch_scale: float  # N of scaleN: one epoch = N passes (per worker when epoch_scale_per_worker)
    epoch_scale_per_worker: bool  # original: each GPU draws its own batch, an epoch is N x workers passes
    whole_batches: bool  # original: a pass is floor(samples / batch) batches (BatchData drops the rest)
    crop_size: tuple[int, int]  # (height, width)
    augmentation: str  # tensorpack | deeplab: how random resize and crop/pad are drawn (segdist.data.transforms)
    scale_range: tuple[float, float]  # random resize range; (1, 1): no resize
    aspect_jitter: float  # tensorpack: largest aspect-ratio change; deeplab: aspect drawn from 1 +- this
    flip: bool
    image_pad: tuple[int, int, int]  # RGB uint8 of the image padding
    label_mode: str  # hard | trimap | edgemix (from the variant)
    trimap_band: str  # original: the offline 2x2 band of generate_trimap | 3x3: the whole neighbourhood
    edgemix_radius: int  # (from the variant)
    optimizer: str  # sgd | adam (PyTorch) | adam_tf1 (TF1's AdamOptimizer: epsilon outside the bias correction)
    lr: float
    momentum: float  # sgd
    adam_epsilon: float
    schedule: str  # poly | steps
    poly_power: float
    lr_steps: tuple[tuple[int, float], ...]  # steps: after epoch e (1-based), lr = lr x factor
    weight_decay: float  # L2 coefficient (gradient wd * W)
    weight_decay_rate: float  # weight decay x rate every weight_decay_every steps (staircase)
    weight_decay_every: int  # 0: constant
    multipliers: Multipliers
    precision: str  # auto | fp32 | bf16
    channels_last: bool
    on_bad_sample: str  # raise | skip
    on_nan: str  # stop | skip
    max_failures: int


@dataclass(frozen=True)
class EvalRecipe:
    """The final evaluation (every epoch also gets a whole-image val_miou)."""

    scales: tuple[float, ...]
    flip: bool
    tile: tuple[int, int] | None  # sliding-window tile (1/3 overlap, mean padding); None: whole image
    boundary_kernels: tuple[int, ...]


@dataclass(frozen=True)
class Resources:
    workers: int  # DDP workers (GPUs) of one trial
    cpus_per_worker: int
    gpus_per_worker: float


@dataclass(frozen=True)
class Recipe:
    protocol: str  # original | deeplab
    source: str  # the script(s) the recipe follows
    model: ModelRecipe
    train: TrainRecipe
    eval: EvalRecipe
    resources: Resources

    @property
    def passes_per_epoch(self) -> float:
        """Passes over the training list in one epoch, all workers together."""
        t = self.train
        return t.epoch_scale * (self.resources.workers if t.epoch_scale_per_worker else 1)

    def steps_per_epoch(self, num_samples: int, workers: int | None = None) -> int:
        """Optimizer steps (one batch per worker each) in one epoch of a list of `num_samples`,
        on `workers` workers (default resources.workers).

        Original (tensorpack, reference/recipes.md "T"): floor(samples / batch) x N, each worker
        drawing its own batch per step, so an epoch is N x workers passes. deeplab:
        ceil(N x samples / (batch x workers)), an epoch is N passes."""
        t = self.train
        per_pass = num_samples // t.batch_size if t.whole_batches else num_samples / t.batch_size
        steps = t.epoch_scale * max(per_pass, 1)
        if not t.epoch_scale_per_worker:
            steps /= workers or self.resources.workers
        return max(1, math.ceil(steps - 1e-9))

    def flat(self) -> dict[str, str | int | float | bool | None]:
        """Every field as `section.field` with a readable value (MLflow params, --explain)."""
        out: dict[str, Any] = {"recipe.protocol": self.protocol, "recipe.source": self.source,
                               "train.passes_per_epoch": self.passes_per_epoch}
        for section in ("model", "train", "eval", "resources"):
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, Multipliers):
                    for group in GROUPS:
                        out[f"{section}.{f.name}.{group}"] = str(getattr(value, group))
                else:
                    out[f"{section}.{f.name}"] = show(f"{section}.{f.name}", value)
        return out


def show(key: str, value: Any) -> Any:
    """A recipe value as people read it: 512x512 sizes, comma-joined lists, ep2:x0.4 steps."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if key in ("train.crop_size", "eval.tile"):
        return f"{value[0]}x{value[1]}"
    if key == "train.lr_steps":
        return ", ".join(f"after ep{e}: x{f:g}" for e, f in value) or "-"
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "-"


def explain_table(recipes: list[Recipe], labels: list[str]) -> str:
    """Markdown: the fields every recipe shares (field | value), then one row per recipe
    (labelled) with the fields that differ between them."""
    flats = [r.flat() for r in recipes]
    keys = list(flats[0])
    common = [k for k in keys if all(f[k] == flats[0][k] for f in flats)]
    varying = [k for k in keys if k not in common]
    lines = ["Common to every configuration:", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(flats[0][k])} |" for k in common]
    if varying:
        lines += ["", "Per configuration:", "", "| configuration | " + " | ".join(varying) + " |",
                  "|---" * (len(varying) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(_cell(f[k]) for k in varying) + " |"
                  for label, f in zip(labels, flats, strict=True)]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value).replace("|", "/")


# ----------------------------------------------------------------------------- study values

SECTIONS = {"model": ModelRecipe, "train": TrainRecipe, "eval": EvalRecipe, "resources": Resources}
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
        return _coerce(value, tuple[int, int], here)
    if key == "train.image_pad":
        return value if value == "mean" else _coerce(value, tuple[int, int, int], here)
    if key == "eval.scales" and isinstance(value, str):
        if value not in NAMED_SCALES:
            raise SegdistError(f"{here}: unknown scale set {value!r}; valid: {', '.join(NAMED_SCALES)} or a list")
        return NAMED_SCALES[value]
    if key == "train.multipliers":
        return _coerce_multipliers(value, here)
    return _coerce(value, typing.get_type_hints(SECTIONS[section])[name], here)


def _coerce_multipliers(value: Any, where: str) -> dict[str, GroupRule | tuple]:
    """{group: W | [W, b] | [W, b, decay]} -> {group: (W, b or None, decay or None)}: partial rules
    that resolve_recipe completes from the protocol's (a number W means bias 2W)."""
    if not isinstance(value, dict):
        raise SegdistError(f"{where}: expected a mapping of groups ({', '.join(GROUPS)}) to W, [W, b] or [W, b, decay]")
    out = {}
    for group, rule in value.items():
        if group not in GROUPS:
            raise SegdistError(f"{where}: unknown group {group!r}; valid: {', '.join(GROUPS)}")
        items = list(rule) if isinstance(rule, (list, tuple)) else [rule]
        if not 1 <= len(items) <= 3:
            raise SegdistError(f"{where}.{group}: expected W, [W, b] or [W, b, decay], got {rule!r}")
        weight = _coerce(items[0], float, f"{where}.{group}")
        bias = _coerce(items[1], float, f"{where}.{group}") if len(items) > 1 else 2 * weight
        decay = _coerce(items[2], bool, f"{where}.{group}") if len(items) > 2 else None
        out[group] = (weight, bias, decay)
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field annotation; convert where YAML is loose."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, options[0], where)
    if origin is tuple and typing.get_args(hint)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise SegdistError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(hint)[0], where) for v in value)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SegdistError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, args, strict=True))
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
    from segdist import protocols
    from segdist.models.variant import parse_variant

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
    merged = protocols.derive(merged, protocol, variant, explicit=set(values), where=where)
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


def check_recipe(recipe: Recipe, where: str) -> None:
    """Checks that need more than one field; each failure is one SegdistError line."""
    m, t, e, r = recipe.model, recipe.train, recipe.eval, recipe.resources
    low, high = t.scale_range
    steps = [epoch for epoch, _ in t.lr_steps]
    checks = [
        (t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}"),
        (t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}"),
        (min(t.crop_size) >= 16, f"train.crop_size must be at least 16, got {show('train.crop_size', t.crop_size)}"),
        (0 < low <= high, f"train.scale_range must be [low, high] with 0 < low <= high, got {list(t.scale_range)}"),
        (t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a positive number, got {t.lr}"),
        (t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}"),
        (t.adam_epsilon > 0, f"train.adam_epsilon must be positive, got {t.adam_epsilon}"),
        (t.schedule in ("poly", "steps"), f"train.schedule must be poly or steps, got {t.schedule!r}"),
        (steps == sorted(set(steps)) and all(s >= 1 for s in steps) and all(f > 0 for _, f in t.lr_steps),
         f"train.lr_steps must be [epoch, factor] pairs with increasing epochs >= 1, got {list(t.lr_steps)}"),
        (t.weight_decay >= 0 and t.weight_decay_every >= 0 and t.weight_decay_rate > 0,
         "train.weight_decay and weight_decay_every must be >= 0 and weight_decay_rate > 0"),
        (t.epoch_scale > 0, f"train.epoch_scale must be positive, got {t.epoch_scale}"),
        (t.augmentation in ("tensorpack", "deeplab"), f"train.augmentation must be tensorpack or deeplab, got {t.augmentation!r}"),
        (0 <= t.aspect_jitter < 1, f"train.aspect_jitter must be in [0, 1), got {t.aspect_jitter}"),
        (all(0 <= c <= 255 for c in t.image_pad), f"train.image_pad must be 'mean' or RGB values 0..255, got {t.image_pad}"),
        (t.trimap_band in ("original", "3x3"), f"train.trimap_band must be original or 3x3, got {t.trimap_band!r}"),
        (t.train_list in ("train", "train_aug"), f"train.train_list must be train or train_aug, got {t.train_list!r}"),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}"),
        (t.on_bad_sample in ("raise", "skip"), f"train.on_bad_sample must be raise or skip, got {t.on_bad_sample!r}"),
        (t.on_nan in ("stop", "skip"), f"train.on_nan must be stop or skip, got {t.on_nan!r}"),
        (t.max_failures >= 0, f"train.max_failures must be >= 0, got {t.max_failures}"),
        (m.depth in (18, 34, 50, 101, 152), f"model.depth must be 18, 34, 50, 101 or 152, got {m.depth}"),
        (m.output_stride in (8, 16, 32), f"model.output_stride must be 8, 16 or 32, got {m.output_stride}"),
        (m.norm in ("batch", "sync", "frozen"), f"model.norm must be batch, sync or frozen, got {m.norm!r}"),
        (m.width >= 4, f"model.width must be at least 4, got {m.width}"),
        (m.framework in ("tf1", "pytorch"), f"model.framework must be tf1 or pytorch, got {m.framework!r}"),
        (m.init in ("tensorpack", "pytorch"), f"model.init must be tensorpack or pytorch, got {m.init!r}"),
        (m.fixed_sobel_form in ("square", "sqrt", "identity"),
         f"model.fixed_sobel_form must be square, sqrt or identity, got {m.fixed_sobel_form!r}"),
        (m.learnable_sobel_form in ("1order", "2order", "sqrt"),
         f"model.learnable_sobel_form must be 1order, 2order or sqrt, got {m.learnable_sobel_form!r}"),
        (m.sobel_init in ("random", "sobel"), f"model.sobel_init must be random or sobel, got {m.sobel_init!r}"),
        (m.gcn_style in ("paper", "original"), f"model.gcn_style must be paper or original, got {m.gcn_style!r}"),
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
            raise SegdistError(f"{where}: {message} (variant {m.variant!r})")
    from segdist.models.pretrained import check_pretrained_spec

    check_pretrained_spec(m.pretrained, m.depth, f"{where}: model.pretrained", require_file=False)


# ----------------------------------------------------------------------------- plain dicts


def from_dict(cls, data: Any):
    """Rebuild a (nested) frozen dataclass from dataclasses.asdict() output (Tune params,
    checkpoints); tuples come back as tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kwargs[f.name] = _from_plain(data[f.name], hints[f.name])
    return cls(**kwargs)


def _from_plain(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _from_plain(value, options[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if args and args[-1] is Ellipsis:
            return tuple(_from_plain(v, args[0]) for v in value)
        return tuple(_from_plain(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return dict(value)
    return value
