"""The typed recipe: every model, training, data and evaluation setting of one configuration
as a plain value (how values become one: segdist.resolve; the defaults: segdist.protocols).

    recipe = resolve_recipe({"model.variant": "naked.fpn.lr10", "train.epochs": 4}, "original", "study.yaml")
    recipe.train.crop_size      # (512, 512): the FPN scripts' crop
    recipe.flat()               # {"model.variant": ..., "train.multipliers.decoder": "W x10, b x20, decay", ...}

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

PROTOCOLS = ("deeplab", "original")
GROUPS = ("backbone", "classifier", "decoder", "extras")
OPTIMIZERS = ("sgd", "adam", "adam_tf1")
PRECISIONS = ("auto", "fp32", "bf16")
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

    scales: tuple[float, ...]  # image scales whose softmax maps are averaged (segdist.msf)
    flip: bool  # also each scale mirrored left-right
    tile: tuple[int, int] | None  # sliding-window tile at every scale (1/3 overlap, mean padding); None: whole image
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


SECTIONS = {"model": ModelRecipe, "train": TrainRecipe, "eval": EvalRecipe, "resources": Resources}


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
