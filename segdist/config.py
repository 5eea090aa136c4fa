"""Study files: a YAML parsed once into a StudyConfig and expanded into trials, each carrying
the resolved recipe of its configuration (segdist.recipe).

A study file has fixed sections: `data` (where the shards are: not part of the recipe) and
`model`, `train`, `eval`, `resources` (recipe values: they override what the `protocol`
gives the variant, and may not contradict the variant's tokens), a `search` section over
dotted keys (`train.lr: {loguniform: [1e-3, 1e-1]}`, `model.variant: {grid: [...]}`), and
`seeds`, which repeats every configuration. Code downstream receives plain values, never
raw YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segdist.errors import SegdistError
from segdist.recipe import PROTOCOLS, SECTIONS, Recipe, from_dict
from segdist.resolve import coerce, coerce_value, resolve_recipe, settable_keys


@dataclass(frozen=True)
class DataConfig:
    """Where the data is (not part of the recipe). `train_shards` may hold `{train_list}`,
    filled with the recipe's image list (train_aug, or train for trimap): shards/voc/{train_list}."""

    train_shards: str = "shards/synthetic/train"
    val_shards: str = "shards/synthetic/val"
    # When set and the shards are missing, generate the synthetic VOC-layout data set
    # here and build the shards from it with the real VOC reader.
    synthetic_root: str | None = None
    loader_workers: int = 1  # DataLoader worker processes per training worker
    shuffle_buffer: int = 256


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs, picklable and free of YAML: the recipe, where the data is,
    and the seed."""

    recipe: Recipe
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    config_id: str = ""  # the same for every seed of one configuration
    overrides: dict[str, Any] = field(default_factory=dict)  # what the search chose

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key` (MLflow params, report grouping)."""
        flat: dict[str, Any] = {
            "config_id": self.config_id,
            "overrides": " ".join(f"{k}={v}" for k, v in self.overrides.items()),
            "train.seed": self.seed,
        }
        flat.update(self.recipe.flat())
        for key, value in dataclasses.asdict(self.data).items():
            flat[f"data.{key}"] = value
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
    protocol: str  # original | deeplab (segdist.protocols)
    values: dict[str, Any]  # the study's own recipe values, `section.field` -> coerced value
    data: DataConfig
    search: tuple[SearchDim, ...]
    seeds: SeedPolicy
    samples: int  # draws of the random (choice / loguniform / uniform) dimensions
    search_seed: int
    max_concurrent_trials: int = 1
    screening: Screening | None = None
    smoke: bool = False  # tiny sizes: variant tokens and study values may not enlarge them
    baseline: str | None = None  # the variant the report compares every configuration with


TOP_LEVEL_KEYS = ("name", "protocol", "data", *SECTIONS, "search", "seeds", "samples", "search_seed",
                  "screening", "baseline")
SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
# Keys of earlier segdist versions, with what replaced them.
RENAMED = {
    "train.head_lr_mult": "train.multipliers (e.g. {classifier: 10, decoder: [10, 20]}) or the variant's lrN",
    "train.seed": "the `seeds` section",
}


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
    """A study from its parsed YAML; every configuration is resolved once here, so a bad value
    or a contradiction fails before any compute (SegdistError, one line naming `where`)."""
    _reject_unknown(raw, TOP_LEVEL_KEYS, where, "top-level key")
    resources = dict(_section(raw, "resources", where))
    max_concurrent = _as_int(resources.pop("max_concurrent_trials", 1), f"{where}: resources.max_concurrent_trials")
    if max_concurrent < 1:
        raise SegdistError(f"{where}: resources.max_concurrent_trials must be at least 1, got {max_concurrent}")
    values: dict[str, Any] = {}
    for section in SECTIONS:
        for key, value in (resources if section == "resources" else _section(raw, section, where)).items():
            values[f"{section}.{key}"] = _study_value(f"{section}.{key}", value, where)
    protocol = str(raw.get("protocol", "deeplab"))
    if protocol not in PROTOCOLS:
        raise SegdistError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    samples = _as_int(raw.get("samples", 1), f"{where}: samples")
    if samples < 1:
        raise SegdistError(f"{where}: samples must be at least 1, got {samples}")
    study = StudyConfig(
        name=study_name(raw, where),
        path=where,
        protocol=protocol,
        values=values,
        data=_data_config(_section(raw, "data", where), where),
        search=tuple(_parse_search_dim(key, spec, where) for key, spec in (raw.get("search") or {}).items()),
        seeds=_parse_seeds(raw.get("seeds", [0]), where),
        samples=samples,
        search_seed=_as_int(raw.get("search_seed", 0), f"{where}: search_seed"),
        max_concurrent_trials=max_concurrent,
        screening=_parse_screening(raw.get("screening"), where),
        baseline=None if raw.get("baseline") is None else str(raw["baseline"]),
    )
    expand_configs(study)  # resolve every configuration now, before any compute is spent
    return study


def expand_configs(study: StudyConfig) -> list[TrialConfig]:
    """Every configuration once (seed 0), in a fixed order, with its recipe resolved.
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
        data_overrides = {k.partition(".")[2]: v for k, v in overrides.items() if k.startswith("data.")}
        values = {**study.values, **{k: v for k, v in overrides.items() if not k.startswith("data.")}}
        recipe = resolve_recipe(values, study.protocol, study.path, smoke=study.smoke)
        data = dataclasses.replace(study.data, **data_overrides)
        data = dataclasses.replace(data, train_shards=data.train_shards.replace("{train_list}", recipe.train.train_list))
        configs.append(TrialConfig(recipe, data, 0, _config_id(recipe, data), overrides))
    return configs


def with_seed(config: TrialConfig, seed: int) -> TrialConfig:
    return dataclasses.replace(config, seed=seed)


def trial_key(trial: TrialConfig) -> str:
    """Names one trial for good: its configuration and its seed."""
    return f"{trial.config_id}-seed{trial.seed}"


def expand_trials(study: StudyConfig) -> list[TrialConfig]:
    """Configurations x initial seeds (all the seeds, unless they are adaptive)."""
    return [with_seed(config, seed) for config in expand_configs(study) for seed in study.seeds.initial]


def smoke_study(study: StudyConfig, train_shards: str, val_shards: str) -> StudyConfig:
    """The same study at tiny width, image size and length on CPU, on the generated data
    set: every configuration (every variant) is built and trained once, with one seed, one
    worker, whatever its tokens say (segdist.protocols.SMOKE). channels_last is off: it buys
    nothing in fp32 on a CPU, and torch 2.13.0's oneDNN frees memory twice in the weight
    gradient of a strided 1x1 conv at smoke widths (4 -> 8 channels) in that layout."""
    data = DataConfig(train_shards=train_shards, val_shards=val_shards, synthetic_root=None, loader_workers=0)
    search = tuple(d for d in study.search if not d.key.startswith(("resources.", "data.")))
    return dataclasses.replace(
        study, name=f"{study.name}-smoke", data=data, search=search, max_concurrent_trials=2,
        seeds=SeedPolicy(initial=(0,), max_seeds=1), screening=None, smoke=True,
    )


def study_name(raw: dict[str, Any], where: str) -> str:
    """A study file's `name` (default: the file's stem), which becomes the MLflow experiment
    and a folder of the Tune storage (storage/NAME/RUN_ID, local or s3://...). Quotes,
    spaces, parentheses and non-ASCII are fine; SegdistError for a name that cannot be one
    folder: empty, '.', '..', one of / \\ ? # % (paths and URIs), a control character, or over 200
    characters."""
    name = str(raw.get("name") or Path(where).stem)
    bad = (not name.strip() or name in (".", "..") or any(c in name for c in "/\\?#%") or len(name) > 200
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if bad:
        raise SegdistError(f"{where}: name {name!r} cannot name one storage folder (no / \\ ? # %, control "
                           "characters, '.' or '..', at most 200 characters; quotes, spaces and non-ASCII are fine)")
    return name


def trial_from_dict(values: dict[str, Any]) -> TrialConfig:
    """Rebuild a TrialConfig from dataclasses.asdict() output (Tune's param space, checkpoints)."""
    return TrialConfig(
        recipe=from_dict(Recipe, values["recipe"]),
        data=from_dict(DataConfig, values["data"]),
        seed=int(values.get("seed", 0)),
        config_id=values.get("config_id", ""),
        overrides=values.get("overrides", {}),
    )


# ---------------------------------------------------------------- parsing helpers


def _reject_unknown(raw: dict, allowed, where: str, what: str) -> None:
    for key in raw:
        if key not in allowed:
            raise SegdistError(f"{where}: unknown {what} {key!r}; valid: {', '.join(allowed)}")


def _section(raw: dict, name: str, where: str) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise SegdistError(f"{where}: {name}: must be a mapping, got {type(section).__name__}")
    return section


def _study_value(key: str, value: Any, where: str) -> Any:
    if key in RENAMED:
        raise SegdistError(f"{where}: {key} is no longer a study key; use {RENAMED[key]}")
    section, _, name = key.partition(".")
    if name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        valid = [k.partition(".")[2] for k in settable_keys() if k.startswith(section + ".")]
        raise SegdistError(f"{where}: {section}: unknown key {name!r}; valid: {', '.join(valid)}")
    return coerce_value(key, value, where)


_DATA_TYPES = {"train_shards": str, "val_shards": str, "synthetic_root": str | None, "loader_workers": int,
               "shuffle_buffer": int}


def _data_config(raw: dict, where: str) -> DataConfig:
    _reject_unknown(raw, _DATA_TYPES, f"{where}: data", "key")
    return DataConfig(**{k: coerce(v, _DATA_TYPES[k], f"{where}: data.{k}") for k, v in raw.items()})


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SegdistError(f"{where}: expected an integer, got {value!r}")
    return value


def _parse_seeds(raw: Any, where: str) -> SeedPolicy:
    if isinstance(raw, dict):
        _reject_unknown(raw, ("min", "max", "ci_halfwidth"), f"{where}: seeds", "key")
        low = _as_int(raw.get("min", 2), f"{where}: seeds.min")
        high = _as_int(raw.get("max", 8), f"{where}: seeds.max")
        target = coerce(raw.get("ci_halfwidth", 0.5), float, f"{where}: seeds.ci_halfwidth")
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
    spec = raw["asha"] or {}
    _reject_unknown(spec, ("grace_period", "reduction_factor"), f"{where}: screening.asha", "key")
    screening = Screening(**{k: _as_int(v, f"{where}: screening.asha.{k}") for k, v in spec.items()})
    if screening.grace_period < 1 or screening.reduction_factor < 2:
        raise SegdistError(f"{where}: screening.asha needs grace_period >= 1 and reduction_factor >= 2")
    return screening


def _parse_search_dim(key: str, spec: Any, where: str) -> SearchDim:
    section = key.partition(".")[0]
    data_keys = {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    if key in RENAMED or section == "resources":
        raise SegdistError(f"{where}: search key {key!r} cannot be searched (seeds go in `seeds`, resources "
                           "per configuration come from the variant's Ngpu token)")
    if key not in settable_keys() and key not in data_keys:
        raise SegdistError(f"{where}: search key {key!r} is not a config value (use section.key, e.g. train.lr)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SegdistError(f"{where}: search.{key} must be one of {{{': ..., '.join(SEARCH_KINDS)}: ...}}")
    (kind, values), = spec.items()
    if kind not in SEARCH_KINDS:
        raise SegdistError(f"{where}: search.{key}: unknown kind {kind!r}; valid: {', '.join(SEARCH_KINDS)}")
    if not isinstance(values, list) or not values:
        raise SegdistError(f"{where}: search.{key}.{kind} must be a non-empty list")
    if kind in ("loguniform", "uniform"):
        if key in data_keys or typing.get_type_hints(SECTIONS[section])[key.partition(".")[2]] is not float:
            raise SegdistError(f"{where}: search.{key}: {kind} draws real numbers; {key} is not one "
                               "(use grid or choice)")
        low, high = (coerce(v, float, f"{where}: search.{key}") for v in values) if len(values) == 2 else (0, -1)
        if not 0 <= low < high or (kind == "loguniform" and low == 0):
            raise SegdistError(f"{where}: search.{key}.{kind} must be [low, high] with 0 < low < high")
        return SearchDim(key, kind, (low, high))
    if key in data_keys:
        values = tuple(coerce(v, _DATA_TYPES[key.partition(".")[2]], f"{where}: search.{key}") for v in values)
    else:
        values = tuple(coerce_value(key, v, f"{where}: search") for v in values)
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


def _config_id(recipe: Recipe, data: DataConfig) -> str:
    """A short stable hash of the recipe and the shard folders' names (not their absolute
    paths: the same study run from another checkout keeps its ids)."""
    values = {**recipe.flat(), "data.train": Path(data.train_shards).name, "data.val": Path(data.val_shards).name}
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]
