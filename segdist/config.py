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
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    on_bad_sample: str = "raise"  # raise | skip (skips are counted and logged)
    on_nan: str = "stop"  # stop: the trial ends as diverged; skip: drop the step, count it
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    seed: int = 0


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
    config_id: str = ""  # the same for every seed of one configuration
    overrides: dict[str, Any] = field(default_factory=dict)  # what the search chose

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key` (MLflow params, report grouping)."""
        flat: dict[str, Any] = {
            "config_id": self.config_id,
            "overrides": " ".join(f"{k}={v}" for k, v in self.overrides.items()),
        }
        for section in ("data", "model", "train", "resources"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = value
        return flat


@dataclass(frozen=True)
class SearchDim:
    key: str  # dotted, e.g. "train.lr"
    kind: str  # grid | choice | loguniform | uniform
    values: tuple


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: str
    base: TrialConfig
    search: tuple[SearchDim, ...]
    seeds: tuple[int, ...]
    samples: int  # draws of the random (choice / loguniform / uniform) dimensions
    search_seed: int

    @property
    def resources(self) -> ResourcesConfig:
        return self.base.resources


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "resources": ResourcesConfig,
}
SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
TOP_LEVEL_KEYS = ("name", *SECTIONS, "search", "seeds", "samples", "search_seed")


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; every mistake is one SegdistError line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SegdistError(f"{path}: study file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise SegdistError(f"{path}: broken YAML{where}: {problem}") from None
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
    )
    # Validate every configuration now, before any compute is spent.
    try:
        for trial in expand_trials(study):
            validate_trial(trial, where)
    except SegdistError as err:
        message = str(err)
        raise SegdistError(message if message.startswith(where) else f"{where}: {message}") from None
    return study


def expand_trials(study: StudyConfig) -> list[TrialConfig]:
    """Configurations x seeds, in a fixed order. Random dimensions are drawn once per
    configuration (from `search_seed`), so every seed of it trains the same values."""
    grid = [d for d in study.search if d.kind == "grid"]
    sampled = [d for d in study.search if d.kind != "grid"]
    rng = random.Random(study.search_seed)
    configs: list[dict[str, Any]] = []
    for _ in range(study.samples if sampled else 1):
        draws = {d.key: _draw(d, rng) for d in sampled}
        for combo in itertools.product(*(d.values for d in grid)):
            configs.append({**dict(zip((d.key for d in grid), combo, strict=True)), **draws})
    trials = []
    for overrides in configs:
        config = _apply_overrides(study.base, overrides)
        config_id = _config_id(config)
        for seed in study.seeds:
            trial = _apply_overrides(config, {"train.seed": seed})
            trials.append(dataclasses.replace(trial, config_id=config_id, overrides=overrides))
    return trials


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
        (train.precision in ("fp32", "bf16"), f"train.precision must be fp32 or bf16, got {train.precision!r}"),
        (train.on_bad_sample in ("raise", "skip"), f"train.on_bad_sample must be raise or skip, got {train.on_bad_sample!r}"),
        (train.on_nan in ("stop", "skip"), f"train.on_nan must be stop or skip, got {train.on_nan!r}"),
        (train.max_failures >= 0, f"train.max_failures must be >= 0, got {train.max_failures}"),
        (0 <= train.aspect_jitter < 1, f"train.aspect_jitter must be in [0, 1), got {train.aspect_jitter}"),
        (model.depth in (18, 34, 50, 101, 152), f"model.depth must be 18, 34, 50, 101 or 152, got {model.depth}"),
        (model.output_stride in (8, 16, 32), f"model.output_stride must be 8, 16 or 32, got {model.output_stride}"),
        (model.norm in ("batch", "sync", "frozen"), f"model.norm must be batch, sync or frozen, got {model.norm!r}"),
        (model.width >= 4, f"model.width must be at least 4, got {model.width}"),
        (res.workers >= 1, f"resources.workers must be at least 1, got {res.workers}"),
        (res.cpus_per_worker >= 1, f"resources.cpus_per_worker must be at least 1, got {res.cpus_per_worker}"),
        (res.gpus_per_worker >= 0, f"resources.gpus_per_worker must be >= 0, got {res.gpus_per_worker}"),
        (res.max_concurrent_trials >= 1, f"resources.max_concurrent_trials must be at least 1, got {res.max_concurrent_trials}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SegdistError(f"{where}: {message}")


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


def _parse_seeds(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raise SegdistError(f"{where}: seeds must be a list of integers such as [0, 1, 2], got {raw!r}")
    if not isinstance(raw, list) or not raw:
        raise SegdistError(f"{where}: seeds must be a non-empty list of integers, got {raw!r}")
    seeds = tuple(_as_int(s, f"{where}: seeds") for s in raw)
    if len(set(seeds)) != len(seeds):
        raise SegdistError(f"{where}: seeds repeat a value: {list(seeds)}")
    return seeds


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
    return SearchDim(key, kind, tuple(_coerce(v, hint, f"{where}: search.{key}") for v in values))


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
