"""Typed experiment config: a study YAML parsed once into frozen dataclasses.

A study file has fixed sections (`data`, `model`, `train`, `resources`), a `search`
section over dotted keys (`train.lr: {loguniform: [1e-3, 1e-1]}`), and `seeds`, which
repeats every configuration. Code downstream receives plain values, never raw YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segdist.errors import SegdistError
from segdist.models.variant import parse_variant


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = "shards/synthetic/train"
    val_shards: str = "shards/synthetic/val"
    # When set and the shards are missing, generate the synthetic VOC-layout data set
    # here and build the shards from it with the real VOC reader.
    synthetic_root: str | None = None
    loader_workers: int = 1  # DataLoader worker processes per training worker
    shuffle_buffer: int = 256


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "naked"
    depth: int = 101
    width: int = 64  # channels of the stem; 64 is the real ResNet
    output_stride: int = 8
    norm: str = "batch"  # batch | sync | frozen
    pretrained: str | None = None  # torchvision-format ImageNet state dict


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # per training worker
    crop_size: int = 321
    scale_range: tuple[float, float] = (0.5, 1.5)
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 10.0  # head weights x m, head biases x 2m
    poly_power: float = 0.9
    epoch_scale: float = 1.0  # one epoch = this many passes over the training list
    aspect_jitter: float = 0.0  # random aspect-ratio change in random resize (original: 0.15)
    precision: str = "auto"  # auto (bf16 + channels_last on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
    channels_last: bool = False  # also implied by precision auto on CUDA
    on_bad_sample: str = "raise"  # raise | skip (skips are counted and logged)
    on_nan: str = "stop"  # stop: the trial ends as diverged; skip: drop the step, count it
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation at the final epoch (every epoch gets a whole-image val_miou)."""

    scales: tuple[float, ...] = (1.0,)  # multi-scale inference; [1] = whole image
    flip: bool = False  # also average the left-right flipped prediction
    boundary_kernels: tuple[int, ...] = ()  # boundary/inner statistics, e.g. [11, 15, 19]


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = 1  # DDP workers per trial
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 1


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs, picklable and free of YAML."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    resources: ResourcesConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    config_id: str = ""  # the same for every seed of one configuration
    overrides: dict[str, Any] = field(default_factory=dict)  # what the search chose

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key` (MLflow params, report grouping)."""
        flat: dict[str, Any] = {
            "config_id": self.config_id,
            "overrides": " ".join(f"{k}={v}" for k, v in self.overrides.items()),
        }
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = value
        return flat


@dataclass(frozen=True)
class SearchDim:
    key: str  # dotted, e.g. "train.lr"
    kind: str  # grid | choice | loguniform | uniform
    values: tuple


@dataclass(frozen=True)
class SeedPolicy:
    """`seeds: [0, 1, 2]` runs exactly those. `seeds: {min, max, ci_halfwidth}` starts every
    configuration with seeds 0..min-1 and adds seeds only while its 95% interval still
    overlaps the best configuration's and is wider than ci_halfwidth (in metric points x 100)."""

    initial: tuple[int, ...]
    max_seeds: int
    ci_halfwidth: float | None = None  # None: fixed seeds

    @property
    def adaptive(self) -> bool:
        return self.ci_halfwidth is not None


@dataclass(frozen=True)
class Screening:
    """ASHA early stopping (biased for seed statistics: stopped trials are left out)."""

    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: str
    base: TrialConfig
    search: tuple[SearchDim, ...]
    seeds: SeedPolicy
    samples: int  # draws of the random (choice / loguniform / uniform) dimensions
    search_seed: int
    screening: Screening | None = None
    smoke: bool = False  # tiny sizes: variant tokens may not enlarge them
    baseline: str | None = None  # the variant the report compares every configuration with

    @property
    def resources(self) -> ResourcesConfig:
        return self.base.resources


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "resources": ResourcesConfig,
}
SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
TOP_LEVEL_KEYS = ("name", *SECTIONS, "search", "seeds", "samples", "search_seed", "screening", "baseline")


def read_study_file(path: str | Path) -> Any:
    """The parsed YAML of a study file (any kind); a missing or broken file is one line."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise SegdistError(f"{path}: study file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise SegdistError(f"{path}: broken YAML{where}: {problem}") from None


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; every mistake is one SegdistError line."""
    path = Path(path)
    raw = read_study_file(path)
    if not isinstance(raw, dict):
        raise SegdistError(f"{path}: a study file must be a mapping of sections")
    return parse_study(raw, str(path))


def parse_study(raw: dict[str, Any], where: str) -> StudyConfig:
    _reject_unknown(raw, TOP_LEVEL_KEYS, where, "top-level key")
    sections = {
        name: _build_section(cls, raw.get(name) or {}, f"{where}: {name}")
        for name, cls in SECTIONS.items()
    }
    base = TrialConfig(**sections)
    search = tuple(_parse_search_dim(key, spec, where) for key, spec in (raw.get("search") or {}).items())
    seeds = _parse_seeds(raw.get("seeds", [0]), where)
    samples = _as_int(raw.get("samples", 1), f"{where}: samples")
    if samples < 1:
        raise SegdistError(f"{where}: samples must be at least 1, got {samples}")
    study = StudyConfig(
        name=str(raw.get("name") or Path(where).stem),
        path=where,
        base=base,
        search=search,
        seeds=seeds,
        samples=samples,
        search_seed=_as_int(raw.get("search_seed", 0), f"{where}: search_seed"),
        screening=_parse_screening(raw.get("screening"), where),
        baseline=None if raw.get("baseline") is None else str(raw["baseline"]),
    )
    # Validate every configuration now, before any compute is spent.
    try:
        for trial in expand_trials(study):
            validate_trial(trial, where)
    except SegdistError as err:
        message = str(err)
        raise SegdistError(message if message.startswith(where) else f"{where}: {message}") from None
    return study


def expand_configs(study: StudyConfig) -> list[TrialConfig]:
    """Every configuration once (seed left at the study's default), in a fixed order.
    Random dimensions are drawn once per configuration (from `search_seed`), so every
    seed of it trains the same values."""
    grid = [d for d in study.search if d.kind == "grid"]
    sampled = [d for d in study.search if d.kind != "grid"]
    rng = random.Random(study.search_seed)
    chosen: list[dict[str, Any]] = []
    for _ in range(study.samples if sampled else 1):
        draws = {d.key: _draw(d, rng) for d in sampled}
        for combo in itertools.product(*(d.values for d in grid)):
            chosen.append({**dict(zip((d.key for d in grid), combo, strict=True)), **draws})
    configs = []
    for overrides in chosen:
        config = _apply_overrides(study.base, overrides)
        if study.smoke:  # keep the tiny sizes whatever the variant's tokens say
            small = {k: getattr(study.base.train, k) for k in ("crop_size", "batch_size", "epoch_scale")}
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, **small))
        configs.append(dataclasses.replace(config, config_id=_config_id(config), overrides=overrides))
    return configs


def with_seed(config: TrialConfig, seed: int) -> TrialConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def trial_key(trial: TrialConfig) -> str:
    """Names one trial for good: its configuration and its seed."""
    return f"{trial.config_id}-seed{trial.train.seed}"


def expand_trials(study: StudyConfig) -> list[TrialConfig]:
    """Configurations x initial seeds (all the seeds, unless they are adaptive)."""
    return [with_seed(config, seed) for config in expand_configs(study) for seed in study.seeds.initial]


def validate_trial(trial: TrialConfig, where: str) -> None:
    """Checks that need more than one field, or a variant name."""
    parse_variant(trial.model.variant)
    train, model, res = trial.train, trial.model, trial.resources
    low, high = train.scale_range
    checks = [
        (train.epochs >= 1, f"train.epochs must be at least 1, got {train.epochs}"),
        (train.batch_size >= 1, f"train.batch_size must be at least 1, got {train.batch_size}"),
        (train.crop_size >= 16, f"train.crop_size must be at least 16, got {train.crop_size}"),
        (0 < low <= high, f"train.scale_range must be [low, high] with 0 < low <= high, got {list(train.scale_range)}"),
        (train.lr > 0 and math.isfinite(train.lr), f"train.lr must be a positive number, got {train.lr}"),
        (train.optimizer in ("sgd", "adam"), f"train.optimizer must be sgd or adam, got {train.optimizer!r}"),
        (train.epoch_scale > 0, f"train.epoch_scale must be positive, got {train.epoch_scale}"),
        (train.precision in PRECISIONS, f"train.precision must be auto, fp32 or bf16, got {train.precision!r}"),
        (train.on_bad_sample in ("raise", "skip"), f"train.on_bad_sample must be raise or skip, got {train.on_bad_sample!r}"),
        (train.on_nan in ("stop", "skip"), f"train.on_nan must be stop or skip, got {train.on_nan!r}"),
        (train.max_failures >= 0, f"train.max_failures must be >= 0, got {train.max_failures}"),
        (0 <= train.aspect_jitter < 1, f"train.aspect_jitter must be in [0, 1), got {train.aspect_jitter}"),
        (model.depth in (18, 34, 50, 101, 152), f"model.depth must be 18, 34, 50, 101 or 152, got {model.depth}"),
        (model.output_stride in (8, 16, 32), f"model.output_stride must be 8, 16 or 32, got {model.output_stride}"),
        (model.norm in ("batch", "sync", "frozen"), f"model.norm must be batch, sync or frozen, got {model.norm!r}"),
        (model.width >= 4, f"model.width must be at least 4, got {model.width}"),
        (len(trial.eval.scales) >= 1 and all(0 < x <= 4 for x in trial.eval.scales),
         f"eval.scales must be a non-empty list of numbers in (0, 4], got {list(trial.eval.scales)}"),
        (all(k >= 3 and k % 2 == 1 for k in trial.eval.boundary_kernels),
         f"eval.boundary_kernels must be odd sizes >= 3, got {list(trial.eval.boundary_kernels)}"),
        (res.workers >= 1, f"resources.workers must be at least 1, got {res.workers}"),
        (res.cpus_per_worker >= 1, f"resources.cpus_per_worker must be at least 1, got {res.cpus_per_worker}"),
        (res.gpus_per_worker >= 0, f"resources.gpus_per_worker must be >= 0, got {res.gpus_per_worker}"),
        (res.max_concurrent_trials >= 1, f"resources.max_concurrent_trials must be at least 1, got {res.max_concurrent_trials}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SegdistError(f"{where}: {message}")


def smoke_study(study: StudyConfig, train_shards: str, val_shards: str) -> StudyConfig:
    """The same study at tiny width, image size and length on CPU, on the generated data
    set: every configuration (every variant) is built and trained once, with one seed.
    channels_last is off: it buys nothing in fp32 on a CPU, and torch 2.13.0's oneDNN frees memory
    twice in the weight gradient of a strided 1x1 conv at smoke widths (4 -> 8 channels) in that layout."""
    base = study.base
    base = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, train_shards=train_shards, val_shards=val_shards,
                                 synthetic_root=None, loader_workers=0),
        model=dataclasses.replace(base.model, depth=18, width=4, pretrained=None),
        train=dataclasses.replace(base.train, epochs=1, batch_size=2, crop_size=32, epoch_scale=1.0,
                                  precision="fp32", channels_last=False, max_failures=0),
        resources=ResourcesConfig(workers=1, cpus_per_worker=1, gpus_per_worker=0, max_concurrent_trials=2),
    )
    # Variant tokens (size512, bs8, scale8) would undo the tiny sizes: pin them in the search.
    search = tuple(d for d in study.search if not d.key.startswith(("resources.", "data.")))
    return dataclasses.replace(
        study, name=f"{study.name}-smoke", base=base, search=search,
        seeds=SeedPolicy(initial=(0,), max_seeds=1), screening=None, smoke=True,
    )


def apply_variant_tokens(train: TrainConfig, variant_name: str) -> TrainConfig:
    """A variant's training tokens (lr10, scale8, size512, bs8) override the study's."""
    variant = parse_variant(variant_name)
    tokens = {
        "head_lr_mult": variant.head_lr_mult,
        "epoch_scale": variant.epoch_scale,
        "crop_size": variant.crop_size,
        "batch_size": variant.batch_size,
    }
    return dataclasses.replace(train, **{k: v for k, v in tokens.items() if v is not None})


def trial_from_dict(values: dict[str, Any]) -> TrialConfig:
    """Rebuild a TrialConfig from dataclasses.asdict() output (Tune's param space)."""
    sections = {name: cls(**_coerce_section(cls, values[name])) for name, cls in SECTIONS.items()}
    return TrialConfig(**sections, config_id=values.get("config_id", ""), overrides=values.get("overrides", {}))


# ---------------------------------------------------------------- parsing helpers


def _reject_unknown(raw: dict, allowed, where: str, what: str) -> None:
    for key in raw:
        if key not in allowed:
            raise SegdistError(f"{where}: unknown {what} {key!r}; valid: {', '.join(allowed)}")


def _build_section(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise SegdistError(f"{where}: must be a mapping, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    _reject_unknown(raw, names, where, "key")
    return cls(**_coerce_section(cls, raw, where))


def _coerce_section(cls, raw: dict, where: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in raw.items()}


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
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise SegdistError(f"{where}: expected a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, typing.get_args(hint), strict=True))
    if hint is dict or origin is dict:
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SegdistError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        return _as_int(value, where)
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


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SegdistError(f"{where}: expected an integer, got {value!r}")
    return value


def _parse_seeds(raw: Any, where: str) -> SeedPolicy:
    if isinstance(raw, dict):
        _reject_unknown(raw, ("min", "max", "ci_halfwidth"), f"{where}: seeds", "key")
        low = _as_int(raw.get("min", 2), f"{where}: seeds.min")
        high = _as_int(raw.get("max", 8), f"{where}: seeds.max")
        target = _coerce(raw.get("ci_halfwidth", 0.5), float, f"{where}: seeds.ci_halfwidth")
        if not 2 <= low <= high:
            raise SegdistError(f"{where}: seeds needs 2 <= min <= max (a spread needs two seeds), got min={low} max={high}")
        if target <= 0:
            raise SegdistError(f"{where}: seeds.ci_halfwidth must be positive, got {target}")
        return SeedPolicy(initial=tuple(range(low)), max_seeds=high, ci_halfwidth=target)
    if not isinstance(raw, list) or not raw:
        raise SegdistError(
            f"{where}: seeds must be a non-empty list such as [0, 1, 2] or {{min: 2, max: 8, ci_halfwidth: 0.5}}, got {raw!r}"
        )
    seeds = tuple(_as_int(s, f"{where}: seeds") for s in raw)
    if len(set(seeds)) != len(seeds):
        raise SegdistError(f"{where}: seeds repeat a value: {list(seeds)}")
    if any(seed < 0 for seed in seeds):
        raise SegdistError(f"{where}: seeds must be >= 0, got {list(seeds)}")
    return SeedPolicy(initial=seeds, max_seeds=len(seeds))


def _parse_screening(raw: Any, where: str) -> Screening | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"asha"}:
        raise SegdistError(f"{where}: screening must be {{asha: {{grace_period: N, reduction_factor: M}}}}")
    screening = _build_section(Screening, raw["asha"] or {}, f"{where}: screening.asha")
    if screening.grace_period < 1 or screening.reduction_factor < 2:
        raise SegdistError(f"{where}: screening.asha needs grace_period >= 1 and reduction_factor >= 2")
    return screening


def _parse_search_dim(key: str, spec: Any, where: str) -> SearchDim:
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise SegdistError(f"{where}: search key {key!r} is not a config value (use section.key, e.g. train.lr)")
    if section == "resources" or key == "train.seed":
        raise SegdistError(f"{where}: search key {key!r} cannot be searched (seeds go in `seeds`)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SegdistError(f"{where}: search.{key} must be one of {{{': ..., '.join(SEARCH_KINDS)}: ...}}")
    (kind, values), = spec.items()
    if kind not in SEARCH_KINDS:
        raise SegdistError(f"{where}: search.{key}: unknown kind {kind!r}; valid: {', '.join(SEARCH_KINDS)}")
    if not isinstance(values, list) or not values:
        raise SegdistError(f"{where}: search.{key}.{kind} must be a non-empty list")
    hint = typing.get_type_hints(SECTIONS[section])[name]
    if kind in ("loguniform", "uniform"):
        low, high = (_coerce(v, float, f"{where}: search.{key}") for v in values) if len(values) == 2 else (0, -1)
        if not 0 <= low < high or (kind == "loguniform" and low == 0):
            raise SegdistError(f"{where}: search.{key}.{kind} must be [low, high] with 0 < low < high")
        return SearchDim(key, kind, (low, high))
    values = tuple(_coerce(v, hint, f"{where}: search.{key}") for v in values)
    if len(set(map(repr, values))) != len(values):
        raise SegdistError(f"{where}: search.{key}.{kind} repeats a value: {list(values)}")
    return SearchDim(key, kind, values)


def _draw(dim: SearchDim, rng: random.Random) -> Any:
    if dim.kind == "choice":
        return dim.values[rng.randrange(len(dim.values))]
    low, high = dim.values
    if dim.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def _apply_overrides(config: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    sections = {name: getattr(config, name) for name in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    sections["train"] = apply_variant_tokens(sections["train"], sections["model"].variant)
    return dataclasses.replace(config, **sections)


def _config_id(config: TrialConfig) -> str:
    """A short stable hash of every value except the seed."""
    values = {k: v for k, v in config.flat().items() if k not in ("train.seed", "config_id")}
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]
